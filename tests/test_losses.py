"""The loss of each target kind, against few-line computations written out here."""

from __future__ import annotations

import math

import torch
from pytest import approx

from explainfix_cli.training.losses import loss_for


def test_cross_entropy_for_labels_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])  # (2, 3)
    labels = torch.tensor([0, 1])
    by_hand = [-(2.0 - math.log(math.exp(2) + 1 + math.exp(-1))), -(0.5 - math.log(2 * math.exp(0.5) + math.exp(3)))]
    loss = loss_for("labels")
    assert loss.name == "cross_entropy"
    assert float(loss(logits, labels)) == approx(sum(by_hand) / 2, rel=1e-5)


def test_bce_for_multilabel_by_hand() -> None:
    logits = torch.tensor([[0.0, 2.0], [-1.0, 1.0]])  # (2, 2)
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    terms = [-math.log(sig(0.0)), -math.log(1 - sig(2.0)), -math.log(1 - sig(-1.0)), -math.log(sig(1.0))]
    loss = loss_for("multilabel")
    assert loss.name == "bce"
    assert float(loss(logits, target)) == approx(sum(terms) / 4, rel=1e-5)


def test_bce_plus_soft_dice_for_masks() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 4, 4, generator=g)  # (N, K, H, W)
    mask = (torch.rand(2, 1, 4, 4, generator=g) > 0.6).float()
    p, t = logits.sigmoid().flatten().tolist(), mask.flatten().tolist()
    bce = -sum(ti * math.log(pi) + (1 - ti) * math.log(1 - pi) for pi, ti in zip(p, t, strict=True)) / len(p)
    dice = 1 - (2 * sum(pi * ti for pi, ti in zip(p, t, strict=True)) + 1) / (sum(p) + sum(t) + 1)
    loss = loss_for("mask")
    assert loss.name == "bce_dice"
    assert float(loss(logits, mask)) == approx(bce + dice, rel=1e-5)
    # a perfect, confident prediction costs almost nothing
    assert float(loss(mask * 40 - 20, mask)) < 1e-6

