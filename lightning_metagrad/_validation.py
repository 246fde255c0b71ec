"""Argument checks shared by every constructor of the package (private).

One rule set everywhere:

* a number is an ``int`` or a ``float`` (NumPy scalars included), never a ``bool``;
* an integer argument takes integers only (``2.0`` is refused), a float argument takes
  integers too and returns a ``float``; floats must be finite;
* ``None`` is accepted only where the argument is optional (``optional=True``);
* every error is a ``ValueError`` that names the argument as the user passed it, what it must
  be, and the value it got: "`distill_steps` must be an int >= 0, got -1".

Example:
    >>> check_int("every", 4, minimum=1)
    4
    >>> check_float("radius", 1, minimum=0, low_open=True)
    1.0
    >>> check_int("every", True, minimum=1)
    Traceback (most recent call last):
    ...
    ValueError: `every` must be an int >= 1, got True
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fmt(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(float(bound))


def _none_or(text: str, optional: bool) -> str:
    return f"None or {text}" if optional else text


def check_int(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    optional: bool = False,
) -> Any:
    """``value`` as an ``int`` (>= ``minimum`` if given); ``None`` passes if ``optional``.

    Example:
        >>> check_int("sample_rows", None, minimum=1, optional=True) is None
        True
    """
    if value is None and optional:
        return None
    if not _is_int(value) or (minimum is not None and value < minimum):
        what = "an int" if minimum is None else f"an int >= {minimum}"
        raise ValueError(f"`{name}` must be {_none_or(what, optional)}, got {value!r}")
    return int(value)


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> Any:
    """``value`` as a finite ``float`` within the bounds; ``None`` passes if ``optional``.

    ``low_open`` / ``high_open`` exclude the bound itself (``> minimum``, ``< maximum``).

    Example:
        >>> check_float("gamma", 0.5, minimum=0, maximum=1, low_open=True)
        0.5
    """
    if value is None and optional:
        return None
    ok = _is_real(value) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if low_open else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if high_open else value <= maximum
    if not ok:
        if minimum is not None and maximum is not None:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            what = f"a finite number in {left}{_fmt(minimum)}, {_fmt(maximum)}{right}"
        elif minimum is not None:
            what = f"a finite number {'>' if low_open else '>='} {_fmt(minimum)}"
        elif maximum is not None:
            what = f"a finite number {'<' if high_open else '<='} {_fmt(maximum)}"
        else:
            what = "a finite number"
        raise ValueError(f"`{name}` must be {_none_or(what, optional)}, got {value!r}")
    return float(value)


def check_fraction(
    name: str, value: Any, *, include_one: bool = True, optional: bool = False
) -> Any:
    """A fraction in ``(0, 1]`` (or ``(0, 1)`` without ``include_one``) as a ``float``.

    Example:
        >>> check_fraction("threshold", 0.97)
        0.97
    """
    return check_float(
        name,
        value,
        minimum=0,
        maximum=1,
        low_open=True,
        high_open=not include_one,
        optional=optional,
    )


def check_choice(name: str, value: Any, choices: Iterable[T]) -> T:
    """``value`` if it is one of ``choices``.

    Example:
        >>> check_choice("combine", "sign", ("sign", "average"))
        'sign'
    """
    options = tuple(choices)
    if isinstance(value, bool) or value not in options:
        raise ValueError(f"`{name}` must be one of {options}, got {value!r}")
    return value  # type: ignore[no-any-return]


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool``.

    Example:
        >>> check_bool("diagnostics", True)
        True
    """
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}")
    return value


def check_str(name: str, value: Any) -> str:
    """``value`` if it is a non-empty string."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"`{name}` must be a non-empty string, got {value!r}")
    return value


def check_callable(name: str, value: Any, what: str, *, optional: bool = False) -> Any:
    """``value`` if it is callable (``what`` describes the expected signature)."""
    if value is None and optional:
        return None
    if not callable(value):
        raise ValueError(f"`{name}` must be {what}, got {type(value).__name__}")
    return value


def check_int_sequence(name: str, value: Any, *, minimum: int = 1) -> tuple[int, ...]:
    """A non-empty sequence of ints >= ``minimum``, as a tuple.

    Example:
        >>> check_int_sequence("hidden_sizes", [8, 8])
        (8, 8)
    """
    try:
        items = tuple(value)
    except TypeError:
        items = ()
    if isinstance(value, str) or not items or not all(_is_int(s) and s >= minimum for s in items):
        raise ValueError(
            f"`{name}` must be a non-empty sequence of ints >= {minimum}, got {value!r}"
        )
    return tuple(int(s) for s in items)


#: What to do with a checkpoint whose state this release cannot read.
RESTART_HINT = (
    "Use the lightning-metagrad release that wrote it, or start a new run; the model weights "
    "alone still load with `model.load_state_dict(torch.load(path)['state_dict'])`."
)


def check_state_version(
    owner: str,
    state: Any,
    reads: int | tuple[int, ...],
    hint: str = RESTART_HINT,
    *,
    unversioned: int | None = None,
) -> None:
    """ValueError unless ``state["version"]`` is one this release reads (``reads``).

    Every ``load_state_dict`` of the package calls it first, so a checkpoint written by
    another release fails with what to do instead of a ``KeyError`` deep inside.
    ``unversioned``: the version of a state without a ``"version"`` entry (the parts of the
    callback's state written before they carried their own version, whose layout is their
    version 1); None: such a state is refused.

    Example:
        >>> check_state_version("SubspacePredictor", {"version": 1}, 1)
        >>> check_state_version("SubspacePredictor", {"version": 7}, 1)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: SubspacePredictor state version 7 cannot be read: it is not supported (this ...
    """
    versions = reads if isinstance(reads, tuple) else (reads,)
    version = state.get("version", unversioned) if isinstance(state, Mapping) else None
    if version in versions and not isinstance(version, bool):
        return
    readable = " or ".join(str(v) for v in versions)
    raise ValueError(
        f"{owner} state version {version!r} cannot be read: it is not supported (this release "
        f"reads version {readable}); the checkpoint was written by another lightning-metagrad "
        f"release. {hint}"
    )
