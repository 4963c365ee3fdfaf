"""CI gates: a measured number against a limit, with a verdict a pipeline can branch on."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .errors import UserError


@dataclass(frozen=True)
class Gate:
    """One limit and its verdict; `sentence` says in words what was measured against what."""

    name: str  # e.g. min_metric, max_drop, max_latency_ms
    limit: float
    value: float | None  # None when the number could not be measured (the gate then fails)
    passed: bool
    sentence: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(v: float) -> str:
    return f"{v:,}" if float(v).is_integer() and abs(v) >= 1000 else f"{v:.4g}"


def at_least(name: str, what: str, value: float | None, limit: float) -> Gate:
    """Passes when `value >= limit`."""
    passed = value is not None and value >= limit
    return Gate(name, limit, value, passed, _sentence(what, value, "at least" if passed else "below", "minimum", limit))


def at_most(name: str, what: str, value: float | None, limit: float) -> Gate:
    """Passes when `value <= limit`."""
    passed = value is not None and value <= limit
    return Gate(name, limit, value, passed, _sentence(what, value, "within" if passed else "above", "maximum", limit))


def _sentence(what: str, value: float | None, relation: str, bound: str, limit: float) -> str:
    if value is None:
        return f"{what} could not be measured, so the {bound} of {_fmt(limit)} is not met."
    return f"{what} is {_fmt(value)}, {relation} the {bound} of {_fmt(limit)}."


def check_limit(name: str, limit: float | None, low: float, high: float = math.inf, *, above_low: bool = False) -> None:
    """A limit some value can meet, else a usage error: in [low, high] ((low, high] with
    `above_low`), never NaN. A gate with an impossible limit is a mistake in the command, which
    must not pass for a failed gate (exit 2, before any model is loaded, not 1 after measuring)."""
    if limit is None:
        return
    inside = (low < limit if above_low else low <= limit) and limit <= high  # False for NaN
    if not inside:
        where = f"above {_fmt(low)}" if above_low and high == math.inf else f"at least {_fmt(low)}" if high == math.inf else f"in [{_fmt(low)}, {_fmt(high)}]"
        raise UserError(f"`{name}` must be {where}, not {limit}.")


def failed(gates: list[Gate]) -> list[Gate]:
    return [g for g in gates if not g.passed]
