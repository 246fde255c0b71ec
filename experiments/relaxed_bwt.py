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

from lightning_metagrad import MetaGradCallback, SubspacePredictor
from lightning_metagrad.benchmark.cli import format_scores, write_json
from lightning_metagrad.benchmark.config import add_config_arguments, config_dict, parse_config
from lightning_metagrad.benchmark.quiet import silence_lightning
from lightning_metagrad.benchmark.runner import run_method, summarise
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


def _run(config: Any, name: str, seed: int, spec: tuple[str, dict[str, Any]]) -> tuple[dict, Any]:
    """One seed of a configured predictor: the run and the predictor (after it)."""
    kind, kwargs = spec
    callback = MetaGradCallback(predictor=_PREDICTORS[kind](**kwargs))
    run = run_method(config, name, seed, callbacks=lambda: [callback])
    return run, callback.predictor


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", type=_variant, metavar="NAME[=JSON]")
    add_config_arguments(parser, preset="gpm-pmnist", exclude=("methods", "strengths"))
    parser.add_argument("--output", type=Path, default=Path("runs/relaxed"))
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config, args = parse_config(build_parser(), argv)
    silence_lightning()
    cfg = {**config_dict(config), "methods": [name for name, _ in args.variants]}
    cfg["variants"] = {name: spec for name, spec in args.variants if spec is not None}
    out: dict[str, Any] = {"config": cfg, "methods": {}}
    for name, spec in args.variants:
        runs, kept = [], []
        for seed in config.seeds:
            if spec is None:
                runs.append(run_method(config, name, seed))
                continue
            run, predictor = _run(config, name, seed, spec)
            runs.append(run)
            if isinstance(predictor, RelaxedSubspacePredictor):
                kept.append(predictor.kept_history)
        entry = out["methods"][name] = {"predictor": spec, **summarise(runs)}
        if kept:
            entry["kept"] = kept
        print(f"{name}: {format_scores(entry)}", flush=True)
    write_json(args.output, "results.json", out)
    return out


if __name__ == "__main__":
    main()
