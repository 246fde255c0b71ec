"""Continual fine-tuning on real text, no download: a byte-level GPT trained on one domain after
another (the standard library's Python source, the English help texts of ``pydoc_data``,
CPython's license text; see :mod:`lightning_metagrad.data.text`), with AdamW under
``precision="bf16-mixed"``, one ``trainer.fit`` per domain, each method a list of callbacks.

It reports, per method and over seeds: each earlier domain's test-loss increase after the last
domain (forgetting, in nats per byte), the final mean test loss over all domains and its
perplexity, and the median training-step time against plain training (``naive``) on the
domains after the first (where the methods act).

Run it with ``python -m lightning_metagrad.benchmark.text`` (``--help`` for the options; it
prints a table and writes ``results.json``). It is a separate entry point from
``metagrad-benchmark``, whose presets describe image streams and accuracy.

Example:
    >>> config = TextBenchmarkConfig(domains=("prose", "licenses"), steps=6, seeds=(0,),
    ...                              methods=("naive",), d_model=16, layers=1, test_windows=4)
    >>> results = run_text_benchmark(config)
    >>> entry = results["methods"]["naive"]
    >>> len(entry["loss_matrix"]), sorted(entry["forgetting"])
    (2, ['prose'])
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_metagrad.benchmark.methods import make_callbacks, method_specs
from lightning_metagrad.benchmark.quiet import quiet_trainer_kwargs, silence_lightning
from lightning_metagrad.data.text import (
    DOMAINS,
    TextDomain,
    eval_loader,
    load_domains,
    train_loader,
)

__all__ = [
    "TEXT_METHODS",
    "TEXT_VARIANTS",
    "ByteGPT",
    "StepClock",
    "TextBenchmarkConfig",
    "format_text_table",
    "main",
    "run_text_benchmark",
    "run_text_method",
    "summarise_text",
]

#: The methods the text benchmark runs by default (names of the benchmark's registry).
TEXT_METHODS = ("naive", "metagrad", "gpm", "ewc", "online-ewc", "mas", "er", "agem")
#: Further names: a registry method with fixed keyword arguments.
TEXT_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "metagrad-gradient": ("metagrad", {"target": "gradient"}),
    "metagrad-update": ("metagrad", {"target": "update"}),
}
#: Steps of each domain left out of the step time (warm-up).
WARMUP_STEPS = 5


class StepClock(Callback):
    """Each training step's wall time and the main thread's CPU time (``time.thread_time``),
    from batch start to batch end (put it first). With ``torch.set_num_threads(1)`` the
    thread's CPU time is the step's compute, whatever else the machine runs; wall time is not.

    Example:
        >>> clock = StepClock()
        >>> clock.on_train_batch_start()
        >>> clock.on_train_batch_end()
        >>> len(clock.wall), len(clock.cpu)
        (1, 1)
    """

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._start = (0.0, 0.0)

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = (time.perf_counter(), time.thread_time())

    def on_train_batch_end(self, *args: Any) -> None:
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.thread_time() - self._start[1])


class _Block(nn.Module):
    """Pre-norm Transformer block with plain ``nn.Linear`` layers (so GPM protects them)."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attention.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class ByteGPT(pl.LightningModule):
    """A small causal Transformer over bytes (vocabulary 256), trained with AdamW.

    Takes dict batches ``{"x", "y"}`` of int64 byte windows (``y`` is ``x`` shifted by one);
    ``forward(x)`` returns the logits ``[batch, time, 256]``. Knows nothing of continual
    learning.

    Example:
        >>> model = ByteGPT(d_model=16, layers=1, heads=2, context=8)
        >>> model(torch.zeros(2, 8, dtype=torch.long)).shape
        torch.Size([2, 8, 256])
    """

    def __init__(
        self,
        d_model: int = 64,
        layers: int = 2,
        heads: int = 4,
        context: int = 64,
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"`d_model` ({d_model}) must be a multiple of `heads` ({heads})")
        self.save_hyperparameters()
        self.tok = nn.Embedding(256, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.Sequential(*[_Block(d_model, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device)
        return self.head(self.ln(self.blocks(self.tok(x) + self.pos(positions))))

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self(batch["x"])
        return F.cross_entropy(logits.float().flatten(0, 1), batch["y"].flatten())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        h = self.hparams
        return torch.optim.AdamW(
            self.parameters(), lr=h["lr"], weight_decay=h["weight_decay"], betas=h["betas"]
        )

    @torch.no_grad()
    def test_loss(self, loader: Any) -> float:
        """Mean next-byte cross-entropy (nats) over ``loader``, in full precision, eval mode
        (restored afterwards)."""
        was_training = self.training
        self.eval()
        total, count = 0.0, 0
        for batch in loader:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            logits = self(batch["x"]).float()
            total += float(
                F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten(), reduction="sum")
            )
            count += batch["y"].numel()
        self.train(was_training)
        return total / count


@dataclass
class TextBenchmarkConfig:
    """Everything a text-benchmark run depends on (stored in ``results.json``).

    Example:
        >>> TextBenchmarkConfig(domains=("prose",))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: `domains` must name at least 2 of ('python', ...), got ('prose',)
    """

    domains: Sequence[str] = DOMAINS
    steps: int = 200  # optimizer steps per domain
    batch_size: int = 16
    context: int = 64
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    lr: float = 2e-3
    weight_decay: float = 0.01
    precision: str = "bf16-mixed"
    methods: Sequence[str] = TEXT_METHODS
    seeds: Sequence[int] = (0, 1, 2)
    max_train_bytes: int = 1 << 19
    max_test_bytes: int = 1 << 15
    test_windows: int = 512  # test windows per domain (at most)
    threads: int = 1  # torch.set_num_threads during the run (0: leave it)
    method_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.domains, self.methods, self.seeds = (
            tuple(self.domains),
            tuple(self.methods),
            tuple(self.seeds),
        )
        if len(self.domains) < 2 or any(d not in DOMAINS for d in self.domains):
            raise ValueError(f"`domains` must name at least 2 of {DOMAINS}, got {self.domains}")
        for name in ("steps", "batch_size", "context", "d_model", "layers", "heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        if self.steps <= WARMUP_STEPS:
            raise ValueError(f"`steps` must be > {WARMUP_STEPS} (warm-up steps), got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"`lr` must be > 0, got {self.lr}")
        known = set(method_specs()) | set(TEXT_VARIANTS)
        unknown = [m for m in self.methods if m not in known]
        if unknown or not self.methods:
            raise ValueError(f"`methods` must name some of {sorted(known)}, got {self.methods}")
        if not self.seeds:
            raise ValueError("`seeds` must name at least one seed")


CallbackFactory = Callable[[], list[Callback]]


def _callbacks(config: TextBenchmarkConfig, method: str) -> list[Callback]:
    name, kwargs = TEXT_VARIANTS.get(method, (method, {}))
    kwargs = {**kwargs, **config.method_kwargs.get(method, {})}
    return make_callbacks(name, None, kwargs)


def run_text_method(
    config: TextBenchmarkConfig,
    method: str,
    seed: int,
    callbacks: CallbackFactory | None = None,
    domains: Sequence[TextDomain] | None = None,
) -> dict[str, Any]:
    """Train one method on the domains in order, one ``fit`` each; return its loss matrix
    ``L[i][j]`` (test loss on domain j after training domain i), the initial losses and the
    median step time (ms) of each domain.

    ``callbacks()`` makes the method's callbacks (once, before the first domain); without it
    they come from the registry by ``method``'s name.
    """
    if domains is None:
        domains = load_domains(
            config.domains,
            max_train_bytes=config.max_train_bytes,
            max_test_bytes=config.max_test_bytes,
        )
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        pl.seed_everything(seed, verbose=False)
        model = ByteGPT(
            config.d_model,
            config.layers,
            config.heads,
            config.context,
            config.lr,
            config.weight_decay,
        )
        tests = [
            eval_loader(d, context=config.context, max_windows=config.test_windows) for d in domains
        ]
        initial = [model.test_loss(t) for t in tests]
        method_callbacks = (
            list(callbacks()) if callbacks is not None else _callbacks(config, method)
        )
        matrix: list[list[float]] = []
        step_ms: list[float] = []
        cpu_ms: list[float] = []
        for index, domain in enumerate(domains):
            timer = StepClock()
            trainer = pl.Trainer(
                max_steps=config.steps,
                accelerator="cpu",
                devices=1,
                precision=config.precision,  # type: ignore[arg-type]
                callbacks=[timer, *method_callbacks],
                num_sanity_val_steps=0,
                limit_val_batches=0,
                **quiet_trainer_kwargs(),
            )
            loader = train_loader(
                domain,
                context=config.context,
                batch_size=config.batch_size,
                steps=config.steps,
                seed=seed * 1000 + index,
            )
            trainer.fit(model, train_dataloaders=loader)
            step_ms.append(1000 * statistics.median(timer.wall[WARMUP_STEPS:]))
            cpu_ms.append(1000 * statistics.median(timer.cpu[WARMUP_STEPS:]))
            matrix.append([model.test_loss(t) for t in tests])
    finally:
        torch.set_num_threads(threads)
    return {
        "seed": seed,
        "loss_matrix": matrix,
        "initial_loss": initial,
        "step_ms": step_ms,
        "step_cpu_ms": cpu_ms,
    }


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = list(values)
    if not all(math.isfinite(v) for v in values):
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise_text(
    runs: list[dict[str, Any]], domains: Sequence[str], plain: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """One method's entry of ``results.json`` from its per-seed runs.

    ``forgetting[d]``: domain d's test loss after the last domain minus right after training
    on it (nats per byte; > 0 forgets), for every domain but the last; ``final_loss``: the
    mean test loss over all domains after the last, ``final_perplexity`` its ``exp``;
    ``step_ratio`` (wall time) and ``cpu_ratio`` (the thread's CPU time, robust to a busy
    machine): this method's median step time over plain training's (``plain``, the same
    seeds' runs of ``naive``) on the domains after the first, per seed then averaged.

    Example:
        >>> run = {"seed": 0, "loss_matrix": [[1.0, 3.0], [1.5, 2.0]], "initial_loss": [5.5, 5.5],
        ...        "step_ms": [10.0, 12.0], "step_cpu_ms": [9.0, 11.0]}
        >>> plain = {**run, "step_ms": [10.0, 10.0], "step_cpu_ms": [9.0, 10.0]}
        >>> entry = summarise_text([run], ["a", "b"], plain=[plain])
        >>> entry["forgetting"]["a"], entry["final_loss"], round(entry["step_ratio"], 2)
        (0.5, 1.75, 1.2)
        >>> round(entry["cpu_ratio"], 2)
        1.1
    """
    last = len(domains) - 1
    forgetting: dict[str, float] = {}
    forgetting_std: dict[str, float] = {}
    for j, name in enumerate(domains[:-1]):
        values = [r["loss_matrix"][last][j] - r["loss_matrix"][j][j] for r in runs]
        forgetting[name], forgetting_std[name] = _mean_std(values)
    finals = [statistics.fmean(r["loss_matrix"][last]) for r in runs]
    mean_forgetting = [
        statistics.fmean(r["loss_matrix"][last][j] - r["loss_matrix"][j][j] for j in range(last))
        for r in runs
    ]
    final, final_std = _mean_std(finals)
    entry: dict[str, Any] = {
        "seeds": [r["seed"] for r in runs],
        "loss_matrix": torch.tensor([r["loss_matrix"] for r in runs]).mean(0).tolist(),
        "forgetting": forgetting,
        "forgetting_std": forgetting_std,
        "mean_forgetting": _mean_std(mean_forgetting)[0],
        "final_loss": final,
        "final_loss_std": final_std,
        "final_perplexity": math.exp(final) if math.isfinite(final) else float("nan"),
        "per_seed": runs,
    }
    by_seed = {r["seed"]: r for r in plain or []}
    for key, name in (("step_ms", "step_ratio"), ("step_cpu_ms", "cpu_ratio")):
        if not all(key in r for r in runs):  # files written before CPU time was recorded
            continue
        entry[key] = statistics.fmean(statistics.fmean(r[key][1:]) for r in runs)
        entry[name], entry[f"{name}_std"] = None, None
        ratios = [
            statistics.fmean(r[key][1:]) / statistics.fmean(by_seed[r["seed"]][key][1:])
            for r in runs
            if r["seed"] in by_seed and key in by_seed[r["seed"]]
        ]
        if ratios:
            entry[name], entry[f"{name}_std"] = _mean_std(ratios)
    return entry


def _environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "machine": platform.machine(),
    }


def run_text_benchmark(
    config: TextBenchmarkConfig,
    extra: dict[str, CallbackFactory] | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Every method x seed of ``config`` (and the named callback factories of ``extra``);
    the ``results.json`` document: ``config``, ``environment`` (the Python version fixes the
    domains' contents), ``domains`` (their sizes) and ``methods``.

    The runs go seed by seed, every method within a seed (so a slow stretch of a shared
    machine touches all methods alike); ``progress(method, seed)`` is called after each run.
    """
    domains = load_domains(
        config.domains, max_train_bytes=config.max_train_bytes, max_test_bytes=config.max_test_bytes
    )
    names = list(config.methods) + list(extra or {})
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in names}
    for seed in config.seeds:
        for method in names:
            factory = (extra or {}).get(method)
            runs[method].append(run_text_method(config, method, seed, factory, domains))
            if progress is not None:
                progress(method, seed)
    plain = runs.get("naive")
    return {
        "config": asdict(config),
        "environment": _environment(),
        "domains": {
            d.name: {
                "train_bytes": len(d.train),
                "test_bytes": len(d.test),
                "train_pieces": len(d.train_keys),
                "test_pieces": len(d.test_keys),
            }
            for d in domains
        },
        "methods": {m: summarise_text(runs[m], config.domains, plain) for m in names},
    }


def format_text_table(results: dict[str, Any]) -> str:
    """A Markdown table, one row per method: each earlier domain's forgetting, the mean
    forgetting, the final mean test loss (± std over seeds) and perplexity, and the step-time
    ratio against plain training: thread CPU time, then wall time in brackets.

    Example:
        >>> run = {"seed": 0, "loss_matrix": [[1.0, 3.0], [1.5, 2.0]],
        ...        "initial_loss": [5.5, 5.5], "step_ms": [10.0, 12.0], "step_cpu_ms": [9.0, 11.0]}
        >>> results = {"config": {"domains": ["a", "b"]},
        ...            "methods": {"naive": summarise_text([run], ["a", "b"], [run])}}
        >>> print(format_text_table(results).splitlines()[2])
        | naive | +0.500 | +0.500 | 1.750 ± 0.000 | 5.75 | 1.00 (1.00) |
    """
    domains = list(results["config"]["domains"])
    head = (
        ["method"]
        + [f"Δ {d}" for d in domains[:-1]]
        + ["mean Δ", "final loss", "final ppl", "step × CPU (wall)"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in results["methods"].items():
        ratio = "—"
        if e.get("cpu_ratio") is not None:
            ratio = f"{e['cpu_ratio']:.2f} ({e['step_ratio']:.2f})"
        elif e.get("step_ratio") is not None:
            ratio = f"— ({e['step_ratio']:.2f})"
        cells = (
            [name]
            + [f"{e['forgetting'][d]:+.3f}" for d in domains[:-1]]
            + [
                f"{e['mean_forgetting']:+.3f}",
                f"{e['final_loss']:.3f} ± {e['final_loss_std']:.3f}",
                f"{e['final_perplexity']:.2f}",
                ratio,
            ]
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


PRESETS: dict[str, dict[str, Any]] = {
    # The documented table (docs/text-benchmark.md): 3 domains x 200 steps, 3 seeds.
    "text": {},
    # A smoke run: seconds.
    "text-tiny": {
        "steps": 20,
        "seeds": (0,),
        "d_model": 32,
        "layers": 1,
        "test_windows": 64,
        "max_train_bytes": 1 << 16,
    },
}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m lightning_metagrad.benchmark.text``.

    Example:
        >>> args = build_parser().parse_args(["--preset", "text-tiny", "--methods", "naive"])
        >>> config_from_args(args).steps, config_from_args(args).methods
        (20, ('naive',))
    """
    defaults = TextBenchmarkConfig()
    p = argparse.ArgumentParser(
        prog="python -m lightning_metagrad.benchmark.text",
        description="Continual fine-tuning of a byte-level GPT on text domains every Python "
        "install holds (stdlib source, pydoc help texts, CPython's license); AdamW, bf16-mixed.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="text")
    p.add_argument("--domains", nargs="+", choices=DOMAINS, default=None)
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="METHOD",
        help=f"default: {' '.join(defaults.methods)}; also {' '.join(TEXT_VARIANTS)}",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    for name in (
        "steps",
        "batch_size",
        "context",
        "d_model",
        "layers",
        "heads",
        "threads",
        "test_windows",
        "max_train_bytes",
        "max_test_bytes",
    ):
        p.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=None,
            help=f"default: {getattr(defaults, name)}",
        )
    p.add_argument("--lr", type=float, default=None, help=f"default: {defaults.lr}")
    p.add_argument("--precision", default=None, help=f"default: {defaults.precision}")
    p.add_argument(
        "--method-kwargs",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="keyword arguments of a method's callback, e.g. gpm='{\"threshold\": 0.99}'",
    )
    p.add_argument("--output-dir", type=Path, default=Path("runs/text"))
    return p


def config_from_args(args: argparse.Namespace) -> TextBenchmarkConfig:
    """The config of parsed arguments: the preset, then every option given."""
    values = dict(PRESETS[args.preset])
    for name in TextBenchmarkConfig.__dataclass_fields__:
        given = getattr(args, name, None)
        if given is not None and name != "method_kwargs":
            values[name] = given
    kwargs: dict[str, dict[str, Any]] = {}
    for item in args.method_kwargs:
        name, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"`--method-kwargs` takes NAME=JSON, got {item!r}")
        kwargs[name] = json.loads(text)
    values["method_kwargs"] = kwargs
    return TextBenchmarkConfig(**values)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark from the command line; print the table; write ``results.json``."""
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    silence_lightning()

    def progress(method: str, seed: int) -> None:
        print(f"  done: {method} seed {seed}", file=sys.stderr, flush=True)

    results = run_text_benchmark(config, progress=progress)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(format_text_table(results))
    print(f"wrote {args.output_dir / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
