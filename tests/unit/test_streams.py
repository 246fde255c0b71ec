"""Task streams: permuted / split / rotated tasks, dataloaders, determinism, datasets. A stream
driving a real Trainer: ``tests/integration/test_streams_training.py``."""

from __future__ import annotations

import doctest
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ROOT

import lightning_metagrad.data as data_pkg
import lightning_metagrad.data.datasets as datasets_mod
import lightning_metagrad.data.streams as streams_mod
from lightning_metagrad.data import (
    JointDataset,
    PermutedStream,
    RotatedStream,
    SplitStream,
    TaskStream,
)

FASHION_ROOT = ROOT.parent / "shared" / "data"
needs_fashion = pytest.mark.skipif(
    not (FASHION_ROOT / "FashionMNIST" / "raw").is_dir(),
    reason=f"Fashion-MNIST not found under {FASHION_ROOT} (no download in tests)",
)


def first_batch(loader: Any) -> dict[str, torch.Tensor]:
    return next(iter(loader))


# ------------------------------------------------------------------------------- permuted
def test_permutations_are_fixed_per_task_and_distinct_across_tasks() -> None:
    stream = PermutedStream(num_tasks=4, seed=3)
    perms = stream.permutations
    assert perms.shape == (4, 64)
    assert torch.equal(perms[0], torch.arange(64))  # task 0: original images
    for t in range(4):
        assert torch.equal(perms[t].sort().values, torch.arange(64))  # a real permutation
    assert len({tuple(p.tolist()) for p in perms}) == 4
    x = stream.task_dataset(2, "test").fetch(torch.arange(5))["x"]
    base = stream.task_dataset(0, "test").fetch(torch.arange(5))["x"]
    assert torch.equal(x, base[:, perms[2]])  # applied as pixel indexing, same every call
    assert torch.equal(x, stream.task_dataset(2, "test").fetch(torch.arange(5))["x"])


def test_permute_first_task_option_permutes_task_zero() -> None:
    stream = PermutedStream(num_tasks=2, permute_first_task=True)
    assert not torch.equal(stream.permutations[0], torch.arange(64))
    x = torch.rand(2, 1, 8, 8)
    assert not torch.equal(stream.apply_task(x, 0), x)


def test_permutations_are_deterministic_given_seed() -> None:
    a, b, c = (PermutedStream(num_tasks=3, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.permutations, b.permutations)
    assert not torch.equal(a.permutations[1:], c.permutations[1:])
    for stream in (a, b):
        stream.set_task(1)
    assert torch.equal(
        first_batch(a.train_dataloader())["x"], first_batch(b.train_dataloader())["x"]
    )
    assert not torch.equal(
        first_batch(a.train_dataloader())["y"], first_batch(c.train_dataloader())["y"]
    )


# ---------------------------------------------------------------------------------- split
def test_split_tasks_hold_class_pairs_with_original_labels() -> None:
    stream = SplitStream(num_tasks=5, eval_batch_size=2000)
    assert stream.num_classes == 10
    for task in range(5):
        assert stream.task_classes(task) == (2 * task, 2 * task + 1)
        for split in ("train", "val", "test"):
            labels = stream.task_dataset(task, split).fetch(torch.arange(20))["y"]
            full = first_batch(stream.task_dataloader(task, split))["y"]
            assert set(full.tolist()) == {2 * task, 2 * task + 1}
            assert set(labels.tolist()) <= {2 * task, 2 * task + 1}
    sizes = sum(len(stream.task_dataset(t, "test")) for t in range(5))
    assert sizes == len(stream.task_dataset(0, "test").labels)  # tasks partition the split


def test_split_relabel_and_class_order() -> None:
    stream = SplitStream(num_tasks=2, class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0], relabel=True)
    assert stream.num_classes == 5 and stream.task_classes(0) == (9, 8, 7, 6, 5)
    ds = stream.task_dataset(0, "test")
    original = ds.labels[ds.indices]
    assert torch.equal(ds.fetch(torch.arange(len(ds)))["y"], 9 - original)


def test_split_rejects_uneven_task_count() -> None:
    with pytest.raises(ValueError, match="`num_tasks` must divide the 10 classes"):
        SplitStream(num_tasks=3)
    with pytest.raises(ValueError, match="class_order"):
        SplitStream(num_tasks=5, class_order=[0, 1, 2])


# -------------------------------------------------------------------------------- rotated
def test_rotation_moves_a_single_pixel() -> None:
    stream = RotatedStream(num_tasks=3, angles=[0, 90, 180])
    img = torch.zeros(1, 1, 8, 8)
    img[0, 0, 0, 1] = 1.0  # top row, second column
    assert torch.equal(stream.apply_task(img, 0), img)
    quarter = stream.apply_task(img, 1)  # counter-clockwise: to the left column, near bottom
    assert quarter[0, 0, 6, 0] == pytest.approx(1.0) and quarter.sum() == pytest.approx(1.0)
    half = stream.apply_task(img, 2)
    assert half[0, 0, 7, 6] == pytest.approx(1.0) and half.sum() == pytest.approx(1.0)


def test_rotated_tasks_rotate_the_dataset_once_per_task() -> None:
    stream = RotatedStream(num_tasks=3)
    assert stream.angles == (0.0, 90.0, 180.0)
    base = stream.task_dataset(0, "test").images
    rotated = stream.task_dataset(2, "test")
    assert rotated is stream.task_dataset(2, "test")  # cached
    assert torch.allclose(rotated.images, base.flip(-1).flip(-2), atol=1e-5)
    with pytest.raises(ValueError, match="angles"):
        RotatedStream(num_tasks=3, angles=[0, 90])


# ----------------------------------------------------------------------------- dataloaders
@pytest.mark.parametrize("cls", [PermutedStream, SplitStream, RotatedStream])
def test_batches_carry_their_task_id(cls: type[TaskStream]) -> None:
    stream = cls(num_tasks=5, batch_size=16)
    stream.set_task(3)
    batch = first_batch(stream.train_dataloader())
    assert set(batch) == {"x", "y", "task_id"}
    assert batch["x"].dtype == torch.float32 and batch["x"].shape == (16, 64)
    assert batch["y"].dtype == torch.long and batch["task_id"].dtype == torch.long
    assert batch["task_id"].tolist() == [3] * 16
    loaders = stream.test_dataloader()
    assert len(loaders) == len(stream.val_dataloader()) == 5
    for task, loader in enumerate(loaders):
        assert set(first_batch(loader)["task_id"].tolist()) == {task}
    sample = stream.task_dataset(1, "val")[0]  # per-sample access (default collation)
    assert sample["x"].shape == (64,) and int(sample["task_id"]) == 1


def test_joint_dataloader_is_the_union_of_tasks() -> None:
    stream = PermutedStream(num_tasks=4, batch_size=256)
    loader = stream.joint_train_dataloader(2)
    joint = loader.dataset
    assert isinstance(joint, JointDataset)
    assert len(joint) == 3 * len(stream.task_dataset(0, "train"))
    seen: dict[int, int] = {}
    for batch in loader:
        for t in batch["task_id"].tolist():
            seen[t] = seen.get(t, 0) + 1
    assert seen == {t: len(stream.task_dataset(t, "train")) for t in range(3)}
    k = len(stream.task_dataset(0, "train")) + 5  # sample 5 of task 1
    assert torch.equal(joint[k]["x"], stream.task_dataset(1, "train")[5]["x"])


def test_train_shuffle_is_seeded_and_eval_is_ordered() -> None:
    stream = PermutedStream(num_tasks=2)
    y1 = torch.cat([b["y"] for b in stream.train_dataloader()])
    y2 = torch.cat([b["y"] for b in stream.train_dataloader()])
    assert torch.equal(y1, y2)
    ds = stream.task_dataset(0, "train")
    assert not torch.equal(y1, ds.labels)  # shuffled
    y_test = torch.cat([b["y"] for b in stream.task_dataloader(0, "test")])
    assert torch.equal(y_test, stream.task_dataset(0, "test").labels)


def test_unflattened_batches_are_images() -> None:
    stream = RotatedStream(num_tasks=2, flatten=False, batch_size=4)
    assert stream.input_shape == (1, 8, 8) and stream.input_dim == 64
    assert first_batch(stream.task_dataloader(1))["x"].shape == (4, 1, 8, 8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset": "cifar10"}, "`dataset`"),
        ({"num_tasks": 0}, "`num_tasks`"),
        ({"batch_size": 0}, "`batch_size`"),
        ({"seed": -1}, "`seed`"),
        ({"val_fraction": 1.0}, "`val_fraction`"),
        ({"num_workers": -1}, "`num_workers`"),
        ({"dataset": "mnist"}, "`root` is required"),
    ],
)
def test_arguments_are_validated_eagerly(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PermutedStream(**kwargs)


def test_task_indices_and_splits_are_validated() -> None:
    stream = PermutedStream(num_tasks=2)
    with pytest.raises(ValueError, match="`task` must be in"):
        stream.set_task(2)
    with pytest.raises(ValueError, match="`split`"):
        stream.task_dataloader(0, split="holdout")
    with pytest.raises(ValueError, match="`upto_task`"):
        stream.joint_train_dataloader(5)


def test_state_dict_restores_current_task() -> None:
    a, b = PermutedStream(num_tasks=3), PermutedStream(num_tasks=3)
    a.set_task(2)
    b.load_state_dict(a.state_dict())
    assert b.current_task == 2


# -------------------------------------------------------------------------------- datasets
def test_digits_split_sizes_are_60_10_30_and_seed_independent() -> None:
    stream = PermutedStream(seed=0)
    sizes = [len(stream.task_dataset(0, s)) for s in ("train", "val", "test")]
    assert sizes == [1077, 180, 540] and sum(sizes) == 1797
    x = stream.task_dataset(0, "train").images
    assert x.dtype == torch.float32 and x.min() == 0.0 and x.max() == 1.0
    for split in ("train", "val", "test"):  # stratified: every class in every split
        assert stream.task_dataset(0, split).labels.unique().tolist() == list(range(10))
    other = PermutedStream(seed=5)
    assert torch.equal(other.task_dataset(0, "test").images, stream.task_dataset(0, "test").images)


def test_val_fraction_zero_gives_empty_validation() -> None:
    stream = SplitStream(val_fraction=0.0)
    assert len(stream.task_dataset(0, "val")) == 0
    assert len(stream.task_dataset(0, "train")) + len(stream.task_dataset(0, "test")) > 0


@needs_fashion
def test_fashion_mnist_loads_from_shared_root() -> None:
    splits = datasets_mod.load_splits("fashion_mnist", root=FASHION_ROOT, val_fraction=0.0)
    assert len(splits.train) == 60000 and len(splits.test) == 10000
    assert splits.train.y.unique().tolist() == list(range(10))
    assert splits.train.x.shape[1:] == (1, 28, 28) and float(splits.train.x.max()) <= 1.0
    stream = PermutedStream(dataset="fashion_mnist", root=FASHION_ROOT, batch_size=8)
    assert stream.num_classes == 10 and stream.input_dim == 784
    assert len(stream.task_dataset(0, "train")) + len(stream.task_dataset(0, "val")) == 60000
    assert first_batch(stream.task_dataloader(1, "train"))["x"].shape == (8, 784)


def test_missing_files_give_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"`root`.*download=True"):
        SplitStream(dataset="fashion_mnist", root=tmp_path / "nowhere")


# -------------------------------------------------------------------------- standardisation
def all_x(stream: TaskStream, task: int, split: str) -> torch.Tensor:
    return torch.cat([b["x"] for b in stream.task_dataloader(task, split=split)])


@pytest.mark.parametrize("cls", [PermutedStream, RotatedStream, SplitStream])
def test_standardize_gives_the_first_tasks_training_data_mean_0_std_1(
    cls: type[TaskStream],
) -> None:
    stream = cls(num_tasks=5, standardize=True, batch_size=256)
    raw = cls(num_tasks=5, batch_size=256)
    x = all_x(stream, 0, "train")
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std(unbiased=False)) - 1) < 1e-5
    # One scalar pair from task 0's training images, applied to every task and split.
    mean, std = stream.input_stats  # type: ignore[misc]
    assert (mean, std) == pytest.approx(datasets_mod.scalar_stats(all_x(raw, 0, "train")))
    for task, split in [(0, "test"), (3, "train"), (4, "val")]:
        assert torch.allclose(all_x(stream, task, split), (all_x(raw, task, split) - mean) / std)
    test = all_x(stream, 0, "test")  # not fitted on the test split: close, not exact
    assert abs(float(test.mean())) < 0.1 and float(test.mean()) != 0.0


def test_standardize_follows_the_task_transform_and_joint_batches() -> None:
    stream = RotatedStream(num_tasks=2, angles=[0, 90], standardize=True)
    mean, std = stream.input_stats  # type: ignore[misc]
    rotated = stream.task_dataset(1, "test").fetch(torch.arange(4))["x"].reshape(4, 8, 8)
    raw = (
        RotatedStream(num_tasks=2, angles=[0, 90])
        .task_dataset(1, "test")
        .fetch(torch.arange(4))["x"]
    )
    assert torch.allclose(rotated.flatten(1), (raw - mean) / std)  # a blank corner stays blank
    joint = next(iter(stream.joint_train_dataloader(1)))["x"]
    assert abs(float(joint.mean())) < 0.2  # both tasks' samples standardised
    assert PermutedStream(num_tasks=2).input_stats is None


def test_standardize_refuses_constant_images() -> None:
    with pytest.raises(ValueError, match="std 0"):
        datasets_mod.scalar_stats(torch.ones(4, 1, 2, 2))


@pytest.mark.parametrize("module", [data_pkg, streams_mod, datasets_mod])
def test_docstring_examples_run(module: Any) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
