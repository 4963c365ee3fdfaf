"""`measure.metric_upper_bound`: never below the metric any completion of the data reaches, and
reached by the best completion (so a search that stops on it never drops a pct that could meet)."""

from __future__ import annotations

import pytest
import torch

from explainfix_cli.evaluation.measure import metric, metric_upper_bound
from explainfix_cli.io.data import Dataset


def _completions(kind: str, g: torch.Generator) -> tuple[Dataset, torch.Tensor, torch.Tensor]:
    """Data of 10 samples, random outputs, and the best outputs (each sample right)."""
    if kind == "labels":
        y = torch.randint(0, 3, (10,), generator=g)
        best = torch.nn.functional.one_hot(y, 3).float()  # (10, 3) argmax is the label
        return Dataset(torch.zeros(10, 1, 2, 2), y, batch_size=4), torch.randn(10, 3, generator=g), best
    y = (torch.rand(10, 1, 3, 3, generator=g) > 0.6).float()
    best = y * 2 - 1  # (10, 1, 3, 3) logit > 0 exactly on the mask
    return Dataset(torch.zeros(10, 1, 3, 3), y, batch_size=4), torch.randn(10, 1, 3, 3, generator=g), best


@pytest.mark.parametrize("kind", ["labels", "mask"])
def test_bound_holds_and_is_reached(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        data, out, best = _completions(kind, g)
        for n in range(11):
            bound = metric_upper_bound(data, out[:n])
            completion = torch.cat([out[:n], best[n:]])  # the best the remaining samples can do
            assert bound == pytest.approx(metric(data, completion), abs=1e-6)
            other = torch.cat([out[:n], torch.randn(10 - n, *out.shape[1:], generator=g)])
            assert metric(data, other) <= bound + 1e-6
        assert metric_upper_bound(data, out) == pytest.approx(metric(data, out), abs=1e-6)


def test_no_bound_for_auc() -> None:
    data = Dataset(torch.zeros(4, 1, 2, 2), torch.tensor([[0.0, 1], [1, 0], [1, 1], [0, 0]]))
    assert metric_upper_bound(data, torch.zeros(2, 2)) == 1.0


def test_paired_auc_drop_is_delong_on_the_same_samples() -> None:
    # the drop is the AUC difference; its standard error, DeLong's, matches a bootstrap of the samples
    from explainfix_cli.evaluation.measure import paired_auc_drop, roc_auc

    g = torch.Generator().manual_seed(0)
    positive = torch.rand(200, generator=g) < 0.1
    full = torch.randn(200, generator=g) + 2 * positive
    other = full + 0.5 * torch.randn(200, generator=g)
    paired = paired_auc_drop(full, other, positive)
    assert paired is not None
    drop, se = paired
    assert drop == pytest.approx(roc_auc(full, positive) - roc_auc(other, positive), abs=1e-12)
    draws = []
    for _ in range(1000):
        i = torch.randint(0, 200, (200,), generator=g)
        if int(positive[i].sum()) >= 2:
            draws.append(roc_auc(full[i], positive[i]) - roc_auc(other[i], positive[i]))
    assert se == pytest.approx(float(torch.tensor(draws).std()), rel=0.1)
    assert paired_auc_drop(full, full, positive) == (0.0, 0.0)
    assert paired_auc_drop(full, other, torch.zeros(200, dtype=torch.bool)) is None
