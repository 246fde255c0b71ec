"""Run configured MetaGrad variants through the benchmark runner (docs/science.md).

The benchmark CLI runs methods by name; this script runs ``MetaGradCallback`` instances built
from a ``NAME=EXPRESSION`` list, on the same streams, seeds and runner, and writes a
``results.json`` of the same schema. Example (Fig. 1 protocol)::

    python benchmarks/variants.py --output runs/variants \\
        "replay-free1=MetaGradCallback(predictor=ReplayPredictor(free_below=1.0))"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import lightning_metagrad as lm
from lightning_metagrad.benchmark import BenchmarkConfig, runner
from lightning_metagrad.benchmark.runner import summarise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help="NAME=EXPRESSION over lightning_metagrad")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--root", default="../shared/data")
    parser.add_argument("--stream", default="permuted")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-split", choices=["test", "val"], default="test")
    parser.add_argument("--output", type=Path, default=Path("runs/variants"))
    args = parser.parse_args(argv)
    namespace: dict[str, Any] = {k: getattr(lm, k) for k in lm.__all__}
    variants = dict(v.split("=", 1) for v in args.variants)
    config = BenchmarkConfig(
        stream=args.stream, dataset=args.dataset, root=args.root, tasks=args.tasks,
        iters=args.iters, lr=args.lr, seeds=tuple(args.seeds), methods=("naive",),
        eval_every=400, eval_samples=500, eval_split=args.eval_split,
    )  # fmt: skip
    out: dict[str, Any] = {"config": {**vars(args), "output": str(args.output)}, "methods": {}}
    for name, expression in variants.items():
        # The runner builds a method's callbacks by name; give it this variant's instead.
        runner.make_callbacks = lambda _m, _s, e=expression: [eval(e, namespace)]
        runs = [runner.run_method(config, "naive", seed) for seed in args.seeds]
        out["methods"][name] = {"expression": expression, **summarise(runs)}
        entry = out["methods"][name]
        print(f"{name}: ACC {entry['acc']:.3f} ± {entry['acc_std']:.3f}  BWT {entry['bwt']:+.3f}")
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
