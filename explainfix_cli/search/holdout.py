"""A limit chosen on some samples must hold on others (docs/method.md §2, "Targets"): the check split.

`prune --max-drop`, its fine-tuned form and `extract --max-drop` choose the largest cut whose
drop on the data is at most X. Chosen and judged on the same samples, the cut fits their noise:
on half of the digits, `extract --max-drop 0.01` chose cuts that lost up to 0.056 AUC on the
other half (benchmarks/holdout_targets.py). So a part of the data is kept for checking: it takes
no part in scoring, ranking or choosing epochs, and a candidate meets the limit only when its drop
is at most X on the rest (the calibration part) and on the check split. The check split is
`--val` when given, else `CHECK_FRACTION` of the data, carved by a permutation seeded by `--seed`
and stratified by class for class labels (every class keeps its share on both sides).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from explainfix_cli.errors import UserError
from explainfix_cli.io.data import Dataset

CHECK_FRACTION = 0.25  # of the data, kept for checking a --max-drop limit when no --val is given
MIN_CHECK_SAMPLES = 20  # below this, a drop measured on the check split is said to mean little


@dataclass
class CheckSplit:
    """The data a limit is chosen on (`calibration`) and the samples it must also hold on (`check`,
    None when the check is off)."""

    calibration: Dataset
    check: Dataset | None


def check_indices(data: Dataset, fraction: float, seed: int = 0) -> list[int]:
    """The samples of `data` (of those used, `batches` applied) kept for checking, in order: a share
    `fraction` drawn by a permutation seeded by `seed`; for class labels, that share of each class."""
    n = data.num_samples
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # (n,)
    labels = data.source.labels
    if data.target_kind != "labels" or labels is None:
        return sorted(order[: round(fraction * n)].tolist())
    ordered = labels[:n][order]  # (n,) the labels in the drawn order
    chosen: list[int] = []
    for c in torch.unique(ordered).tolist():
        members = order[ordered == c]
        chosen += members[: round(fraction * len(members))].tolist()
    return sorted(chosen)


def check_split(data: Dataset, val: Dataset | None = None, fraction: float | None = None, seed: int = 0) -> CheckSplit:
    """`val` as the check split when given (all of `data` calibrates); else `check_indices` of
    `data` kept for checking (`fraction`, default `CHECK_FRACTION`), the rest calibrating.
    `fraction` 0 turns the check off, also with `val` (then only reported, as before)."""
    if fraction is not None and not 0 <= fraction < 1:
        raise UserError(f"`check_fraction` must be in [0, 1), not {fraction}.")
    if fraction == 0:
        return CheckSplit(data, None)
    if val is not None:
        return CheckSplit(data, val)
    fraction = CHECK_FRACTION if fraction is None else fraction
    kept = check_indices(data, fraction, seed)
    if not kept or len(kept) == data.num_samples:
        raise UserError(f"`check_fraction` {fraction:g} of {data.num_samples} samples leaves one side empty; give more data, `val`, or `check_fraction` 0.")
    chosen = set(kept)
    return CheckSplit(data.subset([i for i in range(data.num_samples) if i not in chosen]), data.subset(kept))


def check_note(check: Dataset | None) -> str | None:
    """One sentence when the check split is too small for its drop to mean much (None otherwise)."""
    if check is None or check.num_samples >= MIN_CHECK_SAMPLES:
        return None
    return (
        f"the check split holds only {check.num_samples} samples, too few for the drop measured there to mean much; "
        "give more data, a larger --check-fraction, or --val."
    )
