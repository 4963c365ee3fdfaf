"""The loss of each target kind, against few-line computations written out here; and `evaluate`
reports the loss `finetune` minimises."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import SAMPLES, sample_data
from pytest import approx

from explainfix_cli.evaluation.measure import outputs
from explainfix_cli.evaluation.scores import evaluate
from explainfix_cli.io.checkpoints import open_model
from explainfix_cli.io.data import Dataset
from explainfix_cli.training.finetune import Recipe, finetune
from explainfix_cli.training.losses import loss_for, soft_dice_loss


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



def test_soft_dice_pools_the_batch_as_the_reported_dice_does() -> None:
    # two images: one with foreground, one without; the batch form is not the mean of the two
    logits = torch.tensor([[[[2.0, -2.0]]], [[[1.0, 1.0]]]])  # (2, 1, 1, 2)
    mask = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 0.0]]]])
    p = [1 / (1 + math.exp(-z)) for z in (2.0, -2.0, 1.0, 1.0)]
    pooled = 1 - (2 * p[0] + 1) / (sum(p) + 1 + 1)
    per_image = ((1 - (2 * p[0] + 1) / (p[0] + p[1] + 1 + 1)) + (1 - 1 / (p[2] + p[3] + 1))) / 2
    assert float(soft_dice_loss(logits, mask)) == approx(pooled, rel=1e-6)
    assert abs(pooled - per_image) > 0.04


@pytest.mark.parametrize("name", ["resnet", "resnet_multilabel", "unet"])
def test_evaluate_reports_the_loss_finetune_minimises(name: str) -> None:
    """The same batch, the same weights: `evaluate`'s loss equals the loss of `finetune`'s first
    step (its epoch loss, on one minibatch; batch norms frozen, so train mode computes what eval
    mode does)."""
    loaded = open_model(SAMPLES / f"{name}.safetensors")
    val = sample_data(name)
    batch = Dataset(val.x[:32], val.y[:32], batch_size=32)
    reported = evaluate(copy.deepcopy(loaded.model), batch).model.loss
    _, report = finetune(copy.deepcopy(loaded.model), batch, batch, recipe=Recipe(epochs=1, batch_norm="frozen"))
    minimised = report.history[0].loss
    print(f"{name}: evaluate {reported:.6f}, finetune {minimised:.6f}")
    assert reported is not None and minimised == approx(reported, abs=2e-6)
    if name == "unet":  # the per-sample Dice finetune used before differs by far more than that
        out = outputs(loaded.model, batch)
        p, t = out.sigmoid().flatten(1), batch.y.flatten(1)  # (N, H*W)
        per_sample = F.binary_cross_entropy_with_logits(out, batch.y) + (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()
        print(f"unet: per-sample Dice form {float(per_sample):.6f}")
        assert abs(float(per_sample) - reported) > 1e-3
