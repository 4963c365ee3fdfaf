"""pruning.alternatives: when exact removal takes little, what the other modes would take (docs/method.md §3)."""

from __future__ import annotations

import copy
import json

import pytest
from helpers import committed_sample, sample_data, sample_model
from typer.testing import CliRunner

from explainfix_cli.cli.app import app
from explainfix_cli.pruning.alternatives import (
    ENOUGH,
    emptied_channels,
    prune_with_alternatives,
    recommendation,
    removed_share,
)
from explainfix_cli.pruning.pipeline import PruneSettings, prune
from explainfix_cli.saliency import spatial_saliency


@pytest.fixture(scope="module")
def convnext() -> tuple:
    model = sample_model("convnext").model.eval()
    data = sample_data("convnext", batches=2)
    return model, data, spatial_saliency(copy.deepcopy(model), data)


def test_layernorm_network_is_told_that_channel_granularity_shrinks_it(convnext: tuple) -> None:
    model, data, scores = convnext
    _, report, advice = prune_with_alternatives(copy.deepcopy(model), data, PruneSettings(pct=90, scores=scores))
    assert report.params_after == report.params_before  # exact removal takes nothing past a LayerNorm
    assert report.blocked_groups["normalisation across channels"] >= 1
    by_mode = {(a.granularity, a.removal): a for a in advice.alternatives}
    assert set(by_mode) == {("kernel", "calibrated"), ("kernel", "aggressive"), ("channel", "exact")}
    # each alternative is the prune of that mode at the same pct with the same scores, run on its own
    _, direct = prune(copy.deepcopy(model), data, pct=90, scores=scores, granularity="channel", fix=False)
    channel = by_mode[("channel", "exact")]
    assert channel.params_after == direct.params_after and channel.macs_after == direct.macs_after
    assert channel.params_removed_share == pytest.approx(removed_share(direct), abs=1e-4)
    assert channel.params_removed_share > 0.85
    assert by_mode[("kernel", "calibrated")].params_removed_share == 0.0  # LayerNorm stops calibrated removal too
    assert advice.recommended is channel and channel.options == "--granularity channel"
    line = advice.line(report)
    assert line is not None and "removed 0%" in line and "--granularity channel 89%" in line and "explainfix finetune" in line
    assert advice.to_json()["recommendation"] == "--granularity channel"


def test_plain_network_at_a_low_pct_is_not_told_anything() -> None:
    model = sample_model("resnet").model.eval()
    data = sample_data("resnet", batches=2)
    scores = spatial_saliency(copy.deepcopy(model), data)
    emptied, channels = emptied_channels(model, scores, 50)
    assert emptied <= 2 and channels == 240  # scattered zeros: one channel of 240 emptied at pct 50
    _, report, advice = prune_with_alternatives(copy.deepcopy(model), data, PruneSettings(pct=50, scores=scores))
    assert removed_share(report) < 0.25  # little removed, but nothing exact removal could have taken
    assert advice.alternatives == [] and advice.recommended is None and advice.line(report) is None


def test_recommendation_prefers_held_out_metric_then_channel() -> None:
    from explainfix_cli.pruning.alternatives import Alternative

    calibrated = Alternative("kernel", "calibrated", 10, 0.6, 100, 0.90, 0.95)
    channel = Alternative("channel", "exact", 8, 0.7, 80, 0.93, 0.94)
    small = Alternative("kernel", "aggressive", 20, ENOUGH - 0.01, 200, 0.99, 0.99)
    assert recommendation([calibrated, channel, small]) is calibrated  # the best held-out metric of those removing enough
    assert recommendation([Alternative("kernel", "calibrated", 10, 0.6, 100, 0.9, None), Alternative("channel", "exact", 8, 0.7, 80, 0.9, None)]).granularity == "channel"
    assert recommendation([small]) is None


def test_prune_json_and_note_on_the_mobilenet_sample(tmp_path) -> None:
    out = tmp_path / "m.safetensors"
    args = ["prune", str(committed_sample("mobilenet.safetensors")), "--data", str(committed_sample("digits_val.npz")), "--batches", "2", "--pct", "90"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    shares = {a["options"]: a["params_removed_share"] for a in report["alternatives"]}
    exact = 1 - report["params_after"] / report["params_before"]
    assert exact < 0.25 and shares["--removal calibrated"] > 2 * exact and shares["--granularity channel"] > 0.7
    assert report["recommendation"] in shares and shares[report["recommendation"]] >= ENOUGH
    assert f"prune with {report['recommendation']}, then `explainfix finetune`" in result.stderr
    assert result.stderr.count("explainfix: note: this prune removed") == 1
    # what was written is the exact prune asked for, not an alternative
    from explainfix_cli.io.checkpoints import load_model

    assert sum(p.numel() for p in load_model(out).parameters()) == report["params_after"]
