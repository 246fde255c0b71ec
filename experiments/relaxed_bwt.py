"""Issue 23, part 3: the CUBER-style relaxation against the default and GPM (docs/science.md).

Each positional argument is a method name of the benchmark (``metagrad``, ``gpm``, ...) or
``NAME=JSON``: ``MetaGradCallback(predictor=RelaxedSubspacePredictor(**JSON))``
(``NAME=subspace:JSON``: ``SubspacePredictor(**JSON)``). The experiment
options are those of ``metagrad-benchmark`` (``--preset gpm-pmnist`` by default). Writes a
``results.json`` of the benchmark's schema, plus per relaxed run the share of the in-subspace
gradient energy the rule kept, per task and matrix (``kept``). Example::

    python experiments/relaxed_bwt.py --dataset digits --eval-split val --seeds 0 1 2 \\
        --output experiments/results/relaxed/val metagrad gpm \\
        'relaxed={"agree": 0.0, "proximal": 1.0}'
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_metagrad import MetaGradCallback, SubspacePredictor
from lightning_metagrad.benchmark.cli import format_scores, write_json
from lightning_metagrad.benchmark.config import add_config_arguments, config_dict, parse_config
from lightning_metagrad.benchmark.quiet import silence_lightning
from lightning_metagrad.benchmark.runner import first_samples, run_method, summarise
from lightning_metagrad.predictors.relaxed import RelaxedSubspacePredictor


def _variant(text: str) -> tuple[str, tuple[str, dict[str, Any]] | None]:
    """``NAME`` (a method), ``NAME=JSON`` (relaxed) or ``NAME=subspace:JSON`` (the default's
    class with those arguments, e.g. ``{"in_basis": "sign"}``)."""
    if "=" not in text:
        return text, None
    name, spec = text.split("=", 1)
    kind = "relaxed"
    if spec.startswith("subspace:"):
        kind, spec = "subspace", spec[len("subspace:") :]
    try:
        kwargs = json.loads(spec)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{name}: {err}") from None
    if not isinstance(kwargs, dict):
        raise argparse.ArgumentTypeError(f"{name}: a JSON object, got {spec!r}")
    _PREDICTORS[kind](**kwargs)  # refuse bad settings before any run
    return name, (kind, kwargs)


_PREDICTORS: dict[str, type[SubspacePredictor]] = {
    "relaxed": RelaxedSubspacePredictor,
    "subspace": SubspacePredictor,
}


class OldTaskProbe(Callback):
    """Diagnostic, every ``every`` steps of task 2 on: the old tasks' true mean gradient ``o``
    at the current weights (on ``samples`` training images of each old task; data the method
    never sees), and the step's gradient after the rule, ``a``. Per task it sums, over the
    probed steps and weight matrices, ``<a_in, o>`` and ``<a_out, o>`` (``a``'s parts inside
    and outside the protected basis: positive means the step lowers the old tasks' loss to
    first order), averages the cosine of the relaxed predictor's reference with ``o``'s
    coordinates (``cos``; with ``outside=True`` also of its part outside the basis with ``o``'s,
    ``cos_out``), and sums the probed steps' actual change of the old tasks' loss and
    its first-order prediction (plain SGD)."""

    def __init__(self, stream: Any, predictor: SubspacePredictor, every: int, samples: int) -> None:
        self.stream, self.predictor, self.every, self.samples = stream, predictor, every, samples
        self.task = -1
        self.data: list[tuple[Tensor, Tensor]] = []
        self.rows: list[dict[str, float]] = []
        self._before: float | None = None

    @torch.no_grad()
    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        """The probed step's actual change of the old tasks' loss (``actual``), next to its
        first-order prediction ``-lr <a, o>`` (``first``)."""
        if self._before is None:
            return
        losses = [nn.functional.cross_entropy(pl_module(x), y) for x, y in self.data]
        self.rows[-1]["actual"] += float(torch.stack(losses).mean()) - self._before
        self._before = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.task += 1
        if self.task >= 1:
            self.data.append(first_samples(self.stream, self.task - 1, self.samples))
            keys = ("in", "out", "cos", "cos_out", "first", "actual", "n")
            self.rows.append(dict.fromkeys(keys, 0.0))
            self.rows[-1]["task"] = self.task

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.task < 1 or trainer.global_step % self.every:
            return
        params = dict(pl_module.named_parameters())
        names = [n for n in self.predictor.subspace_dims() if params[n].grad is not None]
        with torch.enable_grad():
            losses = [nn.functional.cross_entropy(pl_module(x), y) for x, y in self.data]
            grads = torch.autograd.grad(torch.stack(losses).mean(), [params[n] for n in names])
        row = self.rows[-1]
        ref = getattr(self.predictor, "_ref", {})
        ref_out = getattr(self.predictor, "_ref_out", {})
        lr = float(optimizer.param_groups[0]["lr"])
        self._before = float(torch.stack(losses).mean())
        for name, old in zip(names, grads):
            m = self.predictor.basis(name)
            if m.shape[0] != old[0].numel():
                continue  # (a bias column: not probed)
            a = params[name].grad.reshape(old.shape[0], -1)
            o = old.reshape(old.shape[0], -1)
            a_in = (a @ m) @ m.T
            row["in"] += float((a_in * o).sum())
            row["out"] += float(((a - a_in) * o).sum())
            row["first"] -= lr * float((a * o).sum())  # SGD: the step is -lr a
            r = ref.get(name)
            if r is not None and r.shape[1] == m.shape[1] and float(r.norm()) > 0:
                oc = o @ m
                row["cos"] += float((r * oc).sum() / (r.norm() * oc.norm()).clamp_min(1e-30))
            r = ref_out.get(name)
            if r is not None and r.shape == o.shape and float(r.norm()) > 0:
                oo = o - (o @ m) @ m.T
                row["cos_out"] += float((r * oo).sum() / (r.norm() * oo.norm()).clamp_min(1e-30))
        row["n"] += 1


def _run(
    config: Any, name: str, seed: int, spec: tuple[str, dict[str, Any]], probe_every: int
) -> tuple[dict, Any, list[dict[str, float]]]:
    """One seed of a configured predictor: the run, the predictor after it, the probe's rows."""
    kind, kwargs = spec
    predictor = _PREDICTORS[kind](**kwargs)
    callback = MetaGradCallback(predictor=predictor)
    probes: list[OldTaskProbe] = []

    def make_probes(stream: Any, model: Any, callbacks: Any) -> list[Callback]:
        if probe_every:
            probes.append(OldTaskProbe(stream, predictor, probe_every, samples=200))
        return list(probes)

    run = run_method(config, name, seed, probes=make_probes, callbacks=lambda: [callback])
    return run, predictor, probes[0].rows if probes else []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", type=_variant, metavar="NAME[=JSON]")
    add_config_arguments(parser, preset="gpm-pmnist", exclude=("methods", "strengths"))
    parser.add_argument("--output", type=Path, default=Path("runs/relaxed"))
    parser.add_argument(
        "--probe-every",
        type=int,
        default=0,
        metavar="N",
        help="diagnostic (OldTaskProbe) every N steps for configured predictors; 0: off",
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config, args = parse_config(build_parser(), argv)
    silence_lightning()
    cfg = {**config_dict(config), "methods": [name for name, _ in args.variants]}
    cfg["variants"] = {name: spec for name, spec in args.variants if spec is not None}
    out: dict[str, Any] = {"config": cfg, "methods": {}}
    for name, spec in args.variants:
        runs, kept, probed = [], [], []
        for seed in config.seeds:
            if spec is None:
                runs.append(run_method(config, name, seed))
                continue
            run, predictor, rows = _run(config, name, seed, spec, args.probe_every)
            runs.append(run)
            probed.append(rows)
            if isinstance(predictor, RelaxedSubspacePredictor):
                kept.append(predictor.kept_history)
        entry = out["methods"][name] = {"predictor": spec, **summarise(runs)}
        if kept:
            entry["kept"] = kept
        if args.probe_every:
            entry["probe"] = probed
        print(f"{name}: {format_scores(entry)}", flush=True)
    write_json(args.output, "results.json", out)
    return out


if __name__ == "__main__":
    main()
