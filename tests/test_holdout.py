"""The check split of a `--max-drop` target (explainfix_cli/search/holdout.py, docs/method.md §2):
carved deterministically and kept out of scoring and choosing; a limit met on the calibration
part but not on the check split is refused, for `prune` and `extract`; `--check-fraction 0`
chooses as before."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import SAMPLES, sample_data, sample_model
from torch import nn
from typer.testing import CliRunner, Result

from explainfix_cli.classes.extract import extract
from explainfix_cli.cli.app import app
from explainfix_cli.evaluation.measure import metric, outputs
from explainfix_cli.io.data import Dataset
from explainfix_cli.pruning.pipeline import zero_least_salient
from explainfix_cli.saliency import spatial_saliency
from explainfix_cli.search.holdout import check_indices, check_split
from explainfix_cli.search.target import Target, prune_to_target

MODEL = str(SAMPLES / "resnet.safetensors")
DATA = ["--data", str(SAMPLES / "digits_val.npz"), "--batches", "2"]  # 128 samples: 95 calibrate, 33 check (a quarter of each class, rounded)


def _json(result: Result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_check_split_is_a_seeded_stratified_quarter() -> None:
    data = sample_data("resnet", batches=2)
    y = data.y[:128]
    kept = check_indices(data, 0.25, seed=0)
    assert kept == check_indices(data, 0.25, seed=0) != check_indices(data, 0.25, seed=1)
    for c in range(10):  # each class keeps its share, rounded
        assert sum(int(y[i]) == c for i in kept) == round(0.25 * int((y == c).sum()))
    split = check_split(data, fraction=0.25, seed=0)
    assert split.check is not None and split.check.num_samples == len(kept) and split.calibration.num_samples == 128 - len(kept)
    rest = [i for i in range(128) if i not in set(kept)]
    assert torch.equal(split.check.x, data.x[kept]) and torch.equal(split.calibration.x, data.x[rest])
    assert check_split(data, fraction=0).check is None and check_split(data, val=data).calibration is data


def test_prune_chooses_on_the_calibration_part_and_checks_on_the_rest(tmp_path) -> None:
    """The default: a quarter of --data checks. The saliency, the scan and the metric before and
    after are the calibration part's (the library on that part, with that check, gives the same
    choice); the drop on the check split is reported and within the limit."""
    report = _json(CliRunner().invoke(app, ["prune", MODEL, *DATA, "--max-drop", "0.01", "--out", str(tmp_path / "m.safetensors"), "--json"]))
    data = sample_data("resnet", batches=2)
    split = check_split(data, seed=0)
    assert split.check is not None
    assert (report["calibration_samples"], report["check_samples"]) == (split.calibration.num_samples, split.check.num_samples) == (95, 33)  # per class, rounded
    model = sample_model("resnet").model.eval()
    assert report["metric_before"] == pytest.approx(metric(split.calibration, outputs(model, split.calibration)), abs=1e-9)
    assert report["check_metric_before"] == pytest.approx(metric(split.check, outputs(model, split.check)), abs=1e-9)
    assert report["check_drop"] == pytest.approx(report["check_metric_before"] - report["check_metric_after"], abs=1e-9) and report["check_drop"] <= 0.01 + 1e-9
    assert report["check_note"] is None  # 32 samples: enough to say something
    library = prune_to_target(copy.deepcopy(model), split.calibration, Target(max_drop=0.01), check=split.check).to_json()
    assert library["pct_chosen"] == report["pct_chosen"] and library["check_metric_after"] == report["check_metric_after"]
    assert all("check_metric" in p for p in report["probes"])


def test_a_pct_the_calibration_part_accepts_and_the_check_split_refuses() -> None:
    """Calibrated on the first 64 digits, checked on the next 64: alone, the calibration part keeps
    pct P0; on the check split P0 loses more than 0.01, so the search goes lower, to the largest pct
    at which both keep the accuracy (by brute force on zeroed copies; exact removal changes no output)."""
    digits = sample_data("resnet", batches=2)
    calibration, check = digits.subset(range(64)), digits.subset(range(64, 128))
    model = sample_model("resnet").model.eval()
    alone = prune_to_target(copy.deepcopy(model), calibration, Target(max_drop=0.01))
    checked = prune_to_target(copy.deepcopy(model), calibration, Target(max_drop=0.01), check=check)
    scores = spatial_saliency(model, calibration)

    def drops(pct: int) -> tuple[float, float]:
        zeroed = copy.deepcopy(model)
        zero_least_salient(zeroed, scores, pct)
        return tuple(metric(d, outputs(model, d)) - metric(d, outputs(zeroed, d)) for d in (calibration, check))  # type: ignore[return-value]

    p0, p1 = int(alone.pct_chosen), int(checked.pct_chosen)
    assert alone.check_samples is None and drops(p0)[0] <= 0.01 + 1e-9 < drops(p0)[1]  # the check split refuses P0
    assert p1 < p0 and max(drops(p1)) <= 0.01 + 1e-9
    assert all(max(drops(p)) > 0.01 + 1e-9 for p in range(p1 + 1, p0 + 1))
    assert checked.check_samples == 64 and checked.check_drop == pytest.approx(drops(p1)[1], abs=1e-6)


def test_the_fine_tuned_search_checks_every_adapted_model() -> None:
    """The fine-tuned search with a check split: an adapt that changes nothing finds the checked
    answer without adapting (every adapted pct above it fails on one part, and says what it measured
    on the check split); an adapt that ruins every model (its classifier zeroed) meets nowhere, so
    the answer is that pct as pruned, not adapted, and no fine-tune step is reported."""
    digits = sample_data("resnet", batches=2)
    calibration, check = digits.subset(range(64)), digits.subset(range(64, 128))
    model = sample_model("resnet").model.eval()
    plain = prune_to_target(copy.deepcopy(model), calibration, Target(max_drop=0.01), check=check)
    kept = prune_to_target(copy.deepcopy(model), calibration, Target(max_drop=0.01), check=check, adapt=lambda m: {"step": "unchanged"})
    assert kept.pct_chosen == plain.pct_chosen and kept.finetune == {"step": "unchanged"} and kept.check_drop == plain.check_drop
    adapted = [p for p in kept.probes if p["model"] == "adapted"]
    assert adapted and all(not p["meets"] for p in adapted if p["pct"] > kept.pct_chosen)

    def ruin(m: nn.Module) -> dict:
        with torch.no_grad():
            m.fc.weight.zero_()
        return {"step": "ruined"}

    ruined = prune_to_target(copy.deepcopy(model), calibration, Target(max_drop=0.01), check=check, adapt=ruin)
    assert ruined.pct_chosen == plain.pct_chosen and ruined.finetune is None
    assert ruined.report.metric_after == plain.report.metric_after and ruined.check_metric_after == plain.check_metric_after


def test_check_fraction_0_chooses_as_before(tmp_path) -> None:
    """`--check-fraction 0`: all of --data calibrates, as the search did before the check split."""
    out = str(tmp_path / "m.safetensors")
    report = _json(CliRunner().invoke(app, ["prune", MODEL, *DATA, "--max-drop", "0.01", "--check-fraction", "0", "--out", out, "--json"]))
    data = sample_data("resnet", batches=2)
    library = prune_to_target(sample_model("resnet").model, data, Target(max_drop=0.01)).to_json()
    assert report["pct_chosen"] == library["pct_chosen"] and report["calibration_samples"] == 128 and report["check_samples"] is None
    refused = CliRunner().invoke(app, ["prune", MODEL, *DATA, "--pct", "50", "--check-fraction", "0.2", "--out", out])
    assert refused.exit_code == 2 and "--max-drop" in refused.stderr


# constant 4x4 images with two input channels: channel 0 is v in 1..4 (classes 0, 0, 1, 1), channel 1 is 0
CALIBRATION_X = torch.stack([torch.arange(1.0, 5.0), torch.zeros(4)], dim=1).view(4, 2, 1, 1).expand(4, 2, 4, 4).contiguous()
# the check split: channel 0 tells nothing (2.5), channel 1 does (+1 for class 0, -1 for class 1)
CHECK_X = torch.stack([torch.full((4,), 2.5), torch.tensor([1.0, 1.0, -1.0, -1.0])], dim=1).view(4, 2, 1, 1).expand(4, 2, 4, 4).contiguous()
Y = torch.tensor([0, 0, 1, 1])


def _two_readers() -> nn.Module:
    """conv3x3 (channel c is input channel c at the centre tap) -> global mean -> Linear(2, 2):
    the margin of class 0 is -2 f0 + 2 f1 + 0.75."""
    conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
    linear = nn.Linear(2, 2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1], conv.weight[1, 1, 1, 1] = 1.0, 1.0
        linear.weight.copy_(torch.tensor([[-1.0, 1.0], [1.0, -1.0]]))
        linear.bias.copy_(torch.tensor([0.25, -0.5]))
    return nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear).eval()


def test_extract_keeps_a_channel_the_check_split_needs() -> None:
    """Channel 1 is constant (0) on the calibration samples: no importance there, and replacing it
    by its mean changes nothing, so the cut on the calibration part alone removes it. On the
    check split it alone separates the classes: without it the AUC there falls from 1 to 0.5, so
    with the check the cut is refused and the channel stays."""
    model = _two_readers()
    calibration, check = Dataset(CALIBRATION_X, Y, batch_size=4), Dataset(CHECK_X, Y, batch_size=4)
    _, alone = extract(model, calibration, 0, max_drop=0.01, val=check)
    _, checked = extract(model, calibration, 0, max_drop=0.01, check=check)
    assert alone.channels_removed == 1 and alone.val is not None and alone.val["extracted"].auc == 0.5  # today's cut: blind on the check split
    assert alone.check is None and alone.check_samples is None
    assert checked.channels_removed == 0 and checked.check is not None and checked.check_auc_drop == 0.0
    assert checked.data["extracted"].auc == checked.check["extracted"].auc == 1.0
    assert checked.bisection[0]["auc_drop"] == 0.0 and checked.bisection[0]["check_auc_drop"] == 0.5  # the refused cut
    assert checked.check_samples == 4 and checked.check_note is not None and "only 4 samples" in checked.check_note


def test_extract_cli_reports_the_check_split_and_0_turns_it_off(tmp_path) -> None:
    args = ["extract", MODEL, *DATA, "--class", "7", "--max-drop", "0.01", "--json"]
    report = _json(CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a.safetensors")]))
    plain = _json(CliRunner().invoke(app, [*args, "--check-fraction", "0", "--out", str(tmp_path / "b.safetensors")]))
    assert report["check_samples"] == 33 and report["check_auc_drop"] <= 0.01 and report["check"]["full"]["auc"] is not None
    assert report["data"]["full"]["auc"] - report["data"]["extracted"]["auc"] <= 0.01
    assert all("check_auc_drop" in t for t in report["bisection"])
    _, before = extract(sample_model("resnet").model, sample_data("resnet", batches=2), 7, max_drop=0.01)
    assert plain["check"] is None and plain["keep"] == before.keep and plain["bisection"] == before.bisection
