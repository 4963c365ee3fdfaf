"""How `extract` chooses channels (docs/method.md §6): the one-vs-rest importance, the parameters a
channel carries and the greedy cut, against hand-worked tiny models."""

from __future__ import annotations

import torch
from torch import nn

from explainfix_cli.classes.extract import GreedyCut, OneVsRest, greedy_cut, group_scores, reader_importance
from explainfix_cli.io.data import Dataset

# constant 4x4 images of values 1..4, classes 0, 0, 1, 1
X = torch.arange(1.0, 5.0).view(4, 1, 1, 1).expand(4, 1, 4, 4).contiguous()
Y = torch.tensor([0, 0, 1, 1])


def _features(columns: list[list[float]]) -> nn.Module:
    """conv3x3 (channel c is (c+1) * x at the centre tap) -> global mean -> Linear(C, 2) with the
    given weight columns and bias (0.25, -0.5)."""
    conv = nn.Conv2d(1, len(columns), 3, padding=1, bias=False)
    linear = nn.Linear(len(columns), 2)
    with torch.no_grad():
        conv.weight.zero_()
        for c in range(len(columns)):
            conv.weight[c, 0, 1, 1] = c + 1.0
        linear.weight.copy_(torch.tensor(columns).T)
        linear.bias.copy_(torch.tensor([0.25, -0.5]))
    return nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear).eval()


def test_one_vs_rest_importance_by_hand() -> None:
    """At the classifier's input, channel c of sample n changes the margin s = z_0 - z_1 by
    t = (f[n,c] - mean f[c]) (W[0,c] - W[1,c]) when replaced by its mean; the importance is half the
    mean over class 0 of sigmoid(-s)|t| plus half the mean over class 1 of sigmoid(s)|t|."""
    model = _features([[1.0, 0.5], [-1.0, 2.0]])  # f = (v, 2v); W = [[1, -1], [0.5, 2]]
    measured = reader_importance(model, Dataset(X, Y, batch_size=3), 0)
    v = torch.arange(1.0, 5.0, dtype=torch.float64)
    f = torch.stack([v, 2 * v], dim=1)  # (4, 2)
    s = (f[:, 0] - f[:, 1] + 0.25) - (0.5 * f[:, 0] + 2 * f[:, 1] - 0.5)  # z_0 - z_1: the other logit is the largest
    t = (f - f.mean(0)) * torch.tensor([0.5, -3.0], dtype=torch.float64)  # (4, 2)
    weight = torch.where(Y == 0, torch.sigmoid(-s), torch.sigmoid(s))  # (4,)
    expected = ((weight[:2, None] * t[:2].abs()).mean(0) + (weight[2:, None] * t[2:].abs()).mean(0)) / 2
    torch.testing.assert_close(measured.importance["3"], expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(measured.means["3"], f.mean(0))


def test_channel_params_by_hand() -> None:
    """A channel of conv(1->4, 3x3, bias) -> BN(4) -> ReLU -> conv(4->2, 3x3) takes 9 + 1 writer
    weights, 2 batch-norm entries and 2 * 9 reader weights with it; one of the second conv's takes
    4 * 9 writer weights and a column of 2 in the final linear layer."""
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1, bias=False),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2),
    ).eval()
    measured = reader_importance(model, Dataset(torch.randn(4, 1, 6, 6), Y, batch_size=4), 1)
    groups = group_scores(model, torch.zeros(1, 1, 6, 6), measured)
    params = sorted(g.params.tolist() for g in groups)
    assert params == [[30.0] * 4, [38.0] * 2]


def test_greedy_cut_removes_only_what_is_not_needed() -> None:
    """Channels 1 and 3 are read by nobody (zero columns): no importance, first in the ranking,
    and removing them changes nothing. Channels 0 and 2 carry the score: removing either changes
    it, so with no change allowed each is tried alone, fails and is passed over. The result is
    the full model's score exactly, from half the channels."""
    model = _features([[1.0, 0.5], [0.0, 0.0], [-1.0, 2.0], [0.0, 0.0]])
    data = Dataset(X, Y, batch_size=4)
    full = OneVsRest(model, 0)(X).detach()

    @torch.no_grad()
    def change(m: nn.Module) -> float:
        return float((OneVsRest(m, 0)(X) - full).abs().max())

    tried: list[dict[str, float | None]] = []
    result = greedy_cut(model, X[:1], lambda m: reader_importance(m, data, 0), change, 1e-5, tried)
    assert isinstance(result, GreedyCut) and (result.kept, result.removed) == (0.5, 2)
    assert [t["keep"] for t in tried] == [0.75, 0.5, 0.25, 0.25]
    assert [t["auc_drop"] for t in tried][:2] == [0.0, 0.0] and all(t["auc_drop"] > 0.5 for t in tried[2:])
    assert result.model[3].in_features == 2 and model[3].in_features == 4  # the input is not changed
    torch.testing.assert_close(OneVsRest(result.model, 0)(X), full)


def test_greedy_cut_keeps_a_channel_per_group() -> None:
    """With every cut allowed, each group still keeps one channel."""
    model = _features([[1.0, 0.5], [-1.0, 2.0], [0.5, 0.5]])
    data = Dataset(X, Y, batch_size=4)
    result = greedy_cut(model, X[:1], lambda m: reader_importance(m, data, 0), lambda m: 0.0, 0.0, [])
    assert (result.removed, result.model[3].in_features) == (2, 1)
