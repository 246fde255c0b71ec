"""Base image datasets held in memory as float tensors, with deterministic train/val/test splits.

``"digits"`` (scikit-learn's bundled 8x8 handwritten digits, no download) is the default;
``"mnist"`` and ``"fashion_mnist"`` are read with torchvision from ``root``. ``DATASETS``
names them all.

Example:
    >>> from lightning_metagrad.data import DATASETS
    >>> DATASETS
    ('digits', 'mnist', 'fashion_mnist')
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import Tensor

from lightning_metagrad._validation import check_choice, check_float

DATASETS = ("digits", "mnist", "fashion_mnist")

#: ``name -> (channels, height, width)``
IMAGE_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
}
NUM_CLASSES: dict[str, int] = {"digits": 10, "mnist": 10, "fashion_mnist": 10}

#: Fraction of the non-test data held out for validation when ``val_fraction`` is None:
#: digits -> 60/10/30 train/val/test overall; MNIST-like -> the classic 55000/5000/10000.
DEFAULT_VAL_FRACTION: dict[str, float] = {
    "digits": 1 / 7,
    "mnist": 1 / 12,
    "fashion_mnist": 1 / 12,
}
#: The digits set has no official test split: 30% of it (stratified) is the test split.
DIGITS_TEST_FRACTION = 0.3
#: The data splits never depend on a stream's ``seed``: the same test set for every run.
SPLIT_SEED = 0

_TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class Split:
    """One split: images ``x`` (float32 ``[N, C, H, W]`` in [0, 1]) and labels ``y`` (int64).

    Example:
        >>> split = Split(torch.zeros(4, 1, 8, 8), torch.arange(4))
        >>> len(split), split.x.shape
        (4, torch.Size([4, 1, 8, 8]))
    """

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class DatasetSplits:
    """The ``train``, ``val`` and ``test`` splits of one base dataset.

    Example:
        >>> splits = load_splits("digits")
        >>> splits["test"] is splits.test, len(splits["val"])
        (True, 180)
    """

    train: Split
    val: Split
    test: Split

    def __getitem__(self, split: str) -> Split:
        if split not in ("train", "val", "test"):
            raise ValueError(f"`split` must be 'train', 'val' or 'test', got {split!r}")
        out: Split = getattr(self, split)
        return out


def check_dataset_args(
    dataset: str, root: str | Path | None, download: bool, val_fraction: float | None
) -> None:
    """Eager argument checks (ValueError naming the argument; FileNotFoundError for files)."""
    check_choice("dataset", dataset, DATASETS)
    check_float("val_fraction", val_fraction, minimum=0, maximum=1, high_open=True, optional=True)
    if dataset == "digits":
        return
    if root is None:
        raise ValueError(
            f"`root` is required for dataset {dataset!r}: the folder that holds (or will hold, "
            f"with `download=True`) torchvision's {_TORCHVISION_FOLDERS[dataset]}/ directory"
        )
    if not download:
        raw = Path(root) / _TORCHVISION_FOLDERS[dataset] / "raw"
        missing = [name for name in _RAW_FILES if not (raw / name).is_file()]
        if missing:
            raise FileNotFoundError(_missing_message(dataset, root, raw, missing))


def _missing_message(dataset: str, root: str | Path, raw: Path, missing: list[str]) -> str:
    return (
        f"{dataset!r} not found under `root`={str(root)!r}: expected torchvision's files in "
        f"{raw} (missing: {', '.join(missing)}). Pass `download=True` (the benchmark's "
        "`--download`) to download them, or point `root` (`--root`) at the folder that "
        f"contains the {_TORCHVISION_FOLDERS[dataset]}/ directory."
    )


def scalar_stats(x: Tensor) -> tuple[float, float]:
    """``(mean, std)`` of every value of ``x``: one scalar each, as GPM's
    ``Normalize((0.1307,), (0.3081,))`` for MNIST. A scalar pair is unchanged by pixel
    permutations, so every Permuted task shares it.

    Example:
        >>> scalar_stats(torch.tensor([0.0, 1.0, 2.0, 3.0]))
        (1.5, 1.118033988749895)
        >>> scalar_stats(torch.zeros(3))
        Traceback (most recent call last):
            ...
        ValueError: cannot standardise constant inputs (std 0); turn standardisation off
    """
    values = x.detach().double()
    mean, std = float(values.mean()), float(values.std(unbiased=False))
    if not std > 0:
        raise ValueError("cannot standardise constant inputs (std 0); turn standardisation off")
    return mean, std


def load_splits(
    dataset: str,
    root: str | Path | None = None,
    download: bool = False,
    val_fraction: float | None = None,
) -> DatasetSplits:
    """Load ``dataset`` into memory and split it deterministically (independent of any seed).

    Example:
        >>> splits = load_splits("digits")
        >>> len(splits.train), len(splits.val), len(splits.test)
        (1077, 180, 540)
        >>> splits.train.x.shape[1:], float(splits.train.x.max())
        (torch.Size([1, 8, 8]), 1.0)
    """
    check_dataset_args(dataset, root, download, val_fraction)
    fraction = DEFAULT_VAL_FRACTION[dataset] if val_fraction is None else float(val_fraction)
    if dataset == "digits":
        x, y = _load_digits()
        rest, test = _stratified_split(y, DIGITS_TEST_FRACTION)
        train_pool_x, train_pool_y, test_split = x[rest], y[rest], Split(x[test], y[test])
    else:
        folder = cast("str | Path", root)  # check_dataset_args: not None here
        train_pool_x, train_pool_y = _load_torchvision(dataset, folder, download, train=True)
        test_split = Split(*_load_torchvision(dataset, folder, download, train=False))
    train, val = _stratified_split(train_pool_y, fraction)
    return DatasetSplits(
        train=Split(train_pool_x[train], train_pool_y[train]),
        val=Split(train_pool_x[val], train_pool_y[val]),
        test=test_split,
    )


def _load_digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.as_tensor(images, dtype=torch.float32).div_(16.0).reshape(-1, 1, 8, 8)
    return x.contiguous(), torch.as_tensor(labels, dtype=torch.long)


def _load_torchvision(
    dataset: str, root: str | Path, download: bool, train: bool
) -> tuple[Tensor, Tensor]:
    from torchvision import datasets

    cls = datasets.MNIST if dataset == "mnist" else datasets.FashionMNIST
    raw = Path(root) / _TORCHVISION_FOLDERS[dataset] / "raw"
    try:
        ds = cls(root=str(root), train=train, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found. You can use download=True"
        if download:  # the download itself failed (offline?)
            raise FileNotFoundError(
                f"could not download {dataset!r} into `root`={str(root)!r} ({err}); without a "
                f"network, copy torchvision's files ({', '.join(_RAW_FILES)}) into {raw}"
            ) from err
        raise FileNotFoundError(_missing_message(dataset, root, raw, list(_RAW_FILES))) from err
    x = ds.data.to(torch.float32).div_(255.0).unsqueeze(1)
    return x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long)


def _stratified_split(y: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """Indices ``(keep, held_out)`` with ``fraction`` of ``y`` held out, stratified by class."""
    index = np.arange(len(y))
    if fraction <= 0.0:
        return torch.as_tensor(index), torch.zeros(0, dtype=torch.long)
    from sklearn.model_selection import train_test_split

    keep, held = train_test_split(
        index, test_size=fraction, random_state=SPLIT_SEED, stratify=y.numpy()
    )
    return torch.as_tensor(np.sort(keep)), torch.as_tensor(np.sort(held))
