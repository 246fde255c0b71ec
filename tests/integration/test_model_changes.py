"""Models and workflows users bring (issue 22), through real Trainers: a model changed
between fits, short tasks, misuse that must not stay silent."""

from __future__ import annotations

import pytest
import torch
from helpers import TESTS, TinyClassifier, loader, make_trainer
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn.utils import prune

from lightning_metagrad import AnchoredPredictor, MetaGradCallback, SubspacePredictor


class Record(Callback):
    """Placed after MetaGrad: the engine's report of every optimizer step."""

    def __init__(self, cb: MetaGradCallback) -> None:
        self.cb, self.rewritten = cb, []

    def on_train_batch_end(self, *args: object) -> None:
        report = self.cb.engine.last_report
        self.rewritten.append(set(report.rewritten) if report is not None else set())


def test_a_grown_head_is_free_and_the_rest_protected_at_the_next_fit() -> None:
    cb = MetaGradCallback(predictor=SubspacePredictor(every=1))
    model = TinyClassifier()
    make_trainer([cb], max_steps=8).fit(model, loader(0))
    model.net[2] = nn.Linear(16, 5)  # 3 -> 5 classes under the same name
    record = Record(cb)
    with pytest.warns(UserWarning, match=r"changed shape.*\['net.2.bias', 'net.2.weight'\]"):
        make_trainer([cb, record], max_steps=4).fit(model, loader(1))
    assert all(r == {"net.0.weight", "net.0.bias"} for r in record.rewritten)


def test_a_layer_pruned_between_fits_stays_protected() -> None:
    cb = MetaGradCallback(predictor=SubspacePredictor(every=1))
    model = TinyClassifier()
    make_trainer([cb], max_steps=8).fit(model, loader(0))
    prune.l1_unstructured(model.net[0], "weight", amount=0.5)  # weight -> weight_orig
    record = Record(cb)
    make_trainer([cb, record], max_steps=4).fit(model, loader(1))
    assert all("net.0.weight_orig" in r for r in record.rewritten)


@pytest.mark.parametrize("steps", [[5, 3, 4], [2, 2, 2]])
def test_short_tasks_never_break_the_run(steps: list[int]) -> None:
    cb = MetaGradCallback()  # the default observes every 4th step, and each task's first
    model = TinyClassifier()
    for task, n in enumerate(steps):
        make_trainer([cb], max_steps=n).fit(model, loader(task))
    assert cb.num_old_tasks == len(steps) - 1


def test_two_metagrad_callbacks_in_one_trainer_are_refused() -> None:
    trainer = make_trainer([MetaGradCallback(), MetaGradCallback(predictor="anchored")])
    with pytest.raises(MisconfigurationException, match="one MetaGradCallback"):
        trainer.fit(TinyClassifier(), loader(0))


def test_a_fresh_model_with_a_used_callback_is_warned_about() -> None:
    cb = MetaGradCallback()
    make_trainer([cb], max_steps=4).fit(TinyClassifier(), loader(0))
    with pytest.warns(UserWarning, match="freshly built model"):
        make_trainer([cb], max_steps=4).fit(TinyClassifier(), loader(1))


def test_an_elementwise_predictor_on_adam_updates_is_warned_about_with_the_figure() -> None:
    cb = MetaGradCallback(predictor=AnchoredPredictor())
    with pytest.warns(UserWarning, match="0.37 against 0.93"):
        make_trainer([cb], max_steps=2).fit(TinyClassifier(optimizer="adam"), loader(0))


def test_the_core_refuses_a_step_before_bind() -> None:
    from lightning_metagrad import MetaGrad

    with pytest.raises(RuntimeError, match="bind"):
        MetaGrad().before_optimizer_step()


def test_replay_without_a_batch_loss_is_refused_at_bind() -> None:
    from lightning_metagrad import MetaGrad

    with pytest.raises(ValueError, match="batch_loss"):
        MetaGrad("replay").bind(nn.Linear(2, 2))


def test_a_compiled_models_names_keep_the_protection_loaded_from_a_state() -> None:
    from lightning_metagrad import MetaGrad

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    core = MetaGrad(SubspacePredictor(every=1))
    core.bind(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    core.use_optimizer(opt)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).sum().backward()
        core.before_optimizer_step()
        opt.step()
    core.start_task()
    state = core.state_dict()
    resumed = MetaGrad(SubspacePredictor(every=1))
    resumed.load_state_dict(state)
    wrapped = nn.Module()
    wrapped._orig_mod = model  # the names torch.compile(model).named_parameters() gives
    resumed.bind(wrapped)
    model(torch.randn(8, 4)).pow(2).sum().backward()
    report = resumed.step()
    assert report is not None and "_orig_mod.0.weight" in report.rewritten


@pytest.mark.slow
@pytest.mark.parametrize("predictor", ["subspace", "anchored"])
def test_a_transformer_resumed_in_a_new_process_ends_with_the_uninterrupted_weights(
    tmp_path, predictor: str
) -> None:
    import subprocess
    import sys

    script = TESTS / "scripts" / "resume_transformer.py"
    for mode in ("straight", "resume"):
        subprocess.run(
            [sys.executable, str(script), mode, predictor, str(tmp_path)],
            check=True,
            capture_output=True,
        )
    straight = torch.load(tmp_path / "straight.pt")
    resumed = torch.load(tmp_path / "resumed.pt")
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name


def test_lightnings_model_pruning_without_making_it_permanent_keeps_working() -> None:
    from lightning.pytorch.callbacks import ModelPruning

    cb = MetaGradCallback(predictor=SubspacePredictor(every=1))
    model = TinyClassifier()
    for task in range(3):
        # (Global pruning cannot run a second fit on non-permanent pruning, with or
        # without this callback; per-layer pruning can.)
        pruning = ModelPruning(
            "l1_unstructured",
            amount=0.2,
            make_pruning_permanent=False,
            use_global_unstructured=False,
        )
        record = Record(cb)
        make_trainer([cb, record, pruning], max_epochs=1, max_steps=-1).fit(model, loader(task))
        if task:  # pruned at the end of the first fit: weight -> weight_orig, bias -> bias_orig
            assert all({"net.0.weight_orig", "net.0.bias_orig"} <= r for r in record.rewritten)
    assert cb.num_old_tasks == 2
