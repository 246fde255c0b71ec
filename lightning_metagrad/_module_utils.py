"""Small Lightning helpers shared by the callbacks (private)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.optimizer import _configure_optimizers
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor


def several_optimizers_message(name: str, count: int) -> str:
    return (
        f"{name} supports exactly one optimizer, got {count}. Return a single optimizer from "
        "`configure_optimizers` (use parameter groups for per-module settings)."
    )


def loss_of(output: Any) -> Tensor | None:
    """The loss tensor of a ``training_step`` output (a tensor, ``{"loss": ...}`` or None)."""
    if output is None or isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    raise TypeError(
        "`training_step` must return a loss tensor, a dict with a 'loss' tensor, or None to "
        f"be used for the importance estimate; got {type(output).__name__}."
    )


@contextlib.contextmanager
def quiet_eval(pl_module: pl.LightningModule) -> Iterator[None]:
    """Eval mode, ``self.log`` / ``self.log_dict`` as no-ops and isolated RNG, all restored after.

    Eval mode keeps dropout off and BatchNorm statistics untouched; the RNG isolation keeps
    the data order and dropout masks of later training identical to a run without the callback.
    """
    modes = {m: m.training for m in pl_module.modules()}
    include_cuda = pl_module.device.type == "cuda"

    def _no_log(*args: Any, **kwargs: Any) -> None:
        return None

    pl_module.eval()
    # Instance attributes shadow the methods; `del` brings the class methods back.
    object.__setattr__(pl_module, "log", _no_log)
    object.__setattr__(pl_module, "log_dict", _no_log)
    try:
        with isolate_rng(include_cuda=include_cuda), torch.enable_grad():
            yield
    finally:
        object.__delattr__(pl_module, "log")
        object.__delattr__(pl_module, "log_dict")
        for module, mode in modes.items():
            module.training = mode


def count_optimizers(pl_module: pl.LightningModule) -> int | None:
    """How many optimizers ``configure_optimizers`` returns, or None if it cannot be told yet."""
    try:
        optimizers, _, _ = _configure_optimizers(pl_module.configure_optimizers())  # type: ignore[arg-type]
    except Exception:  # Lightning reports a broken configure_optimizers itself, later.
        return None
    return len(optimizers)
