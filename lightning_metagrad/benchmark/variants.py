"""Configured callbacks from text: ``NAME=SPEC`` on a command line -> a callback factory.

``SPEC`` is a constructor call written as in Python, over the package's public classes
(:func:`constructors`: ``MetaGradCallback``, the predictors, the boundary sources and the
baselines), with literal arguments or further such calls::

    replay-free1=MetaGradCallback(predictor=ReplayPredictor(free_below=1.0))
    both=[MetaGradCallback(), EWCCallback(strength=10.0)]

It is parsed, not evaluated: any other name, attribute, operator or ``*args`` is an error. A
``NAME`` alone is a method of the benchmark's registry (``naive``, ``ewc``, ...).

Example:
    >>> name, spec, factory = parse_variant("t99=MetaGradCallback(combine='average')")
    >>> name, spec, [type(c).__name__ for c in factory()]
    ('t99', "MetaGradCallback(combine='average')", ['MetaGradCallback'])
    >>> factory()[0] is factory()[0]  # fresh callbacks for every run
    False
"""

from __future__ import annotations

import ast
import re
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_metagrad.benchmark.methods import make_callbacks, method_registry
from lightning_metagrad.benchmark.runner import CallbackFactory

_NAME = re.compile(r"^[\w.+-]+$")


def constructors() -> dict[str, type]:
    """The classes a ``SPEC`` may call, by name: the public classes of ``lightning_metagrad``
    and ``lightning_metagrad.baselines``.

    Example:
        >>> {"MetaGradCallback", "ReplayPredictor", "EWCCallback"} <= set(constructors())
        True
    """
    import lightning_metagrad
    import lightning_metagrad.baselines

    found: dict[str, type] = {}
    for module in (lightning_metagrad, lightning_metagrad.baselines):
        for name in module.__all__:
            value = getattr(module, name)
            if isinstance(value, type):
                found[name] = value
    return found


def _build(node: ast.expr, names: dict[str, type]) -> Any:
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in names:
            raise ValueError(
                f"{ast.unparse(node.func)!r} is not a constructor one may call; "
                f"choose from {sorted(names)}"
            )
        if any(isinstance(a, ast.Starred) for a in node.args) or any(
            k.arg is None for k in node.keywords
        ):
            raise ValueError(f"no *args or **kwargs in {ast.unparse(node)!r}")
        args = [_build(a, names) for a in node.args]
        kwargs = {str(k.arg): _build(k.value, names) for k in node.keywords}
        return names[node.func.id](*args, **kwargs)
    if isinstance(node, ast.List):
        return [_build(e, names) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_build(e, names) for e in node.elts)
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(
            f"{ast.unparse(node)!r} is neither a literal nor a constructor call"
        ) from None


def spec_factory(spec: str) -> CallbackFactory:
    """A factory of the callbacks ``spec`` describes (one call, or a list of calls).

    The callbacks are built once here, so a wrong name or argument fails before any training.

    Example:
        >>> factory = spec_factory("[MetaGradCallback(), SICallback(strength=0.3)]")
        >>> [type(c).__name__ for c in factory()]
        ['MetaGradCallback', 'SICallback']
        >>> spec_factory("open('notes.txt')")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: 'open' is not a constructor one may call; choose from [...]
    """
    try:
        tree = ast.parse(spec.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"{spec!r} is not a Python expression: {err.msg}") from None
    names = constructors()

    def factory() -> list[Callback]:
        built = _build(tree.body, names)
        callbacks = list(built) if isinstance(built, (list, tuple)) else [built]
        for callback in callbacks:
            if not isinstance(callback, Callback):
                raise ValueError(f"{spec!r} makes a {type(callback).__name__}, not a callback")
        return callbacks

    try:
        factory()
    except TypeError as err:  # a wrong argument of a constructor
        raise ValueError(f"{spec!r}: {err}") from None
    return factory


def parse_variant(text: str) -> tuple[str, str, CallbackFactory]:
    """``(name, spec, factory)`` of ``NAME=SPEC``, or of ``NAME`` alone (a registry method).

    Example:
        >>> name, spec, factory = parse_variant("ewc")
        >>> name, spec, [type(c).__name__ for c in factory()]
        ('ewc', 'ewc', ['EWCCallback'])
    """
    name, sep, spec = text.partition("=")
    name = name.strip()
    if not _NAME.match(name):
        raise ValueError(f"expected NAME=SPEC or a method name, got {text!r}")
    if sep:
        return name, spec.strip(), spec_factory(spec)
    if name not in method_registry():
        raise ValueError(
            f"{name!r} is not a method; give NAME=SPEC or one of {sorted(method_registry())}"
        )
    return name, name, lambda: make_callbacks(name)
