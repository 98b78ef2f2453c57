"""Number formatting shared by the report's tables, titles and sentences."""

from __future__ import annotations

import math
import numbers

__all__ = ["format_value", "format_change", "format_integer_list"]


def format_value(value: numbers.Real | None, digits: int = 4) -> str:
    """Format a number with ``digits`` significant digits, and None or NaN as "n/a".

    Integers and values of 10,000 or more are printed without an exponent, so
    step numbers and large participation ratios stay readable.
    """
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))

    number = float(value)
    if math.isnan(number):
        return "n/a"
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    if abs(number) >= 10_000:
        return f"{number:.0f}"
    return f"{number:.{digits}g}"


def format_change(value: numbers.Real | None, digits: int = 3) -> str:
    """Format a difference like :func:`format_value`, with a "+" sign on positive values."""
    text = format_value(value, digits)
    if value is not None and float(value) > 0:
        return f"+{text}"
    return text


def format_integer_list(values: list[int]) -> str:
    """Join integers as "0, 1 and 2", for sentences that list layers or steps."""
    words = [str(int(value)) for value in values]
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]
