"""The loss that goes with each kind of target (docs/method.md §1's three kinds), in one place.

Class labels → cross-entropy; multi-label 0/1 targets → binary cross-entropy on the logits;
segmentation masks → binary cross-entropy plus the soft Dice loss (the usual pairing for masks
whose foreground is a small share of the pixels). `evaluate` reports `loss_for(kind)` on held-out
data and `finetune` minimises the same function on every minibatch (`finetune.batch_loss`), so
the two numbers are one loss; `distill_loss` is the teacher's term `finetune` adds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from explainfix_cli.io.data import TargetKind

DICE_SMOOTH = 1.0  # keeps the soft Dice defined (and its gradient finite) on an all-background batch


@dataclass(frozen=True)
class Loss:
    """A loss of the model's raw outputs (logits) and the data's targets, averaged over the batch."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.fn(output, target)


def soft_dice_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - (2 Σ p·t + s) / (Σ p + Σ t + s), p = sigmoid(logits), summed over the whole batch.

    Summed over the batch, not per sample and then averaged: the Dice that `evaluate` and
    `finetune` report (`measure.metric`) pools every pixel of every image, `2 Σ pred·truth /
    (Σ pred + Σ truth)`, and this is its soft form, so lowering the loss is raising that metric.
    A per-sample mean would weigh each image alike whatever its foreground, and with the smoothing
    an image without foreground would cost `Σp / (Σp + s)`: half its Dice term for one pixel's
    worth of faint probability, a weight the reported Dice does not give it. Under torchrun each
    process sums over its shard of the minibatch.
    """
    p = torch.sigmoid(logits)  # (N, K, H, W)
    t = mask.to(p.dtype)
    return 1 - (2 * (p * t).sum() + DICE_SMOOTH) / (p.sum() + t.sum() + DICE_SMOOTH)


def _cross_entropy(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, labels)


def _bce(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(output, target.to(output.dtype))


def _bce_dice(output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _bce(output, mask) + soft_dice_loss(output, mask)


_LOSSES = {
    "labels": Loss("cross_entropy", _cross_entropy),
    "multilabel": Loss("bce", _bce),
    "mask": Loss("bce_dice", _bce_dice),
}


def loss_for(kind: TargetKind) -> Loss:
    """The loss for a target kind (`Dataset.target_kind`): labels, multilabel or mask."""
    return _LOSSES[kind]


def distill_loss(out: torch.Tensor, teacher: torch.Tensor, kind: TargetKind, temperature: float) -> torch.Tensor:
    """Distillation loss from softened logits (Hinton et al., 2015), scaled by T², averaged over the batch.

    Class labels: KL(softmax(teacher/T) || softmax(out/T)) per sample. Multi-label and masks: BCE
    of the student's softened logits against the teacher's softened probabilities, per label or
    pixel.
    """
    t2 = temperature**2
    if kind == "labels":
        log_p = F.log_softmax(out / temperature, dim=1)  # (N, K)
        log_q = F.log_softmax(teacher / temperature, dim=1)  # (N, K)
        return t2 * (log_q.exp() * (log_q - log_p)).sum(dim=1).mean()
    soft = torch.sigmoid(teacher / temperature)
    return t2 * F.binary_cross_entropy_with_logits(out / temperature, soft)
