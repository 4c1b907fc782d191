"""Argument checks shared by the whole library (optimizers, layers, rules, export, benchmarks).

Every check raises one ``ValueError`` line that names the argument, says what is allowed and
shows what was given: ``<name> must be <allowed>, got <value!r>``. Numbers are ints or floats
(numpy scalars included), never bools; NaN lies in no range, and ±inf (or an int beyond the
float range) only where ``allow_inf=True`` says so (the message then asks for "a finite number").
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")


def fail(name: str, value: Any, allowed: str) -> NoReturn:
    """Raise the one-line ``ValueError``: ``<name> must be <allowed>, got <value!r>``."""
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def require(ok: bool, name: str, value: Any, allowed: str) -> None:
    """:func:`fail` unless ``ok``."""
    if not ok:
        fail(name, value, allowed)


def _range_text(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if low == -math.inf and high == math.inf:
        return ""
    if high == math.inf:
        return f" {'>' if low_open else '>='} {low}"
    if low == -math.inf:
        return f" {'<' if high_open else '<='} {high}"
    return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _is_infinite(value: Any) -> bool:
    """Whether the real ``value`` is ±inf as a float (an int too large for a float counts)."""
    try:
        return math.isinf(value)
    except OverflowError:
        return True


def _check_real(
    kind: str,
    integral: bool,
    name: str,
    value: Any,
    bounds: tuple[float, float, bool, bool],
    optional: bool,
    allow_inf: bool = False,
) -> None:
    low, high, low_open, high_open = bounds
    base = numbers.Integral if integral else numbers.Real
    ok = isinstance(value, base) and not isinstance(value, bool)
    ok = ok and (low < value if low_open else low <= value)
    ok = ok and (value < high if high_open else value <= high)
    refused_inf = ok and not integral and not allow_inf and _is_infinite(value)
    if not ok or refused_inf:  # "finite" is named only where it is the reason
        kind = "a finite number" if refused_inf else kind
        fail(name, value, ("None or " if optional else "") + kind + _range_text(*bounds))


def number(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
) -> float:
    """``value`` as a float when it is a finite number in the range (closed ends unless
    ``*_open``; ±inf too with ``allow_inf``), e.g. ``number("rho", 1.5, 0, 1)`` raises ``rho must
    be a number in [0, 1], got 1.5`` and ``number("lr", math.inf, 0)`` raises ``lr must be a
    finite number >= 0, got inf``."""
    _check_real("a number", False, name, value, (low, high, low_open, high_open), False,
                allow_inf)
    return float(value)


def integer(name: str, value: Any, low: float = -math.inf, high: float = math.inf) -> int:
    """``value`` when it is an integer (not a bool) in ``[low, high]``,
    e.g. ``integer("K", 0, 1)`` raises ``K must be an integer >= 1, got 0``."""
    _check_real("an integer", True, name, value, (low, high, False, False), False)
    return int(value)


def optional_number(name: str, value: Any, low: float = -math.inf, *, low_open: bool = False,
                    allow_inf: bool = False) -> float | None:
    """None, or :func:`number` ``>= low`` (``> low`` with ``low_open``)."""
    if value is None:
        return None
    _check_real("a number", False, name, value, (low, math.inf, low_open, False), True,
                allow_inf)
    return float(value)


def optional_integer(name: str, value: Any, low: float = -math.inf) -> int | None:
    """None, or :func:`integer` ``>= low``."""
    if value is None:
        return None
    _check_real("an integer", True, name, value, (low, math.inf, False, False), True)
    return int(value)


def int_tuple(name: str, value: Any, low: float = -math.inf, *, non_empty: bool = False
              ) -> tuple[int, ...]:
    """``value`` as a tuple of ints when it is an iterable (tuple, list, ``torch.Size``; not a
    string) of integers (not bools) ``>= low``, at least one with ``non_empty``, e.g.
    ``int_tuple("shape", (2, 0), 1)`` raises ``shape must be a tuple of integers >= 1, got (2, 0)``.
    """
    iterable = isinstance(value, Iterable) and not isinstance(value, str | bytes)
    items = tuple(value) if iterable else ()
    ok = iterable and (len(items) > 0 or not non_empty)
    ok = ok and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low
                    for v in items)
    if not ok:
        kind = f"a {'non-empty ' if non_empty else ''}tuple of integers"
        fail(name, value, kind + _range_text(low, math.inf, False, False))
    return tuple(int(v) for v in items)


def number_tuple(
    name: str,
    value: Any,
    length: int,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> tuple[float, ...]:
    """``value`` as a tuple of ``length`` floats when it is a tuple or list of that many finite
    numbers in the range, e.g. ``number_tuple("betas", (0.9,), 2, 0, 1, high_open=True)`` raises
    ``betas must be a tuple of 2 numbers in [0, 1), got (0.9,)``; a bad item is named
    ``betas[i]`` (:func:`number`)."""
    bounds = (low, high, low_open, high_open)
    sized = isinstance(value, Sequence) and not isinstance(value, str | bytes)
    require(sized and len(value) == length, name, value,
            f"a tuple of {length} numbers" + _range_text(*bounds))
    return tuple(number(f"{name}[{i}]", v, low, high, low_open=low_open, high_open=high_open)
                 for i, v in enumerate(value))


def choice(name: str, value: T, allowed: Iterable[Any]) -> T:
    """``value`` when it is one of ``allowed``: ``mode must be one of a, b, got 'c'``."""
    options = tuple(allowed)
    require(value in options, name, value, f"one of {', '.join(map(str, options))}")
    return value


def optional_bool(name: str, value: Any) -> bool | None:
    """``value`` when it is None, True or False (not 0, 1 or any other stand-in)."""
    require(value is None or isinstance(value, bool), name, value, "None, True or False")
    return value


def known_keys(
    owner: str, given: Iterable[str], allowed: Iterable[str] | dict[str, str], kind: str = "key"
) -> None:
    """Every name in ``given`` is ``allowed``; otherwise one line ``<owner> has no <kind> 'x';
    allowed: a, b`` (``no <kind> ...`` without an owner). A dict ``allowed`` describes each name
    (``a: int``)."""
    names = list(allowed)
    unknown = sorted(set(given) - set(names))
    if unknown:
        listed = ", ".join(f"{n}: {allowed[n]}" if isinstance(allowed, dict) else n
                           for n in names) or "none"
        subject = f"{owner} has no" if owner else "no"
        raise ValueError(f"{subject} {kind} {', '.join(map(repr, unknown))}; allowed: {listed}")
