"""Continual-learning metrics: formulas on hand-computed matrices, collapse to chance,
AccuracyMatrix, curves."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch

import lightning_metagrad.metrics as metrics_mod
from lightning_metagrad.metrics import (
    AccuracyMatrix,
    TaskAccuracyCurve,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    collapsed_in_task,
    forward_transfer,
)

# R[i][j]: accuracy on task j after training task i.
R = [
    [0.90, 0.20, 0.10],
    [0.80, 0.95, 0.30],
    [0.70, 0.85, 0.90],
]
B = [0.10, 0.15, 0.05]
# A later row beats the diagonal (R2[1][0] > R2[0][0]): forgetting differs from -BWT.
R2 = [
    [0.60, 0.10, 0.10],
    [0.80, 0.70, 0.20],
    [0.50, 0.60, 0.90],
]


def test_average_accuracy_is_mean_of_last_row() -> None:
    assert average_accuracy(R) == pytest.approx((0.70 + 0.85 + 0.90) / 3)


def test_backward_transfer_compares_final_row_with_diagonal() -> None:
    assert backward_transfer(R) == pytest.approx(((0.70 - 0.90) + (0.85 - 0.95)) / 2)
    assert backward_transfer(R2) == pytest.approx(((0.50 - 0.60) + (0.60 - 0.70)) / 2)


def test_forward_transfer_compares_superdiagonal_with_random_init() -> None:
    assert forward_transfer(R, B) == pytest.approx(((0.20 - 0.15) + (0.30 - 0.05)) / 2)


def test_average_forgetting_uses_best_earlier_accuracy() -> None:
    assert average_forgetting(R) == pytest.approx(((0.90 - 0.70) + (0.95 - 0.85)) / 2)
    assert average_forgetting(R2) == pytest.approx(((0.80 - 0.50) + (0.70 - 0.60)) / 2)


def test_metric_functions_accept_tensor_list_and_array_alike() -> None:
    for fn in (average_accuracy, backward_transfer, average_forgetting):
        values = [fn(R), fn(torch.tensor(R)), fn(np.array(R))]
        assert values == pytest.approx([values[0]] * 3)
        assert isinstance(values[1], float)
    assert forward_transfer(torch.tensor(R), torch.tensor(B)) == pytest.approx(
        forward_transfer(R, B)
    )


@pytest.mark.parametrize(
    "bad", [[0.1, 0.2], [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], torch.zeros(2, 2, 2), "matrix"]
)
def test_non_square_matrices_are_rejected(bad: object) -> None:
    for fn in (average_accuracy, backward_transfer, average_forgetting):
        with pytest.raises(ValueError, match="`R`"):
            fn(bad)


def test_transfer_and_forgetting_need_two_tasks() -> None:
    assert average_accuracy([[0.5]]) == 0.5
    for fn in (backward_transfer, average_forgetting):
        with pytest.raises(ValueError, match="at least 2 tasks"):
            fn([[0.5]])


def test_forward_transfer_checks_baseline_length() -> None:
    with pytest.raises(ValueError, match="`b` must be a vector of 3"):
        forward_transfer(R, [0.1, 0.1])


def test_nan_entries_that_a_formula_reads_propagate() -> None:
    partial = torch.tensor(R)
    partial[1, 2] = float("nan")  # read by FWT only
    assert average_accuracy(partial) == pytest.approx(average_accuracy(R))
    assert backward_transfer(partial) == pytest.approx(backward_transfer(R))
    assert math.isnan(forward_transfer(partial, B))


def test_collapse_is_a_learned_run_whose_new_task_scores_at_chance() -> None:
    # Task 0 learned; task 1 then scores at chance (<= 1.5 / 10) right after its training.
    R3 = [[0.90, 0.10, 0.10], [0.85, 0.12, 0.10], [0.40, 0.30, 0.80]]
    assert collapsed_in_task(R3, num_classes=10) == 1  # even though task 2 recovered
    assert collapsed_in_task(R, num_classes=10) is None
    # Nothing was ever learned: a failure to learn, not a collapse.
    assert collapsed_in_task([[0.1, 0.1], [0.1, 0.1]], num_classes=10) is None
    # Chance depends on the number of classes: 0.25 is chance for 5 classes, not for 10.
    learned_then_lost = [[0.9, 0.1], [0.5, 0.25]]
    assert collapsed_in_task(learned_then_lost, 5) == 1
    assert collapsed_in_task(learned_then_lost, 10) is None
    with pytest.raises(ValueError, match="num_classes"):
        collapsed_in_task(R, num_classes=1)


def test_accuracy_matrix_computes_in_its_dtype() -> None:
    metric = AccuracyMatrix(num_tasks=2)
    metric.set_dtype(torch.float64)  # exact ratios, e.g. for results.json
    metric.update(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]), 0, 0)
    out = metric.compute()
    assert out.dtype == torch.float64 and out[0, 0].item() == 2 / 3


def test_accuracy_matrix_counts_per_cell_and_leaves_unevaluated_nan() -> None:
    metric = AccuracyMatrix(num_tasks=3)
    metric.update(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 0]), 0, 0)  # 3/4
    metric.update(torch.tensor([5, 5]), torch.tensor([5, 4]), trained_upto=0, eval_task=0)
    metric.update(torch.tensor([7, 7]), torch.tensor([7, 7]), trained_upto=2, eval_task=1)
    out = metric.compute()
    assert out.shape == (3, 3) and out.dtype == torch.float32
    assert out[0, 0] == pytest.approx(4 / 6)
    assert out[2, 1] == 1.0
    evaluated = torch.zeros(3, 3, dtype=torch.bool)
    evaluated[0, 0] = evaluated[2, 1] = True
    assert out[~evaluated].isnan().all()


def test_accuracy_matrix_takes_logits_with_class_dim_one() -> None:
    metric = AccuracyMatrix(num_tasks=2)
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 2.0, 0.0]])
    metric.update(logits, torch.tensor([0, 2, 0]), trained_upto=1, eval_task=1)
    assert metric.compute()[1, 1] == pytest.approx(2 / 3)


def test_accuracy_matrix_feeds_the_metric_functions() -> None:
    metric = AccuracyMatrix(num_tasks=2)
    target = torch.zeros(10, dtype=torch.long)
    for i, j, n_correct in [(0, 0, 9), (0, 1, 1), (1, 0, 7), (1, 1, 8)]:
        preds = torch.cat([torch.zeros(n_correct), torch.ones(10 - n_correct)]).long()
        metric.update(preds, target, trained_upto=i, eval_task=j)
    matrix = metric.compute()
    assert average_accuracy(matrix) == pytest.approx(0.75)
    assert backward_transfer(matrix) == pytest.approx(-0.2)


def test_accuracy_matrix_states_sum_like_a_distributed_reduce() -> None:
    a, b, whole = AccuracyMatrix(2), AccuracyMatrix(2), AccuracyMatrix(2)
    preds, target = torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, 0, 1])
    a.update(preds[:2], target[:2], 1, 0)
    b.update(preds[2:], target[2:], 1, 0)
    whole.update(preds, target, 1, 0)
    a.merge_state(b)
    assert torch.equal(a.compute().nan_to_num(-1), whole.compute().nan_to_num(-1))
    assert a._reductions["correct"] is not None and a.correct.dtype == torch.long


def test_accuracy_matrix_reset_clears_counts() -> None:
    metric = AccuracyMatrix(num_tasks=2)
    metric.update(torch.tensor([1]), torch.tensor([1]), 0, 0)
    metric.reset()
    assert metric.total.sum() == 0
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert metric.compute().isnan().all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"trained_upto": 2, "eval_task": 0}, "trained_upto"),
        ({"trained_upto": 0, "eval_task": -1}, "eval_task"),
        ({"trained_upto": 0.0, "eval_task": 0}, "trained_upto"),
    ],
)
def test_accuracy_matrix_rejects_bad_task_indices(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AccuracyMatrix(num_tasks=2).update(torch.tensor([0]), torch.tensor([0]), **kwargs)


def test_accuracy_matrix_rejects_bad_shapes_and_arguments() -> None:
    metric = AccuracyMatrix(num_tasks=2)
    with pytest.raises(ValueError, match="preds"):
        metric.update(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), 0, 0)
    with pytest.raises(ValueError, match="integer class indices"):
        metric.update(torch.zeros(4), torch.zeros(4, dtype=torch.long), 0, 0)
    with pytest.raises(ValueError, match="target"):
        metric.update(torch.zeros(4, 3), torch.zeros(4), 0, 0)
    with pytest.raises(ValueError, match="num_tasks"):
        AccuracyMatrix(num_tasks=0)


def test_task_accuracy_curve_records_rows_and_columns() -> None:
    curve = TaskAccuracyCurve()
    curve.record_all(0, [0.1, 0.1])
    curve.record_all(50, [0.8, 0.2])
    curve.record(100, task=1, accuracy=torch.tensor(0.9).item())
    assert len(curve) == 5 and curve.tasks == [0, 1]
    assert curve.as_dict() == {
        "iteration": [0, 0, 50, 50, 100],
        "task": [0, 1, 0, 1, 1],
        "accuracy": pytest.approx([0.1, 0.1, 0.8, 0.2, 0.9]),
    }
    assert curve.series(1) == ([0, 50, 100], pytest.approx([0.1, 0.2, 0.9]))
    assert curve.rows[2] == {"iteration": 50, "task": 0, "accuracy": 0.8}
    with pytest.raises(ValueError, match="task"):
        curve.record(0, task=-1, accuracy=0.5)


def test_docstring_examples_run() -> None:
    result = doctest.testmod(metrics_mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
