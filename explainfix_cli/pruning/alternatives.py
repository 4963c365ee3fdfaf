"""What the other ways of removing would take, when the prune asked for took little (docs/method.md §3).

Exact removal takes a channel only when removing it leaves the output unchanged for every input.
Two families of networks defeat that rule by design: a zeroed depthwise channel whose constant is
multiplied by a squeeze-and-excitation gate (MobileNetV3, EfficientNet) is not a constant of the
input any more, and a channel read by a normalisation across channels (LayerNorm in ConvNeXt,
GroupNorm) changes every other channel's statistics. On such a model a default prune zeroes 90 %
of the kernels and writes a file nearly as large as the input.

So when a prune removes less than `LITTLE` of the parameters although zeroing emptied many
channels (`took_little`), the same pct is tried, on copies of
the unpruned model and with the same saliency scores (no second saliency pass), under the modes
that can take more: `--removal calibrated` (channels constant on the data), `--removal aggressive`
(silent channels, whatever reads them) and `--granularity channel` (the least salient channels).
Each is reported with the parameters it removes and its metric on the data (and on `--val`).

The recommendation: among the alternatives that remove at least `ENOUGH` of the parameters, the
one with the best metric on held-out data (`--val`), else on the data; channel granularity wins
ties, because it is the one whose removal is ranked by saliency rather than a side effect of
zeroing. Measured at pct 90 (benchmarks/prune_families.py): the MobileNet sample exact 19 %,
calibrated 60 %, channel 75 %; ConvNeXt 0 / 0 / 89 %; torchvision's mobilenet_v3_small 0.6 / 54 /
51 %; efficientnet_b0 0 / 84 / 80 %.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from explainfix_cli.io.data import Dataset
from explainfix_cli.numbers import strict
from explainfix_cli.pruning.channels import NORM_ACROSS_CHANNELS

LITTLE = 0.25  # a prune that removes less than this share of the parameters took little
ENOUGH = 0.40  # an alternative worth recommending removes at least this share
EMPTIED = 0.05  # ... and zeroing emptied at least this share of the spatial output channels

MODES: tuple[tuple[str, str], ...] = (("kernel", "calibrated"), ("kernel", "aggressive"), ("channel", "exact"))


@dataclass
class Alternative:
    """One other mode at the same pct: what it removes and what it scores (docs/cli.md `prune --json` `alternatives`)."""

    granularity: str
    removal: str
    params_after: int
    params_removed_share: float
    macs_after: int
    metric_after: float | None
    val_metric_after: float | None

    @property
    def options(self) -> str:
        """The command-line options that select this mode."""
        if self.granularity == "channel":
            return "--granularity channel"
        return f"--removal {self.removal}"

    def to_json(self) -> dict[str, Any]:
        return strict({**asdict(self), "options": self.options})


def removed_share(report: Any) -> float:
    """The share of the input's parameters the pruned model no longer has (`PruneReport`)."""
    return (report.params_before - report.params_after) / report.params_before if report.params_before else 0.0


def emptied_channels(model: nn.Module, scores: dict[str, Any], pct: float, min_kernels_per_layer: int = 0) -> tuple[int, int]:
    """(output channels of spatial convs whose every kernel zeroing at `pct` takes, all output
    channels of spatial convs), read off the ranking without changing `model` (§2)."""
    from explainfix_cli.models import spatial_convs
    from explainfix_cli.pruning.pipeline import least_salient_kernels

    masks = least_salient_kernels(model, scores, pct, min_kernels_per_layer)  # name -> (O, I/groups)
    return sum(int(m.all(dim=1).sum()) for m in masks.values()), sum(c.weight.shape[0] for _, c in spatial_convs(model))


def took_little(report: Any, emptied: int, channels: int) -> bool:
    """Whether exact removal could not take what zeroing emptied: the prune removed less than
    `LITTLE` of the parameters, zeroing emptied at least `EMPTIED` of the spatial output channels,
    and fewer than half of those went; or a normalisation across channels kept groups whole.
    A plain network pruned at a low pct empties few channels
    (its zeroed kernels are scattered) and is not told anything; a squeeze-and-excitation or
    LayerNorm network at a high pct empties many that exact removal must keep."""
    if report.granularity != "kernel" or removed_share(report) >= LITTLE:
        return False
    if NORM_ACROSS_CHANNELS in report.blocked_groups:  # exact removal can never take those channels
        return True
    return emptied >= EMPTIED * channels and report.channels_removed < emptied / 2


def alternatives(unpruned: nn.Module, data: Dataset | None, report: Any, settings: Any) -> list[Alternative]:
    """The modes of `MODES` the prune did not use, each run at the report's pct on a copy of
    `unpruned` with `settings` (a `PruneSettings` carrying the saliency scores), nothing written
    and nothing fixed; the modes that need the data (`calibrated`) are skipped without it."""
    from explainfix_cli.pruning.pipeline import PruneSettings, prune

    found = []
    for granularity, removal in MODES:
        if (granularity, removal) == (report.granularity, report.removal) or (removal == "calibrated" and data is None):
            continue
        if report.granularity == "channel" and granularity == "kernel":
            continue  # channel granularity already removes by saliency; zeroing modes take less
        options = {"granularity": granularity, "removal": removal, "pct": report.pct, "out": None, "fix": False, "history": None, "fill": "zero"}
        _, other = prune(copy.deepcopy(unpruned), data, PruneSettings.of(settings, options))
        share = round(removed_share(other), 4)
        found.append(Alternative(granularity, removal, other.params_after, share, other.macs_after, other.metric_after, other.val_metric_after))
    return found


def recommendation(found: list[Alternative]) -> Alternative | None:
    """The alternative to recommend (see the module docstring), or None when none removes `ENOUGH`."""
    enough = [a for a in found if a.params_removed_share >= ENOUGH]
    if not enough:
        return None

    def score(a: Alternative) -> tuple[float, int]:
        held = a.val_metric_after if a.val_metric_after is not None else a.metric_after
        return (held if held is not None else 0.0, int(a.granularity == "channel"))

    return max(enough, key=score)


@dataclass
class Advice:
    """The alternatives measured after a prune that took little, and the one recommended."""

    alternatives: list[Alternative]
    recommended: Alternative | None

    def to_json(self) -> dict[str, Any]:
        return {"alternatives": [a.to_json() for a in self.alternatives], "recommendation": None if self.recommended is None else self.recommended.options}

    def line(self, report: Any) -> str | None:
        """One sentence for a person (stderr), or None when there is nothing to say."""
        if not self.alternatives:
            return None
        measured = "; ".join(f"{a.options} {a.params_removed_share:.0%}" for a in self.alternatives)
        head = f"this prune removed {removed_share(report):.0%} of the parameters (--removal {report.removal}, --granularity {report.granularity}); at pct {report.pct:g} {measured}"
        if self.recommended is None:
            return f"{head}: no mode removes {ENOUGH:.0%} or more at this pct."
        return f"{head}: prune with {self.recommended.options}, then `explainfix finetune` the result to recover its accuracy."


def prune_with_alternatives(model: nn.Module, data: Dataset | None, settings: Any) -> tuple[nn.Module, Any, Advice]:
    """`prune` (docs/method.md §1-4), then, when it took little (`took_little`), the alternatives at
    the same pct and the one recommended. The saliency scores and the unpruned model's outputs are
    computed once and shared with every alternative; `model` is pruned in place, as by `prune`."""
    import torch

    from explainfix_cli.pruning.pipeline import PruneSettings, prune
    from explainfix_cli.saliency import spatial_saliency

    s = PruneSettings.of(settings, {})
    unpruned = copy.deepcopy(model).to(s.device)
    if s.scores is None:
        seen: list[torch.Tensor] = []
        scores = spatial_saliency(model.eval().to(s.device), data, s.criterion, s.device, outputs=seen)
        s = PruneSettings.of(s, {"scores": scores, "reference_outputs": torch.cat(seen) if seen else s.reference_outputs})
    emptied, channels = emptied_channels(model, s.scores, s.pct, s.min_kernels_per_layer) if s.granularity == "kernel" else (0, 0)
    model, report = prune(model, data, s)
    if not took_little(report, emptied, channels):
        return model, report, Advice([], None)
    found = alternatives(unpruned, data, report, s)
    return model, report, Advice(found, recommendation(found))
