"""The one exception type that means "the request is wrong": the CLI turns it into exit code 2,
and the check of a number the user gave against the range it must lie in."""

from __future__ import annotations

import math


class UserError(Exception):
    """Bad input. The message is one sentence naming the problem and the fix."""


def check_range(name: str, value: float | None, low: float, high: float = math.inf, *, above_low: bool = False) -> None:
    """`value`, the user's number the library calls `name`, is finite and in [low, high] ((low,
    high] with `above_low`), else a UserError; None (not given) passes. NaN and infinity never do:
    a comparison with NaN is always false, so a plain `value < low` check lets it through."""
    if value is None:
        return
    if not (math.isfinite(value) and (low < value if above_low else low <= value) and value <= high):
        if high == math.inf:
            where = f"above {low:g}" if above_low else f"at least {low:g}"
        else:
            where = f"in {'(' if above_low else '['}{low:g}, {high:g}]"
        raise UserError(f"`{name}` must be {'' if math.isfinite(value) else 'finite and '}{where}, not {value}.")


def check_pct(name: str, value: float) -> None:
    """`value` is a percentage of kernels or channels to remove: finite and in [0, 100), else a UserError."""
    if not (math.isfinite(value) and 0 <= value < 100):
        raise UserError(f"`{name}` must be {'' if math.isfinite(value) else 'finite and '}in [0, 100), not {value}.")
