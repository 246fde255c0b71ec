"""Continual-learning task streams as plain ``LightningDataModule`` subclasses.

A stream turns one base image dataset (``"digits"``, ``"mnist"`` or ``"fashion_mnist"``) into
``num_tasks`` tasks:

* :class:`PermutedStream`: one fixed pixel permutation per task (task 0 unpermuted by default);
* :class:`SplitStream`: disjoint groups of classes per task (5 tasks of 2 classes for 10 classes);
* :class:`RotatedStream`: one fixed rotation angle per task.

Whole datasets live in memory as float tensors; permutations are applied by tensor indexing a
batch at a time and rotations once per task and split. Every batch is a dict
``{"x": float tensor, "y": long tensor, "task_id": long tensor}``.

The training task is chosen with :meth:`TaskStream.set_task` and read by
:meth:`~TaskStream.train_dataloader` when a ``Trainer.fit`` starts, so the usual loop is one
``fit`` per task (or ``reload_dataloaders_every_n_epochs=1`` with ``set_task`` in a callback).
Validation and test return one dataloader per task, so Lightning logs per-task metrics with
``dataloader_idx`` equal to the task.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from lightning_metagrad._validation import check_int
from lightning_metagrad.data.datasets import (
    IMAGE_SHAPES,
    NUM_CLASSES,
    DatasetSplits,
    Split,
    check_dataset_args,
    load_splits,
    scalar_stats,
)

SPLITS = ("train", "val", "test")


def permute_pixels(x: Tensor, perm: Tensor) -> Tensor:
    """Permute the pixel positions of images ``[N, C, H, W]`` (the same for every channel).

    Example:
        >>> x = torch.arange(4.0).reshape(1, 1, 2, 2)
        >>> permute_pixels(x, torch.tensor([3, 2, 1, 0])).flatten().tolist()
        [3.0, 2.0, 1.0, 0.0]
    """
    return x.flatten(2)[:, :, perm].reshape(x.shape)


def collate_task_batch(data: Any) -> Any:
    """``collate_fn`` of the stream loaders: batches already built by the dataset pass through.

    Example:
        >>> batch = {"x": torch.zeros(2, 3), "y": torch.zeros(2, dtype=torch.long)}
        >>> collate_task_batch(batch) is batch
        True
    """
    if isinstance(data, dict):
        return data
    return default_collate(data)


class TaskDataset(Dataset):
    """The samples of one task of one split, as dicts ``{"x", "y", "task_id"}``.

    ``images`` (``[N, C, H, W]``) and ``labels`` are shared, not copied; ``indices`` selects a
    subset, ``perm`` permutes pixels, ``normalize = (mean, std)`` maps ``x`` to
    ``(x - mean) / std`` and ``label_map`` relabels, all lazily per batch. Batched fetching
    (``__getitems__``) builds a whole batch with tensor indexing.

    Example:
        >>> ds = TaskDataset(torch.rand(10, 1, 2, 2), torch.arange(10), task_id=3)
        >>> sample = ds[0]
        >>> sample["x"].shape, int(sample["task_id"])
        (torch.Size([4]), 3)
        >>> ds.__getitems__([0, 1, 2])["task_id"].tolist()
        [3, 3, 3]
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        task_id: int,
        indices: Tensor | None = None,
        perm: Tensor | None = None,
        label_map: Tensor | None = None,
        flatten: bool = True,
        normalize: tuple[float, float] | None = None,
    ) -> None:
        self.images, self.labels, self.task_id = images, labels, int(task_id)
        self.indices, self.perm, self.label_map, self.flatten = indices, perm, label_map, flatten
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.labels) if self.indices is None else len(self.indices)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        shape = tuple(self.images.shape[1:])
        return (int(np.prod(shape)),) if self.flatten else shape

    def fetch(self, idx: Tensor) -> dict[str, Tensor]:
        """The batch of positions ``idx`` (a 1-D long tensor)."""
        rows = idx if self.indices is None else self.indices[idx]
        x = self.images[rows]
        if self.perm is not None:
            x = permute_pixels(x, self.perm)
        if self.normalize is not None:
            mean, std = self.normalize
            x = (x - mean) / std
        y = self.labels[rows]
        if self.label_map is not None:
            y = self.label_map[y]
        return {
            "x": x.flatten(1) if self.flatten else x,
            "y": y,
            "task_id": torch.full((len(rows),), self.task_id, dtype=torch.long),
        }

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        batch = self.fetch(torch.tensor([i % len(self)]))
        return {key: value[0] for key, value in batch.items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Tensor]:
        return self.fetch(torch.as_tensor(indices, dtype=torch.long))


class JointDataset(Dataset):
    """The union of several :class:`TaskDataset` (each sample keeps its own ``task_id``).

    Example:
        >>> a = TaskDataset(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), 0)
        >>> b = TaskDataset(torch.ones(3, 1, 2, 2), torch.ones(3, dtype=torch.long), 1)
        >>> joint = JointDataset([a, b])
        >>> len(joint), joint.__getitems__([4, 0])["task_id"].tolist()
        (5, [1, 0])
    """

    def __init__(self, datasets: Sequence[TaskDataset]) -> None:
        if not datasets:
            raise ValueError("`datasets` must hold at least one TaskDataset")
        self.datasets = list(datasets)
        self.ends = np.cumsum([len(d) for d in self.datasets]).tolist()

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        i %= len(self)
        d = bisect_right(self.ends, i)
        return self.datasets[d][i - (self.ends[d - 1] if d else 0)]

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        ends = torch.tensor(self.ends, dtype=torch.long)
        which = torch.bucketize(idx, ends, right=True)
        starts = torch.cat([torch.zeros(1, dtype=torch.long), ends[:-1]])
        shape = self.datasets[0].sample_shape
        out = {
            "x": torch.empty((len(idx), *shape), dtype=self.datasets[0].images.dtype),
            "y": torch.empty(len(idx), dtype=torch.long),
            "task_id": torch.empty(len(idx), dtype=torch.long),
        }
        for d in which.unique().tolist():
            mask = which == d
            part = self.datasets[d].fetch(idx[mask] - starts[d])
            for key, value in part.items():
                out[key][mask] = value
        return out


def _derive_seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


class TaskStream(LightningDataModule):
    """Base class of the task streams: data loading, task selection and dataloaders.

    Subclasses define what a task is by overriding :meth:`task_images` (whole-split image
    transforms such as rotations), :meth:`task_permutation` (pixel permutations applied per
    batch) and :meth:`task_indices` / :meth:`task_label_map` (which samples and labels).

    Args:
        dataset: ``"digits"`` (scikit-learn's 8x8 digits, bundled: no download), ``"mnist"`` or
            ``"fashion_mnist"`` (torchvision, read from ``root``).
        num_tasks: number of tasks in the stream.
        root: folder holding torchvision's ``MNIST/`` or ``FashionMNIST/`` directory (required
            for those datasets, unused for digits).
        download: let torchvision download missing MNIST / Fashion-MNIST files into ``root``.
        batch_size: training batch size.
        seed: seeds the task definitions (permutations, ...) and the training shuffles. The
            train/val/test split of the base dataset never depends on it.
        val_fraction: fraction of the non-test data held out for validation. ``None``: 1/7 for
            digits (60/10/30 train/val/test overall, stratified) and 1/12 for MNIST-like sets
            (55000/5000 of the official 60000 training images; the official 10000 are test).
        num_workers: ``DataLoader`` workers.
        flatten: batches carry flat vectors ``[B, C*H*W]`` (default) or images ``[B, C, H, W]``.
        eval_batch_size: batch size of the val/test loaders (default: ``batch_size``).
        standardize: map every input to ``(x - mean) / std`` (GPM's protocol), with one scalar
            mean and std (:attr:`input_stats`) computed from the first task's training images
            before its transform (no data of later tasks, no val/test data) and applied to every
            task and split, after the task's transform.

    Example:
        A stream whose tasks differ by a label flip (``9 - y``) on even tasks:

        >>> class FlippedStream(TaskStream):
        ...     def task_label_map(self, task):
        ...         return torch.arange(9, -1, -1) if task % 2 == 0 else None
        >>> stream = FlippedStream(num_tasks=2, batch_size=4)
        >>> flipped = stream.task_dataset(0).fetch(torch.arange(3))["y"]
        >>> kept = stream.task_dataset(1).fetch(torch.arange(3))["y"]
        >>> torch.equal(flipped, 9 - kept)
        True
    """

    def __init__(
        self,
        dataset: str = "digits",
        num_tasks: int = 5,
        root: str | Path | None = None,
        download: bool = False,
        batch_size: int = 64,
        seed: int = 0,
        val_fraction: float | None = None,
        num_workers: int = 0,
        flatten: bool = True,
        eval_batch_size: int | None = None,
        standardize: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # the subclass's arguments too (for loggers and the CLI)
        check_dataset_args(dataset, root, bool(download), val_fraction)
        self.dataset = dataset
        self._num_tasks = check_int("num_tasks", num_tasks, minimum=1)
        self.root, self.download = root, bool(download)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.seed = check_int("seed", seed, minimum=0)
        self.val_fraction = val_fraction
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        self.flatten = bool(flatten)
        self.eval_batch_size = (
            self.batch_size
            if eval_batch_size is None
            else check_int("eval_batch_size", eval_batch_size, minimum=1)
        )
        self.standardize = bool(standardize)
        self._stats: tuple[float, float] | None = None
        self._splits: DatasetSplits | None = None
        self._datasets: dict[tuple[int, str], TaskDataset] = {}
        self._current_task = 0

    # ----------------------------------------------------------------------------- properties
    @property
    def num_tasks(self) -> int:
        """Number of tasks in the stream."""
        return self._num_tasks

    @property
    def num_classes(self) -> int:
        """Number of output classes a model needs (labels lie in ``range(num_classes)``)."""
        return NUM_CLASSES[self.dataset]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the base images."""
        return IMAGE_SHAPES[self.dataset]

    @property
    def input_dim(self) -> int:
        """``C * H * W``: the input width of an MLP on this stream."""
        return int(np.prod(self.image_shape))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one ``batch["x"]`` row: ``(input_dim,)`` or ``(C, H, W)`` if not flattened."""
        return (self.input_dim,) if self.flatten else self.image_shape

    @property
    def input_stats(self) -> tuple[float, float] | None:
        """``(mean, std)`` that ``standardize=True`` applies to every input (None when off):
        over the first task's training images, before the task's transform.

        Example:
            >>> stream = PermutedStream(num_tasks=2, standardize=True)
            >>> [round(v, 3) for v in stream.input_stats]
            [0.306, 0.376]
            >>> x = torch.cat([b["x"] for b in stream.task_dataloader(1, split="train")])
            >>> abs(float(x.mean())) < 1e-4, round(float(x.std(unbiased=False)), 4)
            (True, 1.0)
        """
        if not self.standardize:
            return None
        if self._stats is None:
            train = self._load().train
            rows = self.task_indices(train.y, 0)
            self._stats = scalar_stats(train.x if rows is None else train.x[rows])
        return self._stats

    @property
    def current_task(self) -> int:
        """The task :meth:`train_dataloader` serves."""
        return self._current_task

    def set_task(self, task: int) -> None:
        """Make ``task`` the current training task (read when the next ``fit`` starts)."""
        self._current_task = self._check_task("task", task)

    # -------------------------------------------------------------------- task definition
    def task_images(self, images: Tensor, task: int) -> Tensor:
        """Whole-split image transform of ``task`` (``[N, C, H, W]`` in and out); identity."""
        return images

    def task_permutation(self, task: int) -> Tensor | None:
        """Pixel permutation of ``task`` applied per batch, or None (the default)."""
        return None

    def task_indices(self, labels: Tensor, task: int) -> Tensor | None:
        """Positions of ``task``'s samples among ``labels``, or None for all (the default)."""
        return None

    def task_label_map(self, task: int) -> Tensor | None:
        """Lookup table ``original label -> task label``, or None to keep labels (default)."""
        return None

    def apply_task(self, images: Tensor, task: int) -> Tensor:
        """The input transform of ``task`` applied to images ``[N, C, H, W]``.

        Example:
            >>> stream = PermutedStream(num_tasks=2)
            >>> x = torch.rand(3, 1, 8, 8)
            >>> torch.equal(stream.apply_task(x, 0), x), torch.equal(stream.apply_task(x, 1), x)
            (True, False)
        """
        task = self._check_task("task", task)
        if images.ndim != 4:
            raise ValueError(f"`images` must be [N, C, H, W], got shape {tuple(images.shape)}")
        out = self.task_images(images, task)
        perm = self.task_permutation(task)
        return out if perm is None else permute_pixels(out, perm)

    # ---------------------------------------------------------------------------- data
    def prepare_data(self) -> None:
        """Download MNIST / Fashion-MNIST when ``download=True`` (Lightning calls it once)."""
        if self.download and self.dataset != "digits":
            from torchvision import datasets

            cls = datasets.MNIST if self.dataset == "mnist" else datasets.FashionMNIST
            for train in (True, False):
                cls(root=str(self.root), train=train, download=True)

    def setup(self, stage: str | None = None) -> None:
        """Load the base dataset into memory (idempotent; dataloaders also load lazily)."""
        self._load()

    def _load(self) -> DatasetSplits:
        if self._splits is None:
            self._splits = load_splits(self.dataset, self.root, self.download, self.val_fraction)
        return self._splits

    def task_dataset(self, task: int, split: str = "test") -> TaskDataset:
        """The :class:`TaskDataset` of ``task`` in ``split`` (built once, then cached)."""
        task = self._check_task("task", task)
        if split not in SPLITS:
            raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")
        key = (task, split)
        if key not in self._datasets:
            data: Split = self._load()[split]
            self._datasets[key] = TaskDataset(
                self.task_images(data.x, task),
                data.y,
                task,
                indices=self.task_indices(data.y, task),
                perm=self.task_permutation(task),
                label_map=self.task_label_map(task),
                flatten=self.flatten,
                normalize=self.input_stats,
            )
        return self._datasets[key]

    def _loader(self, dataset: Dataset, batch_size: int, shuffle_seed: int | None) -> DataLoader:
        generator = None
        if shuffle_seed is not None:
            generator = torch.Generator().manual_seed(shuffle_seed)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle_seed is not None,
            generator=generator,
            num_workers=self.num_workers,
            collate_fn=collate_task_batch,
            persistent_workers=self.num_workers > 0,
        )

    def task_dataloader(self, task: int, split: str = "test") -> DataLoader:
        """A dataloader over ``task`` in ``split``: shuffled (seeded) for ``"train"`` only.

        Example:
            >>> stream = SplitStream(num_tasks=5, batch_size=8)
            >>> batch = next(iter(stream.task_dataloader(2, split="test")))
            >>> sorted(set(batch["y"].tolist())), set(batch["task_id"].tolist())
            ([4, 5], {2})
        """
        dataset = self.task_dataset(task, split)
        if split == "train":
            return self._loader(dataset, self.batch_size, _derive_seed(self.seed, 1, task))
        return self._loader(dataset, self.eval_batch_size, None)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches of :attr:`current_task`."""
        return self.task_dataloader(self._current_task, split="train")

    def val_dataloader(self) -> list[DataLoader]:
        """One validation dataloader per task (``dataloader_idx`` = task)."""
        return [self.task_dataloader(t, split="val") for t in range(self.num_tasks)]

    def test_dataloader(self) -> list[DataLoader]:
        """One test dataloader per task (``dataloader_idx`` = task)."""
        return [self.task_dataloader(t, split="test") for t in range(self.num_tasks)]

    def joint_train_dataloader(self, upto_task: int) -> DataLoader:
        """Shuffled training batches of the union of tasks ``0..upto_task`` (joint upper bound).

        Example:
            >>> stream = PermutedStream(num_tasks=3, batch_size=512)
            >>> batch = next(iter(stream.joint_train_dataloader(1)))
            >>> sorted(set(batch["task_id"].tolist()))
            [0, 1]
        """
        upto = self._check_task("upto_task", upto_task)
        joint = JointDataset([self.task_dataset(t, "train") for t in range(upto + 1)])
        return self._loader(joint, self.batch_size, _derive_seed(self.seed, 2, upto))

    def state_dict(self) -> dict[str, Any]:
        """Checkpointed state: the current task."""
        return {"current_task": self._current_task}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.set_task(state_dict.get("current_task", 0))

    def _check_task(self, name: str, task: Any) -> int:
        if isinstance(task, bool) or not isinstance(task, (int, np.integer)):
            raise ValueError(f"`{name}` must be an integer task index, got {task!r}")
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"`{name}` must be in [0, {self.num_tasks}), got {task}")
        return int(task)


class PermutedStream(TaskStream):
    """Permuted digits/MNIST: each task applies its own fixed pixel permutation.

    Permutations are drawn from ``seed`` (same seed, same permutations); task 0 keeps the
    original images unless ``permute_first_task=True``. ``permutations[t]`` (``[H*W]``) is
    task ``t``'s permutation of pixel positions (the same for every channel).

    Example:
        >>> stream = PermutedStream(dataset="digits", num_tasks=3, batch_size=16)
        >>> stream.num_tasks, stream.num_classes, stream.input_dim
        (3, 10, 64)
        >>> batch = next(iter(stream.train_dataloader()))
        >>> batch["x"].shape, batch["y"].dtype, batch["task_id"][:3].tolist()
        (torch.Size([16, 64]), torch.int64, [0, 0, 0])
        >>> stream.set_task(2)
        >>> [len(loader.dataset) for loader in stream.test_dataloader()]
        [540, 540, 540]
    """

    def __init__(
        self,
        dataset: str = "digits",
        num_tasks: int = 5,
        root: str | Path | None = None,
        download: bool = False,
        batch_size: int = 64,
        seed: int = 0,
        val_fraction: float | None = None,
        num_workers: int = 0,
        flatten: bool = True,
        eval_batch_size: int | None = None,
        permute_first_task: bool = False,
        standardize: bool = False,
    ) -> None:
        super().__init__(
            dataset, num_tasks, root, download, batch_size, seed, val_fraction, num_workers,
            flatten, eval_batch_size, standardize,
        )  # fmt: skip
        self.permute_first_task = bool(permute_first_task)
        pixels = self.image_shape[1] * self.image_shape[2]
        g = torch.Generator().manual_seed(_derive_seed(self.seed, 3))
        perms = [torch.randperm(pixels, generator=g) for _ in range(self.num_tasks)]
        if not self.permute_first_task:
            perms[0] = torch.arange(pixels)
        self.permutations = torch.stack(perms)  # [num_tasks, H*W]: task t's pixel permutation

    def task_permutation(self, task: int) -> Tensor | None:
        perm = self.permutations[task]
        if not self.permute_first_task and task == 0:
            return None  # identity: skip the indexing
        return perm


class SplitStream(TaskStream):
    """Split digits/MNIST: task ``t`` holds classes ``class_order[t*k:(t+1)*k]``.

    With 10 classes and 5 tasks, ``k = 2``: ``(0, 1), (2, 3), ..., (8, 9)``. Labels keep their
    original 10-class values (a single shared head) unless ``relabel=True``, which maps them to
    ``0..k-1`` within each task (``num_classes`` becomes ``k``; a multi-head setting).

    Example:
        >>> stream = SplitStream(dataset="digits", num_tasks=5)
        >>> stream.task_classes(0), stream.task_classes(4), stream.num_classes
        ((0, 1), (8, 9), 10)
        >>> relabelled = SplitStream(num_tasks=5, relabel=True)
        >>> relabelled.num_classes, sorted(set(relabelled.task_dataset(3).fetch(
        ...     torch.arange(20))["y"].tolist()))
        (2, [0, 1])
    """

    def __init__(
        self,
        dataset: str = "digits",
        num_tasks: int = 5,
        root: str | Path | None = None,
        download: bool = False,
        batch_size: int = 64,
        seed: int = 0,
        val_fraction: float | None = None,
        num_workers: int = 0,
        flatten: bool = True,
        eval_batch_size: int | None = None,
        class_order: Sequence[int] | None = None,
        relabel: bool = False,
        standardize: bool = False,
    ) -> None:
        super().__init__(
            dataset, num_tasks, root, download, batch_size, seed, val_fraction, num_workers,
            flatten, eval_batch_size, standardize,
        )  # fmt: skip
        base = NUM_CLASSES[self.dataset]
        order = list(range(base)) if class_order is None else [int(c) for c in class_order]
        if sorted(order) != list(range(base)):
            raise ValueError(
                f"`class_order` must be a permutation of range({base}), got {class_order!r}"
            )
        if base % self.num_tasks:
            divisors = [d for d in range(1, base + 1) if base % d == 0]
            raise ValueError(
                f"`num_tasks` must divide the {base} classes of {self.dataset!r} evenly "
                f"(one of {divisors}), got {self.num_tasks}"
            )
        self.class_order = tuple(order)
        self.classes_per_task = base // self.num_tasks
        self.relabel = bool(relabel)

    @property
    def num_classes(self) -> int:
        return self.classes_per_task if self.relabel else NUM_CLASSES[self.dataset]

    def task_classes(self, task: int) -> tuple[int, ...]:
        """The original class labels of ``task``."""
        task = self._check_task("task", task)
        k = self.classes_per_task
        return self.class_order[task * k : (task + 1) * k]

    def task_indices(self, labels: Tensor, task: int) -> Tensor | None:
        classes = torch.tensor(self.task_classes(task), dtype=labels.dtype)
        return torch.isin(labels, classes).nonzero().flatten()

    def task_label_map(self, task: int) -> Tensor | None:
        if not self.relabel:
            return None
        table = torch.full((NUM_CLASSES[self.dataset],), -1, dtype=torch.long)
        table[list(self.task_classes(task))] = torch.arange(self.classes_per_task)
        return table


class RotatedStream(TaskStream):
    """Rotated digits/MNIST: task ``t`` rotates every image by ``angles[t]`` degrees.

    Angles default to ``num_tasks`` evenly spaced values from 0 to 180 (inclusive; positive is
    counter-clockwise). Each task's split is rotated once, with bilinear interpolation about the
    image centre, when first used.

    Example:
        >>> stream = RotatedStream(dataset="digits", num_tasks=5)
        >>> stream.angles
        (0.0, 45.0, 90.0, 135.0, 180.0)
        >>> RotatedStream(num_tasks=2, angles=[0, 30]).angles
        (0.0, 30.0)
    """

    def __init__(
        self,
        dataset: str = "digits",
        num_tasks: int = 5,
        root: str | Path | None = None,
        download: bool = False,
        batch_size: int = 64,
        seed: int = 0,
        val_fraction: float | None = None,
        num_workers: int = 0,
        flatten: bool = True,
        eval_batch_size: int | None = None,
        angles: Sequence[float] | None = None,
        standardize: bool = False,
    ) -> None:
        super().__init__(
            dataset, num_tasks, root, download, batch_size, seed, val_fraction, num_workers,
            flatten, eval_batch_size, standardize,
        )  # fmt: skip
        if angles is None:
            values = np.linspace(0.0, 180.0, self.num_tasks) if self.num_tasks > 1 else [0.0]
            self.angles = tuple(float(a) for a in values)
        else:
            self.angles = tuple(float(a) for a in angles)
            if len(self.angles) != self.num_tasks or not all(np.isfinite(self.angles)):
                raise ValueError(
                    f"`angles` must give one finite angle per task ({self.num_tasks}), "
                    f"got {list(angles)!r}"
                )

    def task_images(self, images: Tensor, task: int) -> Tensor:
        angle = self.angles[task]
        if angle % 360.0 == 0.0:
            return images
        from torchvision.transforms.functional import InterpolationMode, rotate

        return rotate(images, angle, interpolation=InterpolationMode.BILINEAR)
