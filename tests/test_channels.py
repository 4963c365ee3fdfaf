"""docs/method.md §3 channel removal on hand-built networks whose answer is known."""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

from explainfix_cli.io.data import Dataset
from explainfix_cli.pruning.channel_ranking import remove_least_salient_channels
from explainfix_cli.pruning.channels import Graph
from explainfix_cli.pruning.dead_channels import has_dead_weights, remove_dead_channels

torch.manual_seed(0)
X = torch.randn(32, 1, 8, 8)
DATA = Dataset(X, torch.zeros(32, dtype=torch.long), batch_size=16)


def randomise_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(0.2, 1)  # positive shift: silent channels survive the ReLU as constants
    return model.eval()


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def test_silent_channels_are_folded_into_the_linear_bias() -> None:
    model = randomise_bn(nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ))
    conv, bn, fc = model[0], model[1], model[5]
    with torch.no_grad():
        conv.weight[1:3] = 0  # channels 1 and 2 are silent: conv bias → BN → ReLU, a constant
    before = run(model)
    # by hand: the constant each silent channel carries, and what it adds to the logits
    const = torch.relu((conv.bias[1:3] - bn.running_mean[1:3]) / torch.sqrt(bn.running_var[1:3] + bn.eps) * bn.weight[1:3] + bn.bias[1:3])
    expected_bias = fc.bias + fc.weight[:, 1:3] @ const
    result = remove_dead_channels(model, X[:1], DATA)
    assert (result.removed, result.folded) == (2, 2)
    assert conv.out_channels == 2 and fc.in_features == 2
    torch.testing.assert_close(fc.bias.detach(), expected_bias.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(run(model), before, rtol=0, atol=1e-5)


def test_channels_no_reader_uses_leave_without_data() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1)).eval()
    with torch.no_grad():
        model[2].weight[:, 3] = 0  # every kernel reading channel 3 is zero
    before = run(model)
    result = remove_dead_channels(model, X[:1], None)
    assert result.removed == 1 and model[0].out_channels == 3 and model[2].in_channels == 3
    torch.testing.assert_close(run(model), before, rtol=0, atol=1e-6)
    assert model[2].out_channels == 2  # the model's output channels never leave


def test_silent_channel_before_zero_padding_stays_unless_aggressive() -> None:
    model = randomise_bn(nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1),
    ))
    with torch.no_grad():
        model[0].weight[0] = 0  # silent, but the next conv pads it with zeros: not a constant there
        model[0].bias[0] = model[1].running_mean[0] + 1  # and not zero after BN → ReLU
    exact = copy.deepcopy(model)
    assert remove_dead_channels(exact, X[:1], DATA).removed == 0
    before = run(model)
    assert remove_dead_channels(model, X[:1], DATA, removal="aggressive").removed == 1
    assert (run(model) - before).abs().max() > 1e-3  # the paper's rule changes the output


def test_grouped_convolutions_lose_the_same_number_of_channels_per_group() -> None:
    model = randomise_bn(nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ))
    grouped = model[3]
    with torch.no_grad():
        # inputs 0, 1 (group 0) and 5 (group 1) are ignored by every kernel that reads them
        grouped.weight[0:4, 0] = 0
        grouped.weight[0:4, 1] = 0
        grouped.weight[4:8, 1] = 0
    before = run(model)
    original = grouped.weight.detach().clone()
    result = remove_dead_channels(model, X[:1], DATA)
    # group 0 could lose 2, group 1 only 1: the balanced cut removes one from each (0 and 5)
    assert model[0].out_channels == 6 and grouped.in_channels == 6 and grouped.groups == 2
    torch.testing.assert_close(run(model), before, rtol=0, atol=1e-5)
    kept = result.kept["3"]
    assert kept.in_ids[:4].tolist() == [[1, 2, 3]] * 4 and kept.in_ids[4:].tolist() == [[0, 2, 3]] * 4
    torch.testing.assert_close(kept.original(original), grouped.weight.detach())


def test_a_removable_channel_always_shows_as_a_dead_weight() -> None:
    """`has_dead_weights` (the sweep's skip of the trace) is False only where removal by structure
    (exact, or aggressive without data) finds nothing, and sees each kind of dead weight: a silent
    output channel, an input a grouped conv's group ignores, a linear layer's dead row or column, a
    transposed conv's. With data, a channel constant on it leaves without a dead weight: no skip there."""
    def network() -> nn.Sequential:
        return randomise_bn(nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
            nn.ConvTranspose2d(8, 4, 2, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
        ))
    live = network()
    assert not has_dead_weights(live)
    for removal in ("exact", "aggressive"):
        assert remove_dead_channels(copy.deepcopy(live), X[:1], None, removal=removal).removed == 0
    deaths = {
        "silent output channel": lambda m: m[0].weight[5].zero_(),
        "input ignored by its group": lambda m: m[3].weight[4:8, 1].zero_(),  # input 5, read by group 1 only
        "transposed conv input": lambda m: m[6].weight[2].zero_(),  # (I, O, kh, kw): input 2 unread
        "transposed conv output": lambda m: m[6].weight[:, 1].zero_(),
        "linear column": lambda m: m[10].weight[:, 2].zero_(),
        "linear row": lambda m: m[10].weight[0].zero_(),
    }
    for name, kill in deaths.items():
        model = copy.deepcopy(live)
        with torch.no_grad():
            kill(model)
        assert has_dead_weights(model), name
    with torch.no_grad():  # a zero inside a kernel, or one whole kernel, kills no channel
        live[3].weight[0, 0, 1, 1] = 0
        live[3].weight[1, 2] = 0
    assert not has_dead_weights(live)
    silent = copy.deepcopy(live)
    with torch.no_grad():  # one silent channel in each of the grouped conv's groups, so a balanced cut takes both
        silent[0].weight[[1, 5]] = 0
    assert has_dead_weights(silent)
    assert remove_dead_channels(silent, X[:1], None, removal="aggressive").removed == 2  # what the check guards
    dead_relu = copy.deepcopy(live)
    with torch.no_grad():
        dead_relu[1].bias[[2, 6]] = -100.0  # a ReLU that is zero on every sample: constant on the data
    assert not has_dead_weights(dead_relu)
    for removal in ("calibrated", "aggressive"):
        assert remove_dead_channels(copy.deepcopy(dead_relu), X[:1], DATA, removal=removal).removed == 2


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(channel_shuffle(torch.relu(self.a(x)), 2)).mean(dim=(2, 3)))


def test_channel_shuffle_cut_is_symmetric_and_exact() -> None:
    # the shuffle (g=2, C=8) sends channel a*4 + b of `a` to position 2b + a of `b`'s input
    model = ShuffleNet().eval()
    with torch.no_grad():
        model.b.weight[:, 0] = 0  # position 0 = channel 0 (block 0, offset 0) of `a`: block 1 still needs offset 0
    before = run(model)
    assert remove_dead_channels(model, X[:1], DATA).removed == 0
    with torch.no_grad():
        model.b.weight[:, 1] = 0  # position 1 = channel 4 (block 1, offset 0): offset 0 can now leave both blocks
        model.b.weight[:, 4] = 0  # position 4 = channel 2 (block 0, offset 2): alone, it must stay
    before = run(model)
    original = model.a.weight.detach().clone()
    result = remove_dead_channels(model, X[:1], DATA)
    assert result.removed == 2 and model.a.out_channels == 6 and model.b.in_channels == 6
    torch.testing.assert_close(model.a.weight.detach(), original[[1, 2, 3, 5, 6, 7]])
    torch.testing.assert_close(run(model), before, rtol=0, atol=1e-5)


def test_layer_norm_across_channels_blocks_exact_removal() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(1, 4), nn.Conv2d(4, 2, 3, padding=1)).eval()
    with torch.no_grad():
        model[2].weight[:, 1] = 0
    assert remove_dead_channels(copy.deepcopy(model), X[:1], DATA).blocked["normalisation across channels"] == 1
    assert remove_dead_channels(model, X[:1], DATA, removal="aggressive").removed == 1


def test_channel_granularity_removes_the_least_salient_per_group() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1)).eval()
    first = torch.tensor([[4.0], [1.0], [3.0], [0.5]])  # (O, I) of layer 0
    second = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 0.5, 0.0, 3.0]])  # layer 2
    # channel saliency = written (row of layer 0) + read (column of layer 2): 7, 1.5, 4, 3.5
    original = model[0].weight.detach().clone()
    result = remove_least_salient_channels(model, X[:1], {"0": first, "2": second}, pct=50)
    assert result.removed == 2 and model[0].out_channels == 2
    torch.testing.assert_close(model[0].weight.detach(), original[[0, 2]])


class SplitShuffleUnit(nn.Module):
    """torchvision's ShuffleNet v2 unit: chunk, transform one half, concatenate, shuffle by `.view`."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.expand = nn.Conv2d(4, 4, 1)
        self.spatial = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.relu(self.stem(x)).chunk(2, dim=1)
        x = torch.cat((x1, self.spatial(torch.relu(self.expand(x2)))), dim=1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.fc(x.mean(dim=(2, 3)))


def test_chunk_and_view_shuffle_trace_under_torch2() -> None:
    # torch-pruning 1.6 reads autograd's pre-2.0 attribute names: unwrapped, this graph sizes the
    # chunk's first half as the whole concatenation and divides by zero at the 5-D view
    model = SplitShuffleUnit().eval()
    graph = Graph.trace(model, X[:1])
    splits = [n.module for n in graph.DG.module2node.values() if n.type == tp.ops.OPTYPE.SPLIT]
    assert [(s.split_sizes, s.offsets) for s in splits] == [([4, 4], [0, 4, 8])]
    with torch.no_grad():
        model.spatial.weight[:, 1] = 0  # `expand`'s channel 1 is read by nothing any more
    before = run(model)
    result = remove_dead_channels(model, X[:1], DATA)
    assert result.removed == 1 and model.expand.out_channels == 3 and model.spatial.in_channels == 3
    assert model.stem.out_channels == 8  # the shuffled channels of several groups stay
    torch.testing.assert_close(run(model), before, rtol=0, atol=1e-6)


def test_constant_zero_channel_leaves_even_before_zero_padding() -> None:
    # a dead ReLU channel is 0 everywhere: zero padding around it changes nothing, no bias to fold
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1)).eval()
    with torch.no_grad():
        model[0].weight[2] = 0
        model[0].bias[2] = -1.0  # relu(-1) = 0 on every input: a constant zero
        model[0].weight[3] = 0
        model[0].bias[3] = 0.5  # constant 0.5: the padded conv sees 0 at the border, 0.5 inside
    before = run(model)
    bias = model[2].bias.detach().clone()
    result = remove_dead_channels(model, X[:1], DATA)
    assert (result.removed, result.folded) == (1, 1) and model[0].out_channels == 3
    assert torch.equal(model[2].bias.detach(), bias)
    torch.testing.assert_close(run(model), before, rtol=0, atol=1e-6)
