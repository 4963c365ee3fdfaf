"""docs/method.md §1 against an independent few-line computation, for every kind of target."""

from __future__ import annotations

import pytest
import torch
from helpers import sample_data, sample_model
from torch import nn

from explainfix_cli.errors import UserError
from explainfix_cli.io.data import Dataset
from explainfix_cli.models import spatial_convs
from explainfix_cli.saliency import gradient_weights, spatial_saliency


def reference_saliency(model: nn.Module, data: Dataset) -> dict[str, torch.Tensor]:
    """Plain autograd over *all* parameters, one objective per minibatch, summed by hand."""
    model.eval()
    named = dict(model.named_parameters())
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and min(m.kernel_size) > 1}
    total = {n: torch.zeros(m.weight.shape[:2], dtype=torch.float64) for n, m in convs.items()}
    for x, y in data:
        model.zero_grad()
        out = model(x)
        target = nn.functional.one_hot(y, out.shape[1]).float() if y.dim() == 1 else y
        (target * out).sum().backward()
        for n, m in convs.items():
            w, g = m.weight.detach(), named[f"{n}.weight"].grad
            for o in range(w.shape[0]):
                for i in range(w.shape[1]):
                    total[n][o, i] += (w[o, i] * g[o, i]).abs().sum().item()
    return total


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "unet", "resnet_multilabel"])
def test_gradient_saliency_matches_independent_computation(name: str) -> None:
    model = sample_model(name).model
    data = sample_data(name, batch_size=16, batches=3)
    ours = spatial_saliency(model, data)
    ref = reference_saliency(model, data)
    assert list(ours) == [n for n, _ in spatial_convs(model)]
    for layer, scores in ours.items():
        assert scores.shape == ref[layer].shape
        torch.testing.assert_close(scores, ref[layer], rtol=1e-5, atol=1e-9)


def test_only_spatial_weights_get_gradients_and_flags_are_restored() -> None:
    model = sample_model("resnet").model
    model.fc.weight.requires_grad_(False)  # a user's own frozen tensor must stay frozen
    seen: list[int] = []
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    hook = bn.weight.register_hook(lambda g: seen.append(1))
    spatial_saliency(model, sample_data("resnet", batch_size=8, batches=1))
    hook.remove()
    assert seen == []  # no gradient was built for a non-spatial parameter
    assert not model.fc.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "fc.weight")


def test_accumulates_over_minibatches() -> None:
    """s is a sum over minibatches of |W * G_batch| (not |W * G| of the whole set)."""
    model = sample_model("vgg").model
    both = spatial_saliency(model, sample_data("vgg", batch_size=16, batches=2))
    data = sample_data("vgg")
    first = spatial_saliency(model, Dataset(data.x[:16], data.y[:16], batch_size=16))
    second = spatial_saliency(model, Dataset(data.x[16:32], data.y[16:32], batch_size=16))
    whole = spatial_saliency(model, Dataset(data.x[:32], data.y[:32], batch_size=32))
    for layer in both:
        torch.testing.assert_close(both[layer], first[layer] + second[layer], rtol=1e-6, atol=1e-9)
    assert any(not torch.allclose(both[layer], whole[layer]) for layer in both)


def test_saliency_passes_give_the_models_outputs() -> None:
    """prune reuses the saliency forwards as the original model's outputs: they must be those."""
    model = sample_model("densenet").model
    data = sample_data("densenet", batch_size=16, batches=3)
    seen: list[torch.Tensor] = []
    spatial_saliency(model, data, outputs=seen)
    with torch.no_grad():
        expected = model(data.x[:48])
    assert [len(o) for o in seen] == [16, 16, 16]
    assert torch.equal(torch.cat(seen), expected)


def test_magnitude_is_labelled_fallback_without_data() -> None:
    model = sample_model("resnet").model
    scores = spatial_saliency(model, None, criterion="magnitude")
    name, conv = spatial_convs(model)[-1]
    torch.testing.assert_close(scores[name], conv.weight.detach().abs().sum(dim=(2, 3)).double())
    with pytest.raises(UserError, match="magnitude criterion"):
        spatial_saliency(model, None)


def test_gradient_weights_are_sum_of_absolute_gradients() -> None:
    model = sample_model("resnet").model
    data = sample_data("resnet", batch_size=8, batches=2)
    weights = gradient_weights(model, data)
    name, conv = spatial_convs(model)[0]
    expected = torch.zeros(conv.weight.shape[:2], dtype=torch.float64)
    for x, y in data:
        out = model(x)
        (g,) = torch.autograd.grad((nn.functional.one_hot(y, 10) * out).sum(), conv.weight)
        expected += g.abs().sum(dim=(2, 3))
    torch.testing.assert_close(weights[name], expected, rtol=1e-5, atol=1e-9)


def test_under_torchrun_each_process_reads_only_its_own_minibatches(monkeypatch: pytest.MonkeyPatch) -> None:
    # world 2: process r decodes minibatches r, r+2, ...; the two processes' gradients add up to
    # the single process's (what the all-reduce then sums), and no minibatch is read twice
    from explainfix_cli import saliency
    from explainfix_cli.io.sources.arrays import ArraySource

    memory = sample_data("resnet")
    model = sample_model("resnet").model
    x, y = memory.x[:80], memory.y[:80]  # 5 minibatches of 16

    def summed(rank: int, world: int) -> tuple[dict[str, torch.Tensor], int]:
        monkeypatch.setattr(saliency, "rank_and_world", lambda: (rank, world))
        data = Dataset(source=ArraySource(x, y), batch_size=16)
        total: dict[str, torch.Tensor] = {}
        for grads, _ in saliency.spatial_gradients(model, data):
            for name, g in grads.items():
                total[name] = total.get(name, 0) + g.double()
        return total, data.source.decoded

    alone, read_alone = summed(0, 1)
    first, read_first = summed(0, 2)
    second, read_second = summed(1, 2)
    assert (read_alone, read_first, read_second) == (80, 48, 32)
    for name, g in alone.items():
        assert torch.allclose(first[name] + second[name], g, atol=1e-9)
