"""What a target search got, in one sentence when it is not what the user asked for (docs/cli.md `prune --max-drop`).

`--max-drop` finds the largest pct whose metric falls at most X. On a network whose kernels carry
its accuracy (3x3 convolutions only), that pct can be a few percent, and zeroing a few percent of
the kernels rarely empties a whole channel, so exact removal takes no parameter: the file written
is as large as the input. `target_note` says so, with the two ways forward.
"""

from __future__ import annotations

from typing import Any


def params_removed(report: Any) -> int:
    """Parameters the written model has fewer than the input (`PruneReport`)."""
    return int(report.params_before - report.params_after)


def target_note(report: Any, max_drop: float | None, finetuned: bool) -> str | None:
    """One sentence when the pct chosen for `max_drop` removes no parameter (None otherwise), with
    the way forward: fine-tune while searching, so that a higher pct keeps the metric, or remove
    whole channels against a size budget."""
    if max_drop is None or params_removed(report) > 0:
        return None
    tune = (
        "fine-tuning each probe longer (a larger --finetune-epochs K)"
        if finetuned
        else "fine-tuning while searching (--finetune-epochs K --train TRAIN), so that a higher pct keeps the metric"
    )
    return (
        f"pct {report.pct:g}, the largest that keeps the {report.metric or 'metric'} within {max_drop:g}, zeroes "
        f"{report.zeroed_kernels:,} kernels but removes no parameter (no channel is left empty), so the model written "
        f"is as large as the input; to make it smaller, try {tune}, or remove whole channels to a size budget "
        f"(--granularity channel --max-params N)."
    )
