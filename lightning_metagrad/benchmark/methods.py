"""The methods the benchmark compares, by name: callbacks with one-line use, plus two references."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_metagrad.callback import MetaGradCallback

# name -> (factory(strength or None) -> list of callbacks, default strength or None)
Factory = Callable[[float | None], list[Callback]]


def _baselines() -> dict[str, tuple[Factory, float | None]]:
    from lightning_metagrad import baselines as b

    def strength(s: float | None, default: float) -> float:
        return default if s is None else s

    return {
        "ewc": (lambda s: [b.EWCCallback(strength=strength(s, 100.0))], 100.0),
        "online-ewc": (lambda s: [b.OnlineEWCCallback(strength=strength(s, 100.0))], 100.0),
        "si": (lambda s: [b.SICallback(strength=strength(s, 1.0))], 1.0),
        "mas": (lambda s: [b.MASCallback(strength=strength(s, 1.0))], 1.0),
        # No strength: GPM's threshold and the memory size are their knobs.
        "gpm": (lambda s: [b.GPMCallback()], None),
        "agem": (lambda s: [b.AGEMCallback()], None),
        "er": (lambda s: [b.ERCallback()], None),
    }


def method_registry() -> dict[str, tuple[Factory, float | None]]:
    """All methods: ``naive`` (no callback), ``joint`` (all tasks so far, an upper bound),
    MetaGrad and the regularisation baselines.

    Maps a name to ``(factory(strength or None) -> callbacks, default strength or None)``.

    Example:
        >>> factory, default = method_registry()["si"]
        >>> default, [type(c).__name__ for c in factory(0.5)]
        (1.0, ['SICallback'])
    """
    registry: dict[str, tuple[Factory, float | None]] = {
        "naive": (lambda s: [], None),
        "joint": (lambda s: [], None),
        "metagrad": (lambda s: [MetaGradCallback()], None),  # the default: subspace
        "metagrad-paper": (lambda s: [MetaGradCallback(predictor="paper")], None),
        "metagrad-anchored": (lambda s: [MetaGradCallback(predictor="anchored")], None),
        "metagrad-replay": (lambda s: [MetaGradCallback(predictor="replay")], None),
    }
    registry.update(_baselines())
    return registry


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
VARIANT_NAMES = ("metagrad-paper", "metagrad-anchored")
ALL_METHODS = METHOD_NAMES + VARIANT_NAMES


def make_callbacks(name: str, strength: float | None = None) -> list[Callback]:
    """Callbacks for a method; ``strength`` overrides a baseline's default strength.

    Example:
        >>> [type(c).__name__ for c in make_callbacks("metagrad")]
        ['MetaGradCallback']
    """
    registry = method_registry()
    if name not in registry:
        raise ValueError(f"Unknown method {name!r}; choose from {sorted(registry)}")
    factory, default = registry[name]
    return factory(default if strength is None else strength)


def default_strength(name: str) -> Any:
    """A method's default regularisation strength, or None where it has none.

    Example:
        >>> default_strength("ewc"), default_strength("metagrad")
        (100.0, None)
    """
    return method_registry()[name][1]
