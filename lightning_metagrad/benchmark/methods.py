"""The methods the benchmark compares, by name: callbacks with one-line use, plus two references.

Each name is a callback class with some arguments fixed (``metagrad-paper`` is
``MetaGradCallback(predictor="paper")``); :func:`make_callbacks` adds a baseline's strength and
any further keyword arguments of the class (``--method-kwargs`` on the command line).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_metagrad.callback import MetaGradCallback

# name -> (factory(strength or None, **keyword arguments) -> callbacks, default strength or None)
Factory = Callable[..., list[Callback]]


@dataclass(frozen=True)
class MethodSpec:
    """A method: its callback class (None: no callback), the arguments its name fixes, and its
    default regularisation strength (None: it takes none)."""

    callback: type[Callback] | None
    fixed: Mapping[str, Any] = field(default_factory=dict)
    strength: float | None = None


def method_specs() -> dict[str, MethodSpec]:
    """Every method by name (the baselines are imported here, on first use).

    Example:
        >>> sorted(method_specs()) == sorted(ALL_METHODS)
        True
        >>> spec = method_specs()["metagrad-paper"]
        >>> spec.callback.__name__, dict(spec.fixed), spec.strength
        ('MetaGradCallback', {'predictor': 'paper'}, None)
    """
    from lightning_metagrad import baselines as b

    return {
        "naive": MethodSpec(None),
        "joint": MethodSpec(None),
        "metagrad": MethodSpec(MetaGradCallback),  # the default: subspace
        "metagrad-paper": MethodSpec(MetaGradCallback, {"predictor": "paper"}),
        "metagrad-anchored": MethodSpec(MetaGradCallback, {"predictor": "anchored"}),
        "metagrad-replay": MethodSpec(MetaGradCallback, {"predictor": "replay"}),
        "metagrad-gradient-subspace": MethodSpec(
            MetaGradCallback, {"predictor": "gradient-subspace"}
        ),
        "metagrad-relaxed": MethodSpec(MetaGradCallback, {"predictor": "relaxed"}),
        "ewc": MethodSpec(b.EWCCallback, strength=100.0),
        "online-ewc": MethodSpec(b.OnlineEWCCallback, strength=100.0),
        "si": MethodSpec(b.SICallback, strength=1.0),
        "mas": MethodSpec(b.MASCallback, strength=1.0),
        # No strength: GPM's threshold (SGP's too, and its scale) and the memory size are
        # their knobs.
        "gpm": MethodSpec(b.GPMCallback),
        "sgp": MethodSpec(b.SGPCallback),
        "agem": MethodSpec(b.AGEMCallback),
        "er": MethodSpec(b.ERCallback),
    }


def method_registry() -> dict[str, tuple[Factory, float | None]]:
    """All methods: ``naive`` (no callback), ``joint`` (all tasks so far, an upper bound),
    MetaGrad and the baselines.

    Maps a name to ``(factory(strength or None, **kwargs) -> callbacks, default strength or
    None)``.

    Example:
        >>> factory, default = method_registry()["si"]
        >>> default, [type(c).__name__ for c in factory(0.5)]
        (1.0, ['SICallback'])
    """

    def factory(name: str) -> Factory:
        return lambda strength=None, **kwargs: make_callbacks(name, strength, kwargs)

    return {name: (factory(name), spec.strength) for name, spec in method_specs().items()}


# The default set: MetaGrad's default, its stored-data mode and the baselines.
METHOD_NAMES = (
    "naive",
    "joint",
    "metagrad",
    "metagrad-replay",
    "ewc",
    "online-ewc",
    "si",
    "mas",
    "gpm",
    "agem",
    "er",
)
VARIANT_NAMES = (
    "metagrad-paper",
    "metagrad-anchored",
    "metagrad-gradient-subspace",
    "metagrad-relaxed",
)
# Further baselines, run when named (the default set stays as its recorded results have it).
EXTRA_NAMES = ("sgp",)
ALL_METHODS = METHOD_NAMES + VARIANT_NAMES + EXTRA_NAMES


def method_parameters(name: str) -> list[str]:
    """The keyword arguments method ``name`` takes (its callback's), none without a callback.

    Example:
        >>> method_parameters("gpm")[:3]
        ['threshold', 'samples', 'threshold_increment']
        >>> method_parameters("sgp")[:2]
        ['threshold', 'scale']
        >>> "task_boundaries" in method_parameters("ewc")
        True
        >>> method_parameters("naive")
        []
    """
    callback = method_specs()[name].callback
    if callback is None:
        return []
    params = inspect.signature(callback.__init__).parameters.values()
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.name != "self" and p.kind in kinds]


def make_callbacks(
    name: str, strength: float | None = None, kwargs: Mapping[str, Any] | None = None
) -> list[Callback]:
    """Callbacks for a method; ``strength`` overrides a baseline's default strength, ``kwargs``
    are further keyword arguments of its callback (they win over the arguments its name fixes).

    Raises ``ValueError`` for an unknown name, and for arguments the callback rejects (with the
    arguments it takes).

    Example:
        >>> [type(c).__name__ for c in make_callbacks("metagrad")]
        ['MetaGradCallback']
        >>> make_callbacks("gpm", kwargs={"threshold": {"net.0": 0.95}})[0].threshold
        {'net.0': 0.95}
        >>> make_callbacks("gpm", kwargs={"thresholds": 0.9})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: method 'gpm' (GPMCallback): ...'thresholds'; it takes threshold, samples, ...
    """
    specs = method_specs()
    if name not in specs:
        raise ValueError(f"Unknown method {name!r}; choose from {sorted(specs)}")
    spec, extra = specs[name], dict(kwargs or {})
    if spec.callback is None:
        if extra:
            raise ValueError(
                f"method {name!r} has no callback, so it takes no keyword arguments; got "
                f"{sorted(extra)}"
            )
        return []
    args = dict(spec.fixed)
    if spec.strength is not None:
        args["strength"] = spec.strength if strength is None else strength
    args.update(extra)
    try:
        return [spec.callback(**args)]
    except (TypeError, ValueError) as err:
        takes = ", ".join(method_parameters(name))
        raise ValueError(
            f"method {name!r} ({spec.callback.__name__}): {err}; it takes {takes}"
        ) from None


def default_strength(name: str) -> Any:
    """A method's default regularisation strength, or None where it has none.

    Example:
        >>> default_strength("ewc"), default_strength("metagrad")
        (100.0, None)
    """
    return method_specs()[name].strength
