"""Training a fixed, pruned model on only what its non-zero kernels use (explainfix_cli/narrowing.py,
docs/method.md §4): the outputs and every gradient that matters are those of the plain model."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from helpers import SAMPLES
from torch import nn

from explainfix_cli.io.checkpoints import load_model
from explainfix_cli.io.data import load_data
from explainfix_cli.models import spatial_convs
from explainfix_cli.pruning.pipeline import prune
from explainfix_cli.training import finetune as training
from explainfix_cli.training.finetune import Recipe, finetune
from explainfix_cli.training.narrowing import reading_used_inputs, skipping_unread_channels


def test_fixed_convolutions_read_only_the_inputs_their_kernels_use() -> None:
    # the DenseNet sample pruned at 90 %: its convolutions keep reading concatenated channels whose
    # kernels are all zero (later layers still need those channels, so removal cannot take them)
    data = load_data(SAMPLES / "digits_val.npz", batch_size=32, batches=2)
    model, _ = prune(load_model(SAMPLES / "densenet.safetensors"), data, pct=90)  # spatial filters fixed
    model.train()
    x, y = data.x[:32], data.y[:32]

    def forward_backward() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        out = model(x)
        nn.functional.cross_entropy(out, y).backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain_out, plain_grads = forward_backward()
    with reading_used_inputs(model) as narrowed:
        narrow_convs = [c for _, c in spatial_convs(model) if "forward" in vars(c)]
        read = {c: c.forward.args[2].shape[1] for c in narrow_convs}  # input channels each really reads
        out, grads = forward_backward()
    assert narrowed == len(narrow_convs) > 0
    for conv, channels in read.items():
        used = int((conv.weight != 0).flatten(2).any(2).any(0).sum())
        assert channels == used < conv.in_channels
    torch.testing.assert_close(out, plain_out, rtol=1e-5, atol=1e-5)
    for g, plain in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(g, plain, rtol=1e-4, atol=1e-6)
    assert not any("forward" in vars(c) for _, c in spatial_convs(model))  # every convolution is itself again


class Inverted(nn.Module):
    """1x1 expansion -> BN -> ReLU -> fixed depthwise 3x3 -> BN -> ReLU, gated by its own mean (as
    squeeze-and-excitation does), then a head; `tap` also reads the expansion's output elsewhere."""

    def __init__(self, tap: bool = False, between: nn.Module | None = None) -> None:
        super().__init__()
        self.expand, self.norm, self.act = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU()
        self.between = between or nn.Identity()
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.after = nn.Sequential(nn.BatchNorm2d(6), nn.Hardswish())
        self.head = nn.Linear(6, 4)
        self.tap = tap
        self.depthwise.requires_grad_(False)
        with torch.no_grad():
            self.depthwise.weight[[1, 3, 4]] = 0  # channels 1, 3, 4: their depthwise output is the bias
            for bn in (self.norm, self.after[0]):
                bn.weight.uniform_(0.5, 2)
                bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.expand(x)
        h = self.after(self.depthwise(self.between(self.act(self.norm(e)))))  # (N, 6, H, W)
        h = h * torch.sigmoid(h.mean(dim=(2, 3), keepdim=True))  # a gate: constant channels still matter
        out = self.head(h.mean(dim=(2, 3)))
        return out + e.mean() if self.tap else out


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_what_feeds_only_zero_depthwise_kernels_is_skipped_exactly() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5)
    plain = Inverted().train()
    narrow = copy.deepcopy(plain)
    before = narrow.norm.running_mean.clone()
    plain_out, plain_grads = _step(plain, x)
    with skipping_unread_channels(narrow) as chains:
        seen: list[torch.Size] = []
        narrow.expand.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        out, grads = _step(narrow, x)
        narrow.eval()
        plain.eval()
        torch.testing.assert_close(narrow(x), plain(x), rtol=1e-5, atol=1e-6)  # eval: running statistics used
    assert chains == 1 and seen[0] == (8, 3, 5, 5)  # the expansion computed channels 0, 2, 5 only
    torch.testing.assert_close(out, plain_out, rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, plain_grads[name], rtol=1e-4, atol=1e-6)
    assert plain_grads["expand.weight"][[1, 3, 4]].abs().max() == 0  # what was skipped never learned anyway
    used, unused = [0, 2, 5], [1, 3, 4]
    torch.testing.assert_close(narrow.norm.running_mean[used], plain.norm.running_mean[used])
    torch.testing.assert_close(narrow.norm.running_var[used], plain.norm.running_var[used])
    assert torch.equal(narrow.norm.running_mean[unused], before[unused])  # the one trace: left as they were
    assert narrow.norm.num_batches_tracked == plain.norm.num_batches_tracked == 1
    assert not any("forward" in vars(m) for m in narrow.modules())  # every layer is itself again


@pytest.mark.parametrize(
    "model",
    [Inverted(tap=True), Inverted(between=nn.Dropout(0.5)), Inverted(between=nn.GroupNorm(2, 6))],
    ids=["expansion read elsewhere", "dropout between", "a norm across channels between"],
)
def test_a_chain_that_is_not_channel_wise_and_alone_is_left_alone(model: nn.Module) -> None:
    with skipping_unread_channels(model) as chains:
        assert chains == 0
    learned = Inverted()
    learned.depthwise.requires_grad_(True)  # only fixed filters are known to stay zero
    with skipping_unread_channels(learned) as chains:
        assert chains == 0


def test_an_all_zero_depthwise_conv_keeps_one_channel_and_its_outputs() -> None:
    model = Inverted().train()
    with torch.no_grad():
        model.depthwise.weight.zero_()
    x = torch.randn(4, 3, 5, 5)
    plain_out, plain_grads = _step(copy.deepcopy(model), x)
    with skipping_unread_channels(model) as chains:
        out, grads = _step(model, x)
    assert chains == 1
    torch.testing.assert_close(out, plain_out, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, plain_grads[name], rtol=1e-4, atol=1e-6)


def test_the_pruned_mobilenet_fine_tunes_the_same_with_channels_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    # blocks 0-2 of the MobileNet sample pruned at 80 % keep some of their depthwise kernels; the other
    # channels stay (a squeeze-and-excitation gate multiplies them), but the 1x1 expansions need not compute them
    train = load_data(SAMPLES / "digits_train.npz", batch_size=32, batches=4)
    val = load_data(SAMPLES / "digits_val.npz", batch_size=64, batches=2)
    small, _ = prune(load_model(SAMPLES / "mobilenet.safetensors"), val, pct=80)
    with skipping_unread_channels(small) as chains:
        assert chains == 3
    recipe = Recipe(epochs=2, seed=1, memory_format="contiguous")  # exact: channels-last rounds the near-tied logits of this barely trained model apart
    skipped, report = finetune(copy.deepcopy(small), train, val, recipe=recipe)
    monkeypatch.setattr(training, "skipping_unread_channels", lambda model: contextlib.nullcontext(0))
    plain, plain_report = finetune(copy.deepcopy(small), train, val, recipe=recipe)
    assert report.best_epoch == 2  # the weights compared are trained ones
    assert [r.metric for r in report.history] == [r.metric for r in plain_report.history]
    assert [r.loss for r in report.history] == pytest.approx([r.loss for r in plain_report.history], rel=1e-5)
    state, plain_state = skipped.state_dict(), plain.state_dict()
    for name, p in plain.named_parameters():  # the weights: the same
        torch.testing.assert_close(state[name], p.detach(), rtol=1e-4, atol=1e-5)
    x = val.x[:64]
    torch.testing.assert_close(skipped(x), plain(x), rtol=1e-4, atol=1e-4)  # and so the model
    assert any(not torch.equal(state[n], plain_state[n]) for n in state if n.endswith("running_var"))  # skipped channels' statistics
