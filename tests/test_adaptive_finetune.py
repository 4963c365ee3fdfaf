"""Fine-tuning that adapts to what is left to learn (docs/method.md §4), on networks of our own.

The networks (tests/user_nets.py) are 3x3-only, as users write them: trained on digits_train.npz,
pruned at pct 90 with the saliency on half A of digits_val.npz, fine-tuned with the default recipe
(best epoch by half A, the unpruned model as teacher), and judged on half B, which chose nothing.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import sample_data, sample_model
from torch import nn
from user_nets import digits, halves, trained

from explainfix_cli.evaluation.measure import metric, outputs
from explainfix_cli.models import spatial_convs
from explainfix_cli.pruning.pipeline import prune
from explainfix_cli.search.target import Target, prune_to_target
from explainfix_cli.training.finetune import Recipe, finetune
from explainfix_cli.training.fixed import fix
from explainfix_cli.training.trainable import MIN_TRAINABLE_SHARE, choose_trainable


def zero_kernels(model: nn.Module) -> torch.Tensor:
    """A flat boolean of every spatial kernel, True where it is all zero."""
    return torch.cat([(c.weight == 0).flatten(2).all(dim=2).flatten() for _, c in spatial_convs(model)])


class Nets(dict):
    """The user networks, each trained on first use (a few seconds each), shared by the module."""

    def __missing__(self, name: str) -> nn.Module:
        with torch.random.fork_rng():
            self[name] = trained(name)
        return self[name]


class Pruned(dict):
    def __init__(self, nets: Nets, a: object) -> None:
        super().__init__()
        self.nets, self.a = nets, a

    def __missing__(self, name: str) -> nn.Module:
        self[name] = prune(copy.deepcopy(self.nets[name]), self.a, pct=90)[0]
        return self[name]


@pytest.fixture(scope="module")
def nets() -> Nets:
    return Nets()


@pytest.fixture(scope="module")
def split() -> tuple:
    a, b = halves(digits("val", 256))
    return digits("train"), a, b


@pytest.fixture(scope="module")
def pruned(nets: Nets, split: tuple) -> Pruned:
    return Pruned(nets, split[1])


@pytest.mark.parametrize("name", ["plain", "oddstride", "residual"])
def test_a_3x3_only_network_recovers_within_two_points_on_samples_that_chose_nothing(
    name: str, nets: dict[str, nn.Module], pruned: dict[str, nn.Module], split: tuple
) -> None:
    train, a, b = split
    unpruned = metric(b, outputs(nets[name], b))
    small = copy.deepcopy(pruned[name])
    zeros = zero_kernels(small)
    assert metric(b, outputs(small, b)) < unpruned - 0.05  # pruning alone costs it
    with torch.random.fork_rng():
        tuned, report = finetune(small, train, a, recipe=Recipe(), teacher=nets[name])
    assert metric(b, outputs(tuned, b)) >= unpruned - 0.02
    assert report.params == sum(p.numel() for p in pruned[name].parameters())  # the same size whatever was trained
    assert any(not torch.equal(c.weight, o.weight) for (_, c), (_, o) in zip(spatial_convs(tuned), spatial_convs(pruned[name]), strict=True))
    if report.trainable == "masked":  # the pruned kernels stay exactly zero and the fixed flags are back
        assert "held at zero" in report.trainable_reason
        assert torch.equal(zero_kernels(tuned), zeros)
        assert not any(c.weight.requires_grad for _, c in spatial_convs(tuned))
    else:  # masked training fell short of the teacher on half A: every parameter trained on
        assert report.trainable == "all" and "epochs train every parameter" in report.trainable_reason
        assert report.epochs == Recipe().epochs and report.best_epoch > Recipe().epochs // 2  # within the 20 epochs asked


def test_masked_training_that_falls_short_of_the_teacher_hands_over_to_everything(
    nets: dict[str, nn.Module], pruned: dict[str, nn.Module], split: tuple
) -> None:
    train, a, _ = split
    few = type(train)(train.x[:256], train.y[:256], 64)
    teacher = nets["residual"]
    goal = metric(a, outputs(teacher, a))
    epochs: list[int] = []
    with torch.random.fork_rng():
        tuned, report = finetune(copy.deepcopy(pruned["residual"]), few, a, recipe=Recipe(epochs=4), teacher=teacher, on_epoch=lambda r: epochs.append(r.epoch))
    assert goal - max(r.metric for r in report.history[:2]) > 0.01  # two masked epochs on 256 digits fall short
    assert [r.epoch for r in report.history] == epochs == [1, 2, 3, 4] and report.epochs == 4 == report.recipe["epochs"]
    assert report.trainable == "all" and f"{goal:.3f}" in report.trainable_reason and "after 2 epochs" in report.trainable_reason
    assert report.best_epoch > 2 and report.metric_after == max(r.metric for r in report.history)
    assert report.metric_after == pytest.approx(metric(a, outputs(tuned, a)))
    assert all(c.weight.requires_grad for _, c in spatial_convs(tuned))  # trained everything: nothing fixed any more
    # without a teacher there is nothing to fall short of: masked it stays
    with torch.random.fork_rng():
        _, alone = finetune(copy.deepcopy(pruned["residual"]), few, a, recipe=Recipe(epochs=2))
    assert alone.trainable == "masked" and alone.epochs == 2


def test_fixed_stays_the_default_where_pointwise_layers_are_left_to_learn(split: tuple) -> None:
    """The bundled samples built with many learnable 1x1 layers keep the spatially fixed form (they
    recover in it); DenseNet at pct 90 keeps only about half its live parameters trainable when fixed,
    recovers better masked (benchmarks/adaptive_finetune.py: 0.972 fixed, 0.989 masked, 0.983
    unpruned), and trains masked."""
    _, a, _ = split
    for name in ("densenet_bc", "mobilenet", "convnext"):
        small, _ = prune(sample_model(name).model, a, pct=90)
        choice = choose_trainable(small, "auto")
        assert choice.mode == "unfixed" and choice.share >= MIN_TRAINABLE_SHARE, name
    small, _ = prune(sample_model("densenet").model, a, pct=90)
    choice = choose_trainable(small, "auto")
    assert choice.mode == "masked" and 0.5 < choice.share < MIN_TRAINABLE_SHARE


def test_a_network_fixed_for_training_from_scratch_stays_fixed(nets: dict[str, nn.Module], split: tuple) -> None:
    train, a, _ = split
    model, _ = fix(copy.deepcopy(nets["plain"]), "dct2")
    before = [c.weight.detach().clone() for _, c in spatial_convs(model)]
    few = type(train)(train.x[:128], train.y[:128], 64)
    _, report = finetune(model, few, a, recipe=Recipe(epochs=1))
    assert report.trainable == "unfixed" and choose_trainable(model, "auto").share < MIN_TRAINABLE_SHARE  # nothing pruned
    assert all(torch.equal(c.weight, w) for (_, c), w in zip(spatial_convs(model), before, strict=True))


def test_train_unfixed_keeps_the_spatial_filters_fixed(pruned: dict[str, nn.Module], split: tuple) -> None:
    train, a, _ = split
    model = copy.deepcopy(pruned["plain"])
    before = [c.weight.detach().clone() for _, c in spatial_convs(model)]
    few = type(train)(train.x[:128], train.y[:128], 64)
    _, report = finetune(model, few, a, recipe=Recipe(epochs=1, train="unfixed"))
    assert report.trainable == "unfixed" and report.trainable_params < 300  # batch norms and the head
    assert all(torch.equal(c.weight, w) for (_, c), w in zip(spatial_convs(model), before, strict=True))


@pytest.mark.parametrize(("optimizer", "decay"), [("sgd", 0.1), ("adamw", 0.1), ("adam", 0.1)])
def test_masked_kernels_stay_exactly_zero_under_momentum_and_weight_decay(
    optimizer: str, decay: float, pruned: dict[str, nn.Module], split: tuple
) -> None:
    train, a, _ = split
    model = copy.deepcopy(pruned["residual"])
    zeros = zero_kernels(model)
    few = type(train)(train.x[:256], train.y[:256], 64)
    _, report = finetune(model, few, a, recipe=Recipe(epochs=2, train="masked", optimizer=optimizer, weight_decay=decay))  # type: ignore[arg-type]
    assert report.trainable == "masked"
    assert torch.equal(zero_kernels(model), zeros) and int(zeros.sum()) > 0


def test_the_fine_tuned_target_search_uses_the_same_rule(nets: dict[str, nn.Module], split: tuple) -> None:
    train, a, _ = split
    few = type(train)(train.x[:256], train.y[:256], 64)
    teacher = nets["plain"]

    def adapt(model: nn.Module) -> dict:
        return finetune(model, few, a, recipe=Recipe(epochs=1), teacher=teacher)[1].history_step()

    result = prune_to_target(copy.deepcopy(nets["plain"]), a, Target(max_params=2500), adapt=adapt).to_json()
    assert result["finetune"]["trainable"] == "masked" and result["params_after"] <= 2500


def test_a_drop_target_that_removes_nothing_says_so(nets: dict[str, nn.Module], split: tuple) -> None:
    _, a, _ = split
    result = prune_to_target(copy.deepcopy(nets["residual"]), a, Target(max_drop=0.02)).to_json()
    assert result["params_removed"] == 0 == result["params_before"] - result["params_after"]
    assert "removes no parameter" in result["note"] and "--finetune-epochs" in result["note"] and "--granularity channel" in result["note"]
    shrunk = prune_to_target(copy.deepcopy(nets["residual"]), a, Target(max_params=3000)).to_json()
    assert shrunk["params_removed"] > 0 and shrunk["note"] is None


def test_a_bundled_sample_with_pointwise_layers_still_trains_fixed() -> None:
    data = sample_data("densenet_bc", batches=1)
    small, _ = prune(sample_model("densenet_bc").model, data, pct=90)
    before = [c.weight.detach().clone() for _, c in spatial_convs(small)]
    _, report = finetune(small, data, data, recipe=Recipe(epochs=1))
    assert report.trainable == "unfixed" and "stay fixed" in report.trainable_reason
    assert all(torch.equal(c.weight, w) for (_, c), w in zip(spatial_convs(small), before, strict=True))


def test_max_minutes_bounds_the_whole_fine_tune_across_a_handover(pruned: dict[str, nn.Module], split: tuple, nets: dict[str, nn.Module]) -> None:
    # two epochs, handing over after the first: the budget it spent is not renewed for the next form
    train, a, _ = split
    few = type(train)(train.x[:256], train.y[:256], 64)
    with torch.random.fork_rng():
        _, report = finetune(copy.deepcopy(pruned["residual"]), few, a, recipe=Recipe(epochs=2, max_minutes=1e-6), teacher=nets["residual"])
    assert report.stopped_early and report.trainable == "masked" and report.epochs == 1
