"""The one rule for numbers that may be undefined: JSON has no NaN or infinity, so such a value
(an AUC over labels of one kind, a share of an all-zero layer) is reported as null."""

from __future__ import annotations

import math
from typing import Any


def finite(value: float | None) -> float | None:
    """`value`, or None where it is None, NaN or infinite."""
    return None if value is None or not math.isfinite(value) else value


def strict(value: Any) -> Any:
    """`value` with every non-finite float, however deeply nested in dicts and lists, as None."""
    if isinstance(value, float):
        return finite(value)
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value
