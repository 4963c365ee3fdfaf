"""What `finetune` trains, decided from what is left to learn (docs/method.md §4, "What fine-tuning trains").

A pruned, spatially fixed network learns only its channel mixers (1x1 convolutions), normalisation
and linear layers. Networks built with pointwise layers (the DenseNet, MobileNet, ConvNeXt samples) keep enough of them
to recover; a network of 3x3 convolutions only keeps a few hundred (batch norms and the head) and
does not. `choose_trainable` measures the share of the live parameters (the trainable ones plus
the non-zero spatial kernels' weights) that fixing leaves trainable, and below `MIN_TRAINABLE_SHARE`
trains the surviving spatial kernels too, with every pruned (all-zero) kernel held at exactly
zero (`masked_kernels`): the model keeps its sparsity, its zero count and its removable channels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from explainfix_cli.models import spatial_convs

# Below this share of the live parameters trainable with the spatial filters fixed, the surviving
# kernels are trained too (masked). Measured at pct 90, saliency and best epoch on half A of the
# validation split, judged on half B (docs/method.md §4): 3x3-only networks keep 0.14-0.25 and the
# U-Net sample 0.07, the ResNet sample 0.35 (fixed 0.978, masked 1.000 against 0.994 unpruned);
# DenseNet keeps 0.53, DenseNet-BC 0.72, MobileNet 0.99, ConvNeXt 0.95, and recover fixed.
MIN_TRAINABLE_SHARE = 0.6  # measured: benchmarks/adaptive_finetune.py, docs/method.md §4
# A fine-tune (`--train auto` with a teacher) still more than this below the teacher on the
# validation data halfway through its epochs hands the other half to the next form, fixed ->
# masked -> all (`next_form`): the 3x3-only networks keep too few kernels for masked training to
# recover (residual 0.944, examples/own_model 0.800 against 0.994 and 0.972); handing over, within
# the same 20 epochs, they reach 0.978 and 0.967 (docs/method.md §4).
ESCALATION_GAP = 0.01


FORM_IN_WORDS = {
    "masked": "the surviving spatial kernels too, the pruned ones held at zero",
    "all": "every parameter (the zeroed kernels learn again; the size is the same)",
}


def next_form(model: nn.Module, trained: str, *, smaller_than_teacher: bool) -> str | None:
    """The form to continue with after `trained` fell short of the teacher (docs/method.md §4), or
    None: "unfixed" → "masked" for a pruned model (smaller than its teacher, or with zeroed kernels;
    a network fixed to train from scratch stays fixed), "masked" → "all" where pruned kernels were
    held at zero (without any, masked training already trained every kernel)."""
    if trained == "unfixed":
        return "masked" if _fixed_kernels(model) and (smaller_than_teacher or _pruned(model)) else None
    if trained == "masked":
        return "all" if _has_zero_kernels(model) else None
    return None


def _has_zero_kernels(model: nn.Module) -> bool:
    return any(bool((c.weight == 0).flatten(2).all(dim=2).any()) for _, c in spatial_convs(model))


def escalates(goal: float | None, reached: float | None) -> bool:
    """Whether a fine-tune ended more than `ESCALATION_GAP` below the teacher's metric `goal` on the
    validation data (docs/method.md §4), so that it hands over to the next form (`next_form`)."""
    return goal is not None and reached is not None and goal - reached > ESCALATION_GAP


@dataclass(frozen=True)
class TrainableChoice:
    """The parameters a fine-tune trains: `mode` "unfixed" (the spatial filters stay fixed), "masked"
    (the surviving spatial kernels learn too, the pruned ones stay zero) or "all"; `option` is what
    was asked ("auto" lets `choose_trainable` decide), `share` the live parameters' share trainable
    with the filters fixed, `reason` one sentence for a person."""

    mode: str
    option: str
    share: float
    unfixed_params: int  # trainable with the spatial filters fixed
    live_params: int  # those plus the weights of the non-zero spatial kernels
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _fixed_kernels(model: nn.Module) -> list[nn.Conv2d]:
    return [conv for _, conv in spatial_convs(model) if not conv.weight.requires_grad]


def _pruned(model: nn.Module) -> bool:
    """Has a fixed spatial conv an all-zero kernel? (A network fixed for training from scratch has none: it stays fixed.)"""
    return any(bool((c.weight == 0).flatten(2).all(dim=2).any()) for c in _fixed_kernels(model))


def live_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, those plus the weights of the non-zero kernels of the fixed spatial convs)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kernels = 0
    for conv in _fixed_kernels(model):
        w = conv.weight  # (O, I/groups, kh, kw)
        kernels += int((w != 0).flatten(2).any(dim=2).sum()) * w.shape[2] * w.shape[3]
    return trainable, trainable + kernels


def choose_trainable(model: nn.Module, option: str) -> TrainableChoice:
    """`option` "auto": "masked" when the model is pruned (a fixed spatial conv has an all-zero
    kernel) and fixing leaves less than `MIN_TRAINABLE_SHARE` of the live parameters trainable,
    else "unfixed" (a network fixed to be trained from scratch stays fixed); any other option as given."""
    unfixed, live = live_counts(model)
    share = unfixed / live if live else 1.0
    if option != "auto":
        return TrainableChoice(option, option, round(share, 4), unfixed, live, f"--train {option} as asked")
    if not _pruned(model) or share >= MIN_TRAINABLE_SHARE:
        reason = f"the spatial filters stay fixed: {unfixed:,} of {live:,} live parameters ({share:.0%}) are trainable without them"
        return TrainableChoice("unfixed", option, round(share, 4), unfixed, live, reason)
    reason = (
        f"with the spatial filters fixed only {unfixed:,} of {live:,} live parameters ({share:.0%}) would learn, "
        f"so the surviving spatial kernels are trained too and the pruned ones held at zero (--train unfixed keeps them fixed)"
    )
    return TrainableChoice("masked", option, round(share, 4), unfixed, live, reason)


@contextmanager
def trained_as(model: nn.Module, choice: TrainableChoice) -> Iterator[list[nn.Parameter]]:
    """While inside, the parameters `choice` trains have `requires_grad`; yields them. "all" unfreezes
    every floating-point parameter for good (the written model has nothing fixed); "masked" trains
    the fixed spatial convs' weights and biases under `masked_kernels` and fixes them again on leaving,
    so the written model records the same fixed tensors as the one given."""
    if choice.mode == "all":
        for p in model.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
    if choice.mode != "masked":
        yield [p for p in model.parameters() if p.requires_grad]
        return
    with masked_kernels(model):
        yield [p for p in model.parameters() if p.requires_grad]


@contextmanager
def masked_kernels(model: nn.Module) -> Iterator[int]:
    """While inside, every fixed spatial conv learns (weight and bias), except that its all-zero
    kernels stay exactly zero: their gradient is zeroed before the optimiser sees it, and the weight
    is multiplied by the kernel mask before every forward and on leaving (so no optimiser's
    weight decay or momentum can move them). Yields how many kernels are held at zero."""
    convs = _fixed_kernels(model)
    handles: list[Any] = []
    masks: list[tuple[nn.Conv2d, torch.Tensor]] = []
    held = 0
    for conv in convs:
        mask = (conv.weight != 0).flatten(2).any(dim=2)[:, :, None, None].to(conv.weight.dtype)  # (O, I/groups, 1, 1)
        held += int((mask == 0).sum())
        masks.append((conv, mask))
        for p in conv.parameters(recurse=False):
            p.requires_grad_(True)
        handles.append(conv.weight.register_hook(lambda g, m=mask: g * m.to(g.device)))
        handles.append(conv.register_forward_pre_hook(lambda module, args, m=mask: _rezero(module, m)))
    try:
        yield held
    finally:
        for handle in handles:
            handle.remove()
        for conv, mask in masks:
            _rezero(conv, mask)
            for p in conv.parameters(recurse=False):
                p.requires_grad_(False)


def _rezero(conv: nn.Module, mask: torch.Tensor) -> None:
    with torch.no_grad():
        conv.weight.mul_(mask.to(conv.weight.device))
