"""CI gates: a measured number against a limit, with a verdict a pipeline can branch on."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


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


def failed(gates: list[Gate]) -> list[Gate]:
    return [g for g in gates if not g.passed]
