"""Run configured MetaGrad variants through the benchmark runner (docs/science.md).

The benchmark CLI runs methods by name; this script runs callbacks configured on the command
line, ``NAME=SPEC`` with SPEC a constructor call over the package's public classes (parsed by
``lightning_metagrad.benchmark.variants``, never evaluated), or a method name alone, on the
same streams, seeds and runner, and writes a ``results.json`` of the same schema. The
experiment options are those of ``metagrad-benchmark`` (``--preset fig1``, the paper's Fig. 1
protocol, by default). Example::

    python experiments/variants.py --output runs/variants \\
        "replay-free1=MetaGradCallback(predictor=ReplayPredictor(free_below=1.0))"
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lightning_metagrad.benchmark.cli import format_scores, write_json
from lightning_metagrad.benchmark.config import add_config_arguments, config_dict, parse_config
from lightning_metagrad.benchmark.quiet import silence_lightning
from lightning_metagrad.benchmark.runner import CallbackFactory, run_method, summarise
from lightning_metagrad.benchmark.variants import parse_variant


def _variant(text: str) -> tuple[str, str, CallbackFactory]:
    try:
        return parse_variant(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "variants", nargs="+", type=_variant, metavar="NAME=SPEC", help="or a method name"
    )
    add_config_arguments(parser, preset="fig1", exclude=("methods", "strengths"))
    parser.add_argument("--output", type=Path, default=Path("runs/variants"))
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config, args = parse_config(build_parser(), argv)
    silence_lightning()
    names = [name for name, _, _ in args.variants]
    texts = [name if spec == name else f"{name}={spec}" for name, spec, _ in args.variants]
    cfg = {**config_dict(config), "methods": names, "variants": texts}
    out: dict[str, Any] = {"config": cfg, "methods": {}}
    for name, spec, factory in args.variants:
        runs = [run_method(config, name, seed, callbacks=factory) for seed in config.seeds]
        entry = out["methods"][name] = {"expression": spec, **summarise(runs)}
        print(f"{name}: {format_scores(entry)}")
    write_json(args.output, "results.json", out)
    return out


if __name__ == "__main__":
    main()
