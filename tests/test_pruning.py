"""docs/method.md §2 zeroing by a hand-worked example, and the whole prune on every sample model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import CLASSIFIERS, SAMPLES, sample_data, sample_model
from torch import nn
from typer.testing import CliRunner

from explainfix_cli.cli.app import app
from explainfix_cli.errors import UserError
from explainfix_cli.evaluation.measure import outputs
from explainfix_cli.io.checkpoints import load_model
from explainfix_cli.io.data import Dataset
from explainfix_cli.io.sources.arrays import ArraySource
from explainfix_cli.models import spatial_convs
from explainfix_cli.pruning.pipeline import REMOVAL_CHECK_SAMPLES, fill_zeroed, prune, zero_least_salient
from explainfix_cli.saliency import spatial_saliency


def two_conv_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.Flatten(), nn.LazyLinear(3))


@pytest.mark.parametrize(
    ("pct", "expected"),
    [
        # scores: conv0 [[3], [1]], conv2 [[1, 5], [2, 1]]; ascending with ties by layer, o, i:
        # conv0[1,0]=1, conv2[0,0]=1, conv2[1,1]=1, conv2[1,0]=2, conv0[0,0]=3, conv2[0,1]=5
        (40, {"0": [[False], [True]], "2": [[True, False], [False, False]]}),  # floor(2.4) = 2
        (50, {"0": [[False], [True]], "2": [[True, False], [False, True]]}),  # 3
        (99, {"0": [[True], [True]], "2": [[True, True], [True, True]]}),  # floor(5.94) = 5
        (0, {"0": [[False], [False]], "2": [[False, False], [False, False]]}),
    ],
)
def test_global_ranking_with_deterministic_ties(pct: float, expected: dict[str, list[list[bool]]]) -> None:
    model = two_conv_model()
    scores = {"0": torch.tensor([[3.0], [1.0]]), "2": torch.tensor([[1.0, 5.0], [2.0, 1.0]])}
    masks = zero_least_salient(model, scores, pct)
    if pct == 99:  # 5 of 6: all but the most salient conv2[0, 1]
        expected["2"][0][1] = False
    for name, mask in masks.items():
        assert mask.tolist() == expected[name]
        weight = dict(model.named_children())[name].weight
        assert ((weight == 0).flatten(2).all(dim=2) == mask).all()


def test_selection_equals_a_stable_sort_under_many_ties() -> None:
    model = nn.Sequential(nn.Conv2d(3, 40, 3), nn.Conv2d(40, 30, 3, groups=2))
    g = torch.Generator().manual_seed(0)
    scores = {"0": torch.randint(0, 5, (40, 3), generator=g).double(), "1": torch.randint(0, 5, (30, 20), generator=g).double()}
    flat = torch.cat([scores["0"].flatten(), scores["1"].flatten()])
    for pct in (1, 17.5, 50, 83, 99.9):
        k = int(pct / 100 * len(flat))
        expected = torch.zeros(len(flat), dtype=torch.bool)
        expected[torch.sort(flat, stable=True).indices[:k]] = True
        masks = zero_least_salient(copy.deepcopy(model), scores, pct)
        assert torch.equal(torch.cat([masks["0"].flatten(), masks["1"].flatten()]), expected), pct


def test_nan_scores_are_refused() -> None:
    scores = {"0": torch.tensor([[3.0], [float("nan")]]), "2": torch.ones(2, 2)}
    with pytest.raises(UserError, match="NaN"):
        zero_least_salient(two_conv_model(), scores, 50)


@pytest.mark.parametrize("pct", [-1, 100, 150])
def test_pct_out_of_range(pct: float) -> None:
    with pytest.raises(UserError, match=r"\[0, 100\)"):
        zero_least_salient(two_conv_model(), {}, pct)


def test_fill_modes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3))
    original = {"0": model[0].weight.detach().clone()}
    with torch.no_grad():
        model[0].weight[0, 0] = 0  # whole kernels zeroed, as zeroing does
        model[0].weight[1, 1] = 0
    reset = copy.deepcopy(model)
    assert fill_zeroed(reset, original, "reset", torch.Generator().manual_seed(0)) == 2
    assert torch.equal(reset[0].weight, original["0"])
    refilled = copy.deepcopy(model)
    fill_zeroed(refilled, original, "fillzero", torch.Generator().manual_seed(0))
    w = refilled[0].weight.detach()
    assert (w[0, 0] != 0).all() and w[0, 0].abs().max() <= 1 / (2 * 9) ** 0.5  # Kaiming-uniform bound
    assert (w[1, 1] != 0).all() and not torch.equal(w[0, 0], w[1, 1])
    untouched = (slice(2, 3),)
    assert torch.equal(w[untouched], original["0"][untouched])


def _zeroed_on(name: str, pct: float, scored_on, data) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Outputs on `data` of the model zeroed by scores from `scored_on`, computed apart from `prune`."""
    model = sample_model(name).model
    zero_least_salient(model, spatial_saliency(model, scored_on), pct)
    return outputs(model, data)


@pytest.mark.parametrize("name", [*CLASSIFIERS, "unet", "resnet_multilabel"])
@pytest.mark.parametrize("pct", [50, 90])
def test_exact_removal_holds_on_data_the_prune_never_saw(name: str, pct: float, tmp_path: Path) -> None:
    # calibrated on one minibatch of 16; compared on 256 held-out samples (the *_train.npz sets),
    # where a channel that only looked constant on the 16 would show
    loaded = sample_model(name)
    seen, held_out = sample_data(name, batch_size=16, batches=1), sample_data(name, batch_size=128, batches=2, split="train")
    out = tmp_path / "pruned.safetensors"
    pruned, report = prune(loaded.model, seen, pct=pct, arch=loaded.arch, out=out, val=held_out)
    reloaded = load_model(out)
    ours = outputs(reloaded, held_out)
    zeroed = _zeroed_on(name, pct, seen, held_out)
    scale = float(zeroed.abs().max())
    assert float((ours - zeroed).abs().max()) <= 1e-5 * scale + 1e-6
    # the measured check covers the first REMOVAL_CHECK_SAMPLES held-out samples; the bound above, all of them
    checked = report.val_removal_check_samples
    assert checked == REMOVAL_CHECK_SAMPLES == 128 and report.removal_check_samples == 16
    assert report.val_max_logit_change == pytest.approx(float((outputs(pruned, held_out) - zeroed)[:checked].abs().max()), abs=1e-6)
    assert report.calibration_samples == 16 and report.val_samples == 256 and report.val_predictions_changed == 0
    if held_out.target_kind == "labels":
        assert torch.equal(ours.argmax(dim=1), zeroed.argmax(dim=1))
    else:
        assert torch.equal(ours > 0, zeroed > 0)
    assert report.zeroed_kernels == int(pct / 100 * report.spatial_kernels_before)
    assert all(not m.weight.requires_grad for m in reloaded.modules() if isinstance(m, nn.Conv2d) and min(m.kernel_size) > 1)


@pytest.mark.parametrize(("options", "passes"), [({}, 2), ({"fill": "reset"}, 2), ({"removal": "calibrated"}, 3)])
def test_a_prune_reads_the_data_as_few_times_as_it_must(options: dict[str, str], passes: int) -> None:
    # the saliency pass (its forwards: the metric before), then the zeroed, removed and filled
    # models together on each minibatch; calibrated removal reads it once more for its ranges.
    # val: the original's pass, then the later stages together. Counted in samples decoded.
    memory = sample_data("resnet")
    x, y = memory.x[:80], memory.y[:80]
    data, val = Dataset(source=ArraySource(x[:48], y[:48]), batch_size=16), Dataset(source=ArraySource(x[48:], y[48:]), batch_size=16)
    pruned, report = prune(sample_model("resnet").model, data, pct=70, val=val, **options)
    assert data.source.decoded == passes * 48 + 1  # + the example that traces the model
    assert val.source.decoded == 2 * 32
    # the exactness check still covers every sample of both
    zeroed = _zeroed_on("resnet", 70, Dataset(x[:48], y[:48], batch_size=16), Dataset(x, y, batch_size=16))
    change = (outputs(pruned, Dataset(x, y, batch_size=16)) - zeroed).abs() if options.get("fill") is None else None
    assert report.channels_removed == 43 and report.predictions_changed == 0 and report.val_predictions_changed == 0
    assert report.removal_check_samples == 48 and report.val_removal_check_samples == 32
    if change is not None:  # a fill changes the model written, not the removal compared
        assert report.max_logit_change == pytest.approx(float(change[:48].max()), abs=1e-7)
        assert report.val_max_logit_change == pytest.approx(float(change[48:].max()), abs=1e-7)


def test_the_zeroed_model_runs_on_the_first_samples_only() -> None:
    # exact removal's check: the zeroed model on the first REMOVAL_CHECK_SAMPLES samples, the
    # pruned model (the metric after) on all, in one reading of the data
    memory = sample_data("resnet")
    n = REMOVAL_CHECK_SAMPLES + 64
    data = Dataset(source=ArraySource(memory.x[:n], memory.y[:n]), batch_size=32)
    pruned, report = prune(sample_model("resnet").model, data, pct=70)
    assert data.source.decoded == 2 * n + 1
    assert report.removal_check_samples == REMOVAL_CHECK_SAMPLES and report.calibration_samples == n
    zeroed = _zeroed_on("resnet", 70, Dataset(memory.x[:n], memory.y[:n], batch_size=32), Dataset(memory.x[:n], memory.y[:n], batch_size=32))
    change = (outputs(pruned, Dataset(memory.x[:n], memory.y[:n], batch_size=32)) - zeroed).abs()
    assert report.max_logit_change == pytest.approx(float(change[:REMOVAL_CHECK_SAMPLES].max()), abs=1e-7)
    assert float(change.max()) <= 1e-4  # exact on the samples past the check too


def test_calibrated_removal_goes_further_and_reports_the_held_out_change() -> None:
    # ReLUs dead on 16 samples are folded as constants under --removal calibrated only; the
    # held-out data shows what that costs, and exact shows nothing
    seen, held_out = sample_data("resnet", batch_size=16, batches=1), sample_data("resnet", batch_size=128, batches=2, split="train")
    exact = prune(sample_model("resnet").model, seen, pct=90, val=held_out)[1]
    calibrated = prune(sample_model("resnet").model, seen, pct=90, removal="calibrated", val=held_out)[1]
    aggressive = prune(sample_model("resnet").model, seen, pct=90, removal="aggressive", val=held_out)[1]
    assert exact.params_after > calibrated.params_after >= aggressive.params_after
    assert exact.val_max_logit_change < 1e-5 < calibrated.val_max_logit_change
    assert calibrated.max_logit_change < 1e-5  # exact on the data it saw


@pytest.mark.parametrize("name", ["resnet", "vgg", "densenet", "mobilenet", "shufflenet", "unet", "resnet_multilabel"])
def test_pruning_shrinks_the_model(name: str) -> None:
    _, report = prune(sample_model(name).model, sample_data(name), pct=90)
    assert report.params_after < report.params_before
    assert report.macs_after < report.macs_before
    assert report.channels_removed > 0


def test_convnext_keeps_its_shape_by_default_and_says_why() -> None:
    # LayerNorm statistics include every channel: no removal through it is exact
    _, report = prune(sample_model("convnext").model, sample_data("convnext"), pct=90)
    assert report.channels_removed == 0 and report.params_after == report.params_before
    assert report.blocked_groups["normalisation across channels"] > 0
    assert report.max_logit_change == 0.0


@pytest.mark.parametrize("name", ["convnext", "resnet"])
def test_channel_granularity_shrinks_and_measures_against_the_original(name: str) -> None:
    loaded, data = sample_model(name), sample_data(name)
    original = outputs(copy.deepcopy(loaded.model), data)
    pruned, report = prune(loaded.model, data, pct=90, granularity="channel")
    assert report.params_after < report.params_before / 2 and report.zeroed_kernels == 0
    assert report.max_logit_change == pytest.approx(float((outputs(pruned, data) - original).abs().max()), abs=1e-6)
    assert report.max_logit_change > 1e-3  # whole salient-enough channels went: the output changed


@pytest.mark.parametrize("name", ["vgg", "unet"])
def test_aggressive_removal_goes_further_and_reports_the_change(name: str) -> None:
    # silent channels before zero-padded convs carry a constant the padding breaks: exact keeps
    # them, the paper's rule drops them
    loaded, data = sample_model(name), sample_data(name)
    zeroed = _zeroed_on(name, 90, data, data)
    exact = prune(copy.deepcopy(loaded.model), data, pct=90)[1]
    pruned, aggressive = prune(loaded.model, data, pct=90, removal="aggressive")
    assert aggressive.params_after < exact.params_after
    assert aggressive.channels_removed > exact.channels_removed and aggressive.channels_folded >= exact.channels_folded
    assert aggressive.max_logit_change == pytest.approx(float((outputs(pruned, data) - zeroed).abs().max()), abs=1e-6)


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    files = []
    for run in range(2):
        loaded = sample_model("mobilenet")
        out = tmp_path / f"run{run}.safetensors"
        prune(loaded.model, sample_data("mobilenet"), pct=70, fill="fillzero", seed=3, arch=loaded.arch, out=out)
        files.append(out.read_bytes())
    assert files[0] == files[1]


# ---- layer collapse (issue 10 item 5) -------------------------------------------------------------
@pytest.mark.parametrize(
    ("pct", "floor", "expected"),
    [
        # scores as above: conv0 [[3], [1]], conv2 [[1, 5], [2, 1]]
        # K=1 keeps conv0[0,0]=3 and conv2[0,1]=5 out of the ranking; 5 of 6 asked, 4 left to zero
        (99, 1, {"0": [[False], [True]], "2": [[True, False], [True, True]]}),
        # K=2 keeps all of conv0 and conv2's 5 and 2; without the floor conv0[1,0] would go first
        (40, 2, {"0": [[False], [False]], "2": [[True, False], [False, True]]}),
        (50, 1, {"0": [[False], [True]], "2": [[True, False], [False, True]]}),  # the floor binds nowhere
    ],
)
def test_floor_of_kernels_per_layer_by_hand(pct: float, floor: int, expected: dict[str, list[list[bool]]]) -> None:
    model = two_conv_model()
    scores = {"0": torch.tensor([[3.0], [1.0]]), "2": torch.tensor([[1.0, 5.0], [2.0, 1.0]])}
    masks = zero_least_salient(model, scores, pct, min_kernels_per_layer=floor)
    assert {name: m.tolist() for name, m in masks.items()} == expected


def test_floor_keeps_the_global_ranking_elsewhere() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 30, 3), nn.Conv2d(30, 6, 3, groups=2))
    g = torch.Generator().manual_seed(1)
    scores = {"0": torch.randint(0, 4, (8, 3), generator=g).double() / 100,  # a layer the ranking would wipe out
              "1": torch.randint(0, 6, (30, 8), generator=g).double(), "2": torch.randint(0, 6, (6, 15), generator=g).double()}
    for floor in (1, 3, 30):
        kept = torch.cat([torch.isin(torch.arange(s.numel()), torch.sort(s.flatten(), descending=True, stable=True).indices[:floor]) for s in scores.values()])
        flat = torch.cat([s.flatten() for s in scores.values()])
        eligible = (~kept).nonzero().flatten()
        k = min(int(0.9 * len(flat)), len(eligible))
        expected = torch.zeros(len(flat), dtype=torch.bool)
        expected[eligible[torch.sort(flat[eligible], stable=True).indices[:k]]] = True
        masks = zero_least_salient(copy.deepcopy(model), scores, 90, min_kernels_per_layer=floor)
        chosen = torch.cat([m.flatten() for m in masks.values()])
        assert torch.equal(chosen, expected), floor
        assert all(int((~m).sum()) >= min(floor, m.numel()) for m in masks.values())


def test_collapse_is_reported_and_the_floor_prevents_it() -> None:
    # the MobileNet sample at 99 %: the ranking empties depthwise layers and every digit gets the same answer
    data = sample_data("mobilenet", batches=2)
    _, collapsed = prune(sample_model("mobilenet").model, data, pct=99)
    assert collapsed.collapsed_layers and all(".depthwise." in n for n in collapsed.collapsed_layers)
    assert collapsed.constant_output is True
    assert "same output" in collapsed.warnings()[0]
    model, floored = prune(sample_model("mobilenet").model, data, pct=99, min_kernels_per_layer=1)
    assert floored.collapsed_layers == [] and floored.warnings() == [] and floored.constant_output is False
    assert floored.zeroed_kernels == collapsed.zeroed_kernels - 1  # 332 asked, 331 outside the 5 layers' floors
    assert all(bool(conv.weight.ne(0).any()) for _, conv in spatial_convs(model))


def test_prune_cli_warns_on_stderr_and_reports_in_json(tmp_path: Path) -> None:
    args = ["prune", str(SAMPLES / "mobilenet.safetensors"), "--data", str(SAMPLES / "digits_val.npz"), "--batches", "2", "--pct", "99", "--json"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a.safetensors")])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["collapsed_layers"] and "warning" in result.stderr and "--min-kernels-per-layer" in result.stderr
    floored = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b.safetensors"), "--min-kernels-per-layer", "1"])
    assert floored.exit_code == 0 and json.loads(floored.stdout)["collapsed_layers"] == [] and "warning" not in floored.stderr
    # the SE-gated MobileNet keeps most of its parameters under exact removal: the note says what would shrink it
    assert floored.stderr.startswith("explainfix: note: this prune removed") and "--granularity channel" in floored.stderr
    bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "c.safetensors"), "--min-kernels-per-layer", "-1"])
    assert bad.exit_code == 2 and not (tmp_path / "c.safetensors").exists()
