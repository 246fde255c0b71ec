"""AdamW done right (issue 24, part 2): three ways to give MetaGrad's projection to AdamW,
measured on the text benchmark (:mod:`lightning_metagrad.benchmark.text`) next to the baselines.

* ``metagrad-gradient``: ``MetaGradCallback(target="gradient")``: the projected gradient goes
  into ``p.grad``, so both of Adam's moments see it;
* ``metagrad`` (the default; for AdamW it resolves to ``target="update"``): the update AdamW
  applied is projected after its step (the predictor learns update vectors);
* ``metagrad-first-moment``: the repair of arXiv 2604.22407, prototyped here without a new
  optimizer (:class:`FirstMomentRouting`): the predictor learns from the raw gradient
  (``target="gradient"``), the projected gradient ``g_p`` goes to the first moment only and
  the second moment keeps the raw ``g``. Before ``optimizer.step()``, with ``p.grad = g``::

      exp_avg += (1 - beta1) / beta1 * (g_p - g)

  so that AdamW's own ``m = beta1 * m + (1 - beta1) * g`` gives ``beta1 * m_old +
  (1 - beta1) * g_p``, while ``v = beta2 * v + (1 - beta2) * g**2`` keeps the raw gradient.
  AdamW's decoupled weight decay acts on the parameters, not on ``g``, so it is untouched
  (Adam's L2 ``weight_decay`` adds ``wd * p`` to both moments' input, also untouched).

Run (about 30 minutes on one loaded CPU core; results in experiments/results/text/)::

    python experiments/text_adamw.py --out experiments/results/text

Tiny settings (a minute): ``--preset text-tiny --out /tmp/text-adamw``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_metagrad import MetaGradCallback
from lightning_metagrad.benchmark.quiet import silence_lightning
from lightning_metagrad.benchmark.text import (
    PRESETS,
    TEXT_METHODS,
    TextBenchmarkConfig,
    format_text_table,
    run_text_benchmark,
)

ADAMW_VARIANTS = ("metagrad-gradient", "metagrad", "metagrad-first-moment")


def _init_adam_state(optimizer: torch.optim.Optimizer, p: Tensor, group: dict[str, Any]) -> None:
    """What torch's Adam/AdamW does lazily at a parameter's first step (non-fused,
    non-capturable layout: a CPU float32 ``step``), done now so ``exp_avg`` can be adjusted."""
    state = optimizer.state[p]
    if group.get("fused") or group.get("capturable"):
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    else:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if group.get("amsgrad"):
        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class _Hook(Callback):
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.fn(optimizer)


class FirstMomentRouting:
    """MetaGrad's projected gradient into Adam's first moment only; the second moment keeps
    the raw gradient. Use ``callbacks=routing.callbacks()``: a hook that copies the raw
    gradients of the tensors the rule will rewrite, the ``MetaGradCallback(target="gradient")``
    (learns from the raw gradient, projects ``.grad`` in place), and a hook that moves the
    projection's change into ``exp_avg`` and restores the raw gradient."""

    def __init__(self, metagrad: MetaGradCallback | None = None) -> None:
        self.metagrad = metagrad if metagrad is not None else MetaGradCallback(target="gradient")
        if self.metagrad.target != "gradient":
            raise ValueError(
                "FirstMomentRouting needs MetaGradCallback(target='gradient'), got "
                f"target={self.metagrad.target!r}"
            )
        self._raw: dict[str, Tensor] = {}

    def callbacks(self) -> list[Callback]:
        return [_Hook(self._save), self.metagrad, _Hook(self._route)]

    def _save(self, optimizer: torch.optim.Optimizer) -> None:
        engine = self.metagrad.engine
        self._raw = {}
        names = [n for n, p in engine.params.items() if p.requires_grad and p.grad is not None]
        grads = [engine.params[n].grad for n in names]
        for i in engine.protected(names, grads):  # type: ignore[arg-type]
            self._raw[names[i]] = grads[i].detach().clone()  # type: ignore[union-attr]

    @torch.no_grad()
    def _route(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._raw:
            return
        groups = {p: g for g in optimizer.param_groups for p in g["params"]}
        engine = self.metagrad.engine
        for name, raw in self._raw.items():
            p = engine.params[name]
            group = groups.get(p)
            if group is None or p.grad is None:
                continue
            beta1 = float(group["betas"][0])
            if not 0.0 < beta1 < 1.0:
                raise ValueError(
                    f"FirstMomentRouting needs Adam's beta1 in (0, 1) (the first moment is "
                    f"adjusted through it), got betas={group['betas']}"
                )
            state = optimizer.state[p]
            if not state:  # a fresh optimizer (each fit makes one): initialise as Adam does
                _init_adam_state(optimizer, p, group)
            delta = p.grad.sub(raw)  # g_p - g
            state["exp_avg"].add_(delta, alpha=(1.0 - beta1) / beta1)
            p.grad.copy_(raw)
        self._raw = {}


def first_moment_callbacks() -> list[Callback]:
    return FirstMomentRouting().callbacks()


def check_routing() -> None:
    """The adjustment gives m = b1 m + (1 - b1) g_p and v from the raw g (one AdamW step,
    done by hand, against AdamW's own step with the adjusted state)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.01)
    for _ in range(2):
        p.grad = torch.randn(5)
        opt.step()
    m0, v0 = opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()
    g, g_p = torch.randn(5), torch.randn(5)
    opt.state[p]["exp_avg"].add_(g_p - g, alpha=0.1 / 0.9)
    p.grad = g.clone()
    opt.step()
    assert torch.allclose(opt.state[p]["exp_avg"], 0.9 * m0 + 0.1 * g_p, atol=1e-6)
    assert torch.allclose(opt.state[p]["exp_avg_sq"], 0.99 * v0 + 0.01 * g * g, atol=1e-6)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="text")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/text"))
    parser.add_argument(
        "--timing",
        action="store_true",
        help="the step-time pass: domains python then prose only (the ratio is measured on "
        "the second), writes timing.json; --steps 100 is enough",
    )
    args = parser.parse_args(argv)
    check_routing()
    silence_lightning()
    values = dict(PRESETS[args.preset])
    if args.seeds is not None:
        values["seeds"] = tuple(args.seeds)
    if args.steps is not None:
        values["steps"] = args.steps
    if args.timing:
        values["domains"] = ("python", "prose")
    config = TextBenchmarkConfig(methods=(*TEXT_METHODS, "metagrad-gradient"), **values)

    def progress(method: str, seed: int) -> None:
        print(f"  done: {method} seed {seed}", file=sys.stderr, flush=True)

    results = run_text_benchmark(
        config, extra={"metagrad-first-moment": first_moment_callbacks}, progress=progress
    )
    args.out.mkdir(parents=True, exist_ok=True)
    name = "timing.json" if args.timing else "results.json"
    (args.out / name).write_text(json.dumps(results, indent=1))
    if (args.out / "results.json").exists() and (args.out / "timing.json").exists():
        results = merge_timing(
            json.loads((args.out / "results.json").read_text()),
            json.loads((args.out / "timing.json").read_text()),
        )
    return write_tables(results, args.out)


def merge_timing(results: dict[str, Any], timing: dict[str, Any]) -> dict[str, Any]:
    """The loss figures of ``results`` with the step-time ratios of the timing pass."""
    methods = {}
    for name, entry in results["methods"].items():
        timed = timing["methods"].get(name, {})
        keys = (
            "step_ms",
            "step_ratio",
            "step_ratio_std",
            "step_cpu_ms",
            "cpu_ratio",
            "cpu_ratio_std",
        )
        methods[name] = {**entry, **{k: timed[k] for k in keys if k in timed}}
    return {**results, "methods": methods}


def write_tables(results: dict[str, Any], out: Path) -> dict[str, Any]:
    methods = results["methods"]
    main_table = {**results, "methods": {m: methods[m] for m in TEXT_METHODS}}
    adamw = {**results, "methods": {m: methods[m] for m in ("naive", *ADAMW_VARIANTS)}}
    text = (
        "## All methods\n\n"
        + format_text_table(main_table)
        + "\n\n## AdamW variants\n\n"
        + format_text_table(adamw)
        + "\n"
    )
    (out / "tables.md").write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
