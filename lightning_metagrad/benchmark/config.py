"""What a benchmark run depends on, its named presets, and the command-line options built from it.

:class:`BenchmarkConfig` is the one description of an experiment: ``metagrad-benchmark``, the
experiment scripts in ``experiments/`` and ``examples/compare_baselines.py`` all take their
options from its fields (:func:`add_config_arguments`), and their defaults from a named preset
(:data:`PRESETS`, chosen with ``--preset``), so a field added here is an option of every one.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_config_arguments(parser, preset="fig1")
    >>> config = config_from_args(parser.parse_args(["--seeds", "0", "--lr", "0.003"]))
    >>> config.dataset, config.iters, config.seeds, config.lr
    ('fashion_mnist', 2000, (0,), 0.003)
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_metagrad.benchmark.methods import ALL_METHODS, METHOD_NAMES, make_callbacks
from lightning_metagrad.benchmark.models import OPTIMIZERS
from lightning_metagrad.data import PermutedStream, RotatedStream, SplitStream
from lightning_metagrad.data.datasets import check_dataset_args

STREAMS = {"permuted": PermutedStream, "split": SplitStream, "rotated": RotatedStream}
DATASETS = ("digits", "mnist", "fashion_mnist")
EVAL_SPLITS = ("test", "val")
HEADS = ("shared", "task")


def _option(help: str, flag: str | None = None, **argparse_kwargs: Any) -> dict[str, Any]:
    """A field's command-line option: its help, its flag (``--field-name`` by default) and any
    further ``add_argument`` keywords (``choices``, ``metavar``, aliases as ``names``)."""
    return {"help": help, "flag": flag, **argparse_kwargs}


@dataclass
class BenchmarkConfig:
    """Everything a benchmark run depends on (stored in ``results.json``).

    Each field is an option of ``metagrad-benchmark`` and of the experiment scripts (its flag
    and help are in the field's metadata); the values are checked at construction.

    Example:
        >>> config = BenchmarkConfig(tasks=3, iters=100, methods=("naive", "metagrad"))
        >>> config.stream, config.dataset, config.optimizer
        ('permuted', 'digits', 'sgd')
        >>> BenchmarkConfig(tasks=1)
        Traceback (most recent call last):
            ...
        ValueError: `tasks` must be >= 2 for continual learning, got 1
    """

    stream: str = field(
        default="permuted",
        metadata=_option(
            "Permuted (a pixel permutation per task), Rotated (an angle per task) or Split "
            "(disjoint class subsets per task)",
            choices=sorted(STREAMS),
        ),
    )
    dataset: str = field(
        default="digits",
        metadata=_option(
            "base images: scikit-learn's 8x8 digits (no download) or torchvision's MNIST-like "
            "sets under --root",
            choices=DATASETS,
        ),
    )
    root: str | None = field(
        default=None,
        metadata=_option("folder holding torchvision's MNIST/ or FashionMNIST/", metavar="DIR"),
    )
    download: bool = field(
        default=False, metadata=_option("let torchvision download the data into --root")
    )
    standardize: bool = field(
        default=False,
        metadata=_option(
            "map inputs to (x - mean) / std, one scalar mean and std from the first task's "
            "training images (GPM's protocol)"
        ),
    )
    tasks: int = field(default=5, metadata=_option("number of tasks (at least 2)", metavar="N"))
    iters: int = field(
        default=300,
        metadata=_option(
            "optimizer steps per task (when --epochs is 0; given alone, it sets --epochs 0)",
            metavar="N",
        ),
    )
    epochs: int = field(
        default=0,
        metadata=_option(
            "passes over each task's training data: epochs x ceil(task's training examples / "
            "batch size) steps a task, computed from the dataset (joint takes as many as the "
            "task alone); 0 counts --iters steps instead",
            metavar="N",
        ),
    )
    batch_size: int = field(default=64, metadata=_option("training batch size", metavar="N"))
    optimizer: str = field(
        default="sgd",
        metadata=_option("plain SGD, SGD with momentum 0.9, or Adam", choices=OPTIMIZERS),
    )
    lr: float = field(default=0.03, metadata=_option("learning rate"))
    hidden_sizes: Sequence[int] = field(
        default=(256, 256, 256),
        metadata=_option("hidden widths of the MLP", flag="--hidden", metavar="WIDTH"),
    )
    bias: bool = field(
        default=True,
        metadata=_option("biases in the MLP's Linear layers (GPM's PMNIST network has none)"),
    )
    methods: Sequence[str] = field(
        default=METHOD_NAMES,
        metadata=_option("methods to run", choices=ALL_METHODS, metavar="METHOD"),
    )
    seeds: Sequence[int] = field(
        default=(0,),
        metadata=_option(
            "seeds (task definitions, initialisation, shuffles); results are mean ± std",
            names=("--seed",),
            metavar="SEED",
        ),
    )
    eval_every: int = field(
        default=50, metadata=_option("iterations between curve points", metavar="N")
    )
    eval_samples: int = field(
        default=1000, metadata=_option("test samples per curve point", metavar="N")
    )
    strengths: dict[str, float] = field(
        default_factory=dict,
        metadata=_option(
            "a baseline's regularisation strength (repeatable)",
            flag="--strength",
            metavar="METHOD=VALUE",
        ),
    )
    method_kwargs: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata=_option(
            "keyword arguments of a method's callback, as a JSON object (repeatable; merged "
            "per method), e.g. gpm='{\"threshold\": 0.97}'",
            metavar="METHOD=JSON",
        ),
    )
    accelerator: str = field(
        default="cpu", metadata=_option("passed to the Trainer", metavar="NAME")
    )
    heads: str = field(
        default="shared",
        metadata=_option(
            "one output layer shared by every task (class-incremental on Split), or a head per "
            "task: each task's logits restricted to its own classes, the task id given at "
            "training and test time (task-incremental; Split only)",
            choices=HEADS,
        ),
    )
    eval_split: str = field(
        default="test",
        metadata=_option(
            "evaluate on the validation split (to tune strengths) or the test split",
            choices=EVAL_SPLITS,
        ),
    )

    def __post_init__(self) -> None:
        self.hidden_sizes = tuple(self.hidden_sizes)
        self.methods = tuple(dict.fromkeys(self.methods))
        self.seeds = tuple(self.seeds)
        self.strengths = dict(self.strengths)
        self.method_kwargs = copy.deepcopy(dict(self.method_kwargs))  # presets stay untouched
        if self.stream not in STREAMS:
            raise ValueError(f"`stream` must be one of {sorted(STREAMS)}, got {self.stream!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("tasks", "iters", "batch_size", "eval_every", "eval_samples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if int(self.epochs) < 0:
            raise ValueError(f"`epochs` must be >= 0 (0: count `iters` steps), got {self.epochs}")
        if self.tasks < 2:
            raise ValueError(f"`tasks` must be >= 2 for continual learning, got {self.tasks}")
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise ValueError(f"unknown `methods` {unknown}; choose from {list(ALL_METHODS)}")
        if self.eval_split not in EVAL_SPLITS:
            raise ValueError(f"`eval_split` must be 'test' or 'val', got {self.eval_split!r}")
        if not self.seeds:
            raise ValueError("`seeds` must name at least one seed")
        if self.heads not in HEADS:
            raise ValueError(f"`heads` must be 'shared' or 'task', got {self.heads!r}")
        if self.heads == "task" and self.stream != "split":
            raise ValueError(
                f"`heads='task'` needs the Split stream (each task its own classes), got "
                f"stream={self.stream!r}; its tasks share every class, so use heads='shared'"
            )
        for method, kwargs in self.method_kwargs.items():
            check_method_kwargs(method, kwargs, self.strengths.get(method), build=False)

    def check_callbacks(self) -> None:
        """Build every method's callbacks once (each of ``methods``, and each method that
        ``method_kwargs`` names), so that a keyword argument a callback rejects fails before
        any training. The CLI's parser and :func:`~lightning_metagrad.benchmark.run_benchmark`
        call it; construction checks everything else without importing the callbacks.

        Example:
            >>> config = BenchmarkConfig(method_kwargs={"gpm": {"threshold": 2.0}})
            >>> config.check_callbacks()  # doctest: +ELLIPSIS
            Traceback (most recent call last):
                ...
            ValueError: `method_kwargs` (...): method 'gpm' (GPMCallback): `threshold` must be...
        """
        for method in dict.fromkeys([*self.methods, *self.method_kwargs]):
            kwargs = self.method_kwargs.get(method, {})
            check_method_kwargs(method, kwargs, self.strengths.get(method))


def check_method_kwargs(
    method: str, kwargs: Any, strength: float | None = None, build: bool = True
) -> dict[str, Any]:
    """Check one entry of ``method_kwargs``: a known method and a dict of JSON values, which
    (with ``build``) its callback accepts: it is built once, so a wrong name or value fails
    before any training.

    Example:
        >>> check_method_kwargs("gpm", {"threshold": 0.9})
        {'threshold': 0.9}
        >>> check_method_kwargs("gmp", {})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: `method_kwargs` (--method-kwargs METHOD=JSON) names an unknown method 'gmp'...
    """
    option = "`method_kwargs` (--method-kwargs METHOD=JSON)"
    if method not in ALL_METHODS:
        raise ValueError(
            f"{option} names an unknown method {method!r}; choose from {sorted(ALL_METHODS)}"
        )
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(
            f"{option}: the arguments of {method!r} must be a dict of keyword names, got "
            f"{kwargs!r}; write e.g. {method}='{{\"name\": value}}'"
        )
    try:
        json.dumps(kwargs)
    except (TypeError, ValueError):
        raise ValueError(
            f"{option}: the arguments of {method!r} must be JSON values (numbers, strings, "
            f"lists, dicts) to be stored in results.json, got {kwargs!r}; for other objects "
            "pass run_method(callbacks=...) a factory"
        ) from None
    if "strength" in kwargs and strength is not None:
        raise ValueError(
            f"{option}: the strength of {method!r} is given twice, by --strength and by "
            f"--method-kwargs; keep one"
        )
    if build:
        try:
            make_callbacks(method, strength, kwargs)
        except ValueError as err:
            raise ValueError(f"{option}: {err}") from None
    return kwargs


_FIG1 = BenchmarkConfig(
    dataset="fashion_mnist",
    root="../shared/data",
    tasks=5,
    iters=2000,
    batch_size=64,
    optimizer="sgd",
    lr=0.03,
    hidden_sizes=(256, 256, 256),
    seeds=(0, 1, 2),
    eval_every=400,
    eval_samples=500,
)

PRESETS: Mapping[str, BenchmarkConfig] = {
    # Every default method on Permuted 8x8 digits: the README's command, a few minutes on
    # 2 CPU cores (experiments/results/main-job.json). The defaults of BenchmarkConfig.
    "digits": BenchmarkConfig(),
    # The paper's Fig. 1 protocol (docs/results.md): Permuted Fashion-MNIST from
    # ../shared/data, MLP 784-256-256-256-10, 5 tasks x 2000 steps, batch 64, SGD, lr 0.03,
    # seeds 0 1 2; curves every 400 steps on 500 test samples.
    "fig1": _FIG1,
    # examples/compare_baselines.py: 3 tasks of digits, MetaGrad against the baselines.
    "compare": BenchmarkConfig(
        tasks=3,
        methods=("naive", "ewc", "online-ewc", "si", "mas", "metagrad", "metagrad-replay"),
        eval_every=25,
    ),
    # experiments/tasks_scaling.py: the Fig. 1 protocol over 10 tasks, the default and plain
    # SGD, seed 0; curve points at task ends only.
    "tasks-scaling": dataclasses.replace(
        _FIG1, tasks=10, seeds=(0,), methods=("metagrad", "naive"), eval_every=2000
    ),
    # experiments/replay_staleness.py: two tasks of the Fig. 1 protocol, seed 1.
    "replay-staleness": dataclasses.replace(
        _FIG1, tasks=2, seeds=(1,), methods=("metagrad-replay",)
    ),
    # GPM's Permuted MNIST protocol (Saha et al., ICLR 2021, main_pmnist.py): 10 tasks, MLP
    # 784-100-100-10 without biases, batch 10, SGD lr 0.01, 5 epochs a task, inputs standardised,
    # GPM's thresholds 0.95 (first layer) / 0.99 / 0.99. MNIST from --root (see --download).
    "gpm-pmnist": BenchmarkConfig(
        dataset="mnist",
        root="../shared/data",
        standardize=True,
        tasks=10,
        epochs=5,
        batch_size=10,
        optimizer="sgd",
        lr=0.01,
        hidden_sizes=(100, 100),
        bias=False,
        methods=("naive", "metagrad", "gpm"),
        method_kwargs={"gpm": {"threshold": {"net.0": 0.95, "net.2": 0.99, "net.4": 0.99}}},
        seeds=(0, 1, 2),
        eval_every=5500,  # an epoch of MNIST's 55000 training images
    ),
}


def preset(name: str, **changes: Any) -> BenchmarkConfig:
    """A fresh copy of the preset ``name``, with ``changes`` to its fields.

    Example:
        >>> config = preset("fig1", seeds=(0,))
        >>> config.dataset, config.tasks, config.iters, config.seeds
        ('fashion_mnist', 5, 2000, (0,))
        >>> sorted(PRESETS)
        ['compare', 'digits', 'fig1', 'gpm-pmnist', 'replay-staleness', 'tasks-scaling']
        >>> preset("paper")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: unknown preset 'paper'; choose from ['compare', 'digits', ...]
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    base = PRESETS[name]
    return dataclasses.replace(base, **{"strengths": dict(base.strengths), **changes})


def steps_per_task(config: BenchmarkConfig, train_examples: int) -> int:
    """Optimizer steps on a task with ``train_examples`` training examples: ``iters``, or with
    ``epochs`` set, ``epochs`` passes of ``ceil(train_examples / batch_size)`` batches.

    Example:
        >>> steps_per_task(BenchmarkConfig(iters=300), 1077)
        300
        >>> steps_per_task(BenchmarkConfig(epochs=5, batch_size=10), 55000)
        27500
    """
    if not config.epochs:
        return int(config.iters)
    return int(config.epochs) * -(-int(train_examples) // int(config.batch_size))


def config_dict(config: BenchmarkConfig) -> dict[str, Any]:
    """``config`` as the JSON-ready ``"config"`` entry of ``results.json`` (lists, not tuples).

    Example:
        >>> config_dict(BenchmarkConfig(seeds=(0, 1)))["seeds"]
        [0, 1]
    """
    out = asdict(config)
    for name, value in out.items():
        if isinstance(value, tuple):
            out[name] = list(value)
    return out


def config_flag(name: str) -> str:
    """The command-line flag of the field ``name``.

    Example:
        >>> config_flag("batch_size"), config_flag("hidden_sizes"), config_flag("strengths")
        ('--batch-size', '--hidden', '--strength')
    """
    (match,) = [f for f in dataclasses.fields(BenchmarkConfig) if f.name == name]
    return match.metadata.get("flag") or "--" + name.replace("_", "-")


def _strength(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected METHOD=VALUE, got {text!r}")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"strength for {name!r} is not a number: {value!r}"
        ) from None


def _method_kwargs(text: str) -> tuple[str, dict[str, Any]]:
    """``METHOD=JSON`` -> ``(method, kwargs)``; the object may also be a Python dict literal
    (``ast.literal_eval``: parsed, never evaluated)."""
    name, sep, value = text.partition("=")
    name = name.strip()
    fix = "write METHOD=JSON, e.g. gpm='{\"threshold\": 0.97}'"
    if not sep:
        raise argparse.ArgumentTypeError(f"expected METHOD=JSON, got {text!r}; {fix}")
    if name not in ALL_METHODS:
        raise argparse.ArgumentTypeError(
            f"unknown method {name!r}; choose from {sorted(ALL_METHODS)}"
        )
    try:
        kwargs = json.loads(value)
    except json.JSONDecodeError as err:
        try:
            kwargs = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise argparse.ArgumentTypeError(
                f"the arguments of {name!r} are not a JSON object ({err.msg} at character "
                f"{err.pos} of {value!r}); {fix}"
            ) from None
    if not isinstance(kwargs, dict):
        raise argparse.ArgumentTypeError(
            f"the arguments of {name!r} must be a JSON object {{...}}, got {value!r}; {fix}"
        )
    return name, kwargs


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    if isinstance(value, dict):
        return " ".join(f"{k}={json.dumps(v)}" for k, v in value.items()) or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def _argparse_kwargs(f: dataclasses.Field, default: Any) -> dict[str, Any]:
    """How ``argparse`` reads the field ``f``, from its default's type."""
    meta = {k: v for k, v in f.metadata.items() if k not in ("help", "flag", "names")}
    if f.name == "strengths":
        return {"type": _strength, "action": "append", **meta}
    if f.name == "method_kwargs":
        return {"type": _method_kwargs, "action": "append", **meta}
    sample = f.default if f.default is not dataclasses.MISSING else default
    if isinstance(sample, bool):
        return {"action": argparse.BooleanOptionalAction, **meta}
    if isinstance(sample, (tuple, list)):
        return {"type": type(sample[0]) if sample else str, "nargs": "+", **meta}
    if sample is None or isinstance(sample, str):
        return {"type": str, **meta}
    return {"type": type(sample), **meta}


def add_config_arguments(
    parser: argparse.ArgumentParser, preset: str, exclude: Iterable[str] = ()
) -> None:
    """Add ``--preset`` and one option per field of :class:`BenchmarkConfig` to ``parser``.

    ``preset`` names the script's defaults (shown in ``--help``); ``--preset`` chooses another,
    and the options given on the command line change it. ``exclude`` lists the fields the script
    does not use (they keep the preset's value). Read the result with :func:`config_from_args`.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser()
        >>> add_config_arguments(parser, preset="digits", exclude=["strengths"])
        >>> args = parser.parse_args(["--preset", "fig1", "--tasks", "3", "--hidden", "64"])
        >>> config = config_from_args(args)
        >>> config.dataset, config.tasks, config.hidden_sizes
        ('fashion_mnist', 3, (64,))
    """
    defaults = PRESETS[preset]
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=preset,
        help=f"the protocol to start from; the options below change it (default: {preset})",
    )
    group = parser.add_argument_group(f"experiment (defaults of the preset {preset!r})")
    skipped = set(exclude)
    for f in dataclasses.fields(BenchmarkConfig):
        if f.name in skipped:
            continue
        default = getattr(defaults, f.name)
        group.add_argument(
            config_flag(f.name),
            *f.metadata.get("names", ()),
            dest=f.name,
            default=argparse.SUPPRESS,  # not given: the preset's value
            help=f"{f.metadata['help']} (default: {_shown(default)})",
            **_argparse_kwargs(f, default),
        )


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    """The configuration a parser made by :func:`add_config_arguments` read: the chosen preset
    with the options given. ``--strength`` values are added to the preset's strengths, and
    ``--method-kwargs`` to the preset's keyword arguments of that method. ``--iters`` without
    ``--epochs`` counts steps (``epochs=0``) even if the preset counts epochs.

    Raises ``ValueError`` (with the field's name) for a value :class:`BenchmarkConfig` rejects.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_config_arguments(parser, preset="gpm-pmnist")
        >>> config = config_from_args(parser.parse_args(["--iters", "50"]))
        >>> config.epochs, config.iters
        (0, 50)
    """
    names = {f.name for f in dataclasses.fields(BenchmarkConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    base = preset(args.preset)
    if "strengths" in given:
        given["strengths"] = {**base.strengths, **dict(given["strengths"])}
    if "method_kwargs" in given:
        merged = copy.deepcopy(base.method_kwargs)
        for method, kwargs in given["method_kwargs"]:
            merged[method] = {**merged.get(method, {}), **kwargs}
        given["method_kwargs"] = merged
    if "iters" in given and given.get("epochs"):
        raise ValueError(
            f"give either --iters (steps a task) or --epochs (passes a task), not both: "
            f"--iters {given['iters']} --epochs {given['epochs']}"
        )
    if "iters" in given and "epochs" not in given:
        given["epochs"] = 0  # the steps asked for, even where the preset counts epochs
    config = dataclasses.replace(base, **given)
    config.check_callbacks()
    return config


def config_argv(config: BenchmarkConfig) -> list[str]:
    """Command-line options that give ``config`` from any preset (a field that is None, such
    as ``root``, has no option and keeps the preset's value; ``iters`` is left out where
    ``epochs`` counts the steps).

    Example:
        >>> argv = config_argv(preset("gpm-pmnist"))
        >>> argv[argv.index("--epochs") : argv.index("--epochs") + 2], "--no-bias" in argv
        (['--epochs', '5'], True)
        >>> parser = argparse.ArgumentParser()
        >>> add_config_arguments(parser, preset="digits")
        >>> config_from_args(parser.parse_args(argv)) == preset("gpm-pmnist")
        True
    """
    argv: list[str] = []
    for f in dataclasses.fields(BenchmarkConfig):
        value, flag = getattr(config, f.name), config_flag(f.name)
        if value is None or (f.name == "iters" and config.epochs):
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif f.name == "strengths":
            for method, strength in value.items():
                argv += [flag, f"{method}={strength!r}"]
        elif f.name == "method_kwargs":
            for method, kwargs in value.items():
                argv += [flag, f"{method}={json.dumps(kwargs)}"]
        elif isinstance(value, (tuple, list)):
            if value:  # an empty list has no spelling (nargs="+")
                argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def parse_config(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> tuple[BenchmarkConfig, argparse.Namespace]:
    """Parse ``argv`` with ``parser`` (built with :func:`add_config_arguments`): the
    configuration, and the script's other arguments (with ``preset``, without the
    configuration's fields). A rejected value, or a dataset missing from ``--root`` (without
    ``--download``), exits with the usage message, as argparse does for its own errors.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser()
        >>> add_config_arguments(parser, preset="digits")
        >>> _ = parser.add_argument("--output", default="runs/x")
        >>> config, args = parse_config(parser, ["--tasks", "3"])
        >>> config.tasks, vars(args)
        (3, {'preset': 'digits', 'output': 'runs/x'})
    """
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        check_dataset_args(config.dataset, config.root, config.download, None)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    names = {f.name for f in dataclasses.fields(BenchmarkConfig)}
    return config, argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in names})
