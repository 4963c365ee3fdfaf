"""`sweep` and `prune` to a target (explainfix_cli/sweep.py), on the ResNet sample and by hand.

Every number of the sweep is compared with an independent `prune --pct` of a fresh model; the
largest pct that keeps the metric is compared with a brute-force scan of the 1 % grid above it
(zeroed models, two minibatches of digits: cheap); benchmarks/target_search.py scans the whole
grid with real prunes on three samples.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import struct
from pathlib import Path

import pytest
import torch
from helpers import SAMPLES, sample_data, sample_model
from torch import nn
from typer.testing import CliRunner, Result

from explainfix_cli.cli.app import app
from explainfix_cli.evaluation.measure import metric, outputs
from explainfix_cli.io.checkpoints import load_model, open_model
from explainfix_cli.io.data import Dataset, load_data
from explainfix_cli.pruning.pipeline import prune, zero_least_salient
from explainfix_cli.saliency import spatial_saliency
from explainfix_cli.search.sweep import sweep
from explainfix_cli.search.target import last_meeting

PCTS = [0.0, 60.0, 90.0]
MODEL = str(SAMPLES / "resnet.safetensors")
DATA = ["--data", str(SAMPLES / "digits_val.npz"), "--batches", "2"]


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def _json(result: Result) -> dict:
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1, "stdout must be one JSON line"
    return json.loads(result.stdout)


def _png_size(path: Path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One sweep through the command line, into a folder of the user's that already holds a note
    and a stale sweep.csv (replaced with --force; the note stays)."""
    folder = tmp_path_factory.mktemp("sweep") / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "sweep.csv").write_text("stale")
    payload = _json(_invoke("sweep", MODEL, *DATA, "--pcts", "90,0,60", "--latency-repeats", "0", "--out", str(folder), "--force", "--json"))
    return folder, payload


# ---- the sweep ----------------------------------------------------------------------------------
def test_each_point_is_the_model_prune_writes(swept: tuple[Path, dict]) -> None:
    _, payload = swept
    data = sample_data("resnet", batches=2)
    assert payload["metric"] == "accuracy"
    assert [p["pct"] for p in payload["points"]] == PCTS  # sorted
    base = payload["baseline"]
    total = base["spatial_kernels"]
    for point in payload["points"]:
        model, report = prune(sample_model("resnet").model, data, pct=point["pct"])  # scores again, from scratch
        assert point["params"] == report.params_after == sum(p.numel() for p in model.parameters())
        assert point["macs"] == report.macs_after
        assert point["metric"] == pytest.approx(report.metric_after, abs=1e-9)
        assert point["metric_drop"] == pytest.approx(base["metric"] - point["metric"], abs=1e-9)
        assert point["zeroed_kernels"] == math.floor(point["pct"] / 100 * total)
        zero = sum(int((c.weight == 0).flatten(2).all(dim=2).sum()) for c in model.modules() if isinstance(c, nn.Conv2d) and c.kernel_size != (1, 1))
        assert point["spatial_kernels"] - point["nonzero_spatial_kernels"] == zero
        assert point["latency_ms"] is None
    assert payload["points"][0]["params"] == base["params"] and payload["points"][0]["metric"] == base["metric"]
    assert payload["points"][-1]["params"] < base["params"]  # 90 % removes channels from the ResNet


def test_files_json_csv_figure_and_force(swept: tuple[Path, dict]) -> None:
    folder, payload = swept
    assert sorted(os.listdir(folder)) == ["notes.txt", "sweep.csv", "sweep.json", "sweep.png"]  # no staging folder left
    assert (folder / "notes.txt").read_text() == "mine"
    written = json.loads((folder / "sweep.json").read_text())
    assert written == {k: payload[k] for k in ("metric", "baseline", "points", "settings")}
    rows = list(csv.DictReader((folder / "sweep.csv").open()))
    assert [r["model"] for r in rows] == ["unpruned", "pruned", "pruned", "pruned"]
    for row, point in zip(rows, [payload["baseline"], *payload["points"]], strict=True):
        assert int(row["params"]) == point["params"] and float(row["metric"]) == point["metric"]
    assert _png_size(folder / "sweep.png")[0] == 780  # one panel (5.2 in at 150 dpi): no latency measured
    assert payload["files"] == [str(folder / n) for n in ("sweep.json", "sweep.csv", "sweep.png")]


def test_same_inputs_give_identical_files(swept: tuple[Path, dict], tmp_path: Path) -> None:
    folder, _ = swept
    _json(_invoke("sweep", MODEL, *DATA, "--pcts", "0,60,90", "--latency-repeats", "0", "--out", str(tmp_path / "again"), "--json"))
    for name in ("sweep.json", "sweep.csv", "sweep.png"):
        assert (tmp_path / "again" / name).read_bytes() == (folder / name).read_bytes(), name


def test_refusals_leave_everything_as_it_was(swept: tuple[Path, dict], tmp_path: Path) -> None:
    folder, _ = swept
    before = {n: (folder / n).read_bytes() for n in os.listdir(folder)}
    result = _invoke("sweep", MODEL, *DATA, "--out", str(folder))
    assert result.exit_code == 2 and "not empty" in result.stderr and "--force" in result.stderr
    assert {n: (folder / n).read_bytes() for n in os.listdir(folder)} == before
    (tmp_path / "clash").mkdir()
    (tmp_path / "clash" / "sweep.png").mkdir()  # a folder where the figure would go: never deleted
    result = _invoke("sweep", MODEL, *DATA, "--out", str(tmp_path / "clash"), "--force")
    assert result.exit_code == 2 and "is a folder" in result.stderr
    assert os.listdir(tmp_path / "clash") == ["sweep.png"]
    for bad, words in [
        (["--pcts", "50,abc"], "comma-separated"),
        (["--pcts", "50,100"], "[0, 100)"),
        (["--out", str(tmp_path / "missing" / "deeper")], "does not exist"),
        (["--latency-repeats", "-1"], "latency"),
    ]:
        args = ["--out", str(tmp_path / "new"), *bad] if bad[0] != "--out" else bad
        result = _invoke("sweep", MODEL, *DATA, *args)
        assert result.exit_code == 2, (bad, result.output)
        assert words in result.stderr and "Traceback" not in result.stderr
    result = _invoke("sweep", MODEL, "--out", str(tmp_path / "new"))
    assert result.exit_code == 2 and "--data" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["clash"]


def test_a_failure_while_writing_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import explainfix_cli.search.sweep as module

    def broken(path: Path, **_: object) -> None:
        path.write_bytes(b"half a figure")
        raise OSError("disk full")

    monkeypatch.setattr(module, "draw_tradeoff", broken)
    data = sample_data("resnet", batches=1)
    with pytest.raises(OSError, match="disk full"):
        sweep(sample_model("resnet").model, data, [50], out_dir=tmp_path / "new", latency_repeats=0)
    assert os.listdir(tmp_path) == []  # the folder it made is gone again, and nothing is half-written
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "sweep.json").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        sweep(sample_model("resnet").model, data, [50], out_dir=tmp_path / "mine", latency_repeats=0, force=True)
    assert os.listdir(tmp_path / "mine") == ["sweep.json"] and (tmp_path / "mine" / "sweep.json").read_text() == "old"


def test_table_on_stdout_and_latency_in_the_figure(tmp_path: Path) -> None:
    result = _invoke("sweep", MODEL, *DATA, "--batches", "1", "--pcts", "50,80", "--latency-repeats", "2", "--out", str(tmp_path / "s"))
    assert result.exit_code == 0, result.output
    assert "unpruned" in result.stdout and "80" in result.stdout and "latency ms" in result.stdout
    written = json.loads((tmp_path / "s" / "sweep.json").read_text())
    base, half, most = written["baseline"], *written["points"]
    assert all(p["latency_ms"] > 0 for p in (base, half, most))
    # at 50 % kernels are zeroed but no channel leaves: the unpruned architecture, timed once for both
    assert half["params"] == base["params"] and half["zeroed_kernels"] > 0 and half["latency_ms"] == base["latency_ms"]
    assert most["params"] < base["params"] and most["latency_ms"] != base["latency_ms"]
    assert written["settings"]["latency"]["repeats"] == 2
    assert _png_size(tmp_path / "s" / "sweep.png")[0] == 1560  # two panels: parameters, latency


def test_latency_in_deployment_form_times_folded_channels_last_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--latency-form deployment` times what `bench` calls the deployment form: copies with the
    batch norms folded into the convolutions before them, fed a channels-last input, one per
    architecture, and each point gets its own copy's time."""
    import explainfix_cli.search.sweep as module

    timed: list[tuple[list[nn.Module], torch.Tensor]] = []

    def fake_timer(models: list[nn.Module], x: torch.Tensor, repeats: int, warmup: int) -> list[float]:
        timed.append((models, x))
        return [float(sum(p.numel() for p in m.parameters())) for m in models]  # a "time" that names the model

    monkeypatch.setattr(module, "median_latency_ms", fake_timer)
    data = sample_data("resnet", batches=1)
    result = sweep(sample_model("resnet").model, data, [50, 90], latency_form="deployment", out_dir=tmp_path / "s")
    (models, x), = timed
    assert len(models) == 2  # 50 % removes no channel: it runs as the unpruned model
    assert not any(isinstance(m, nn.BatchNorm2d) for model in models for m in model.modules())
    assert x.is_contiguous(memory_format=torch.channels_last)  # one channel: both layouts alike, so the weights tell
    wide = [m.weight for model in models for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1 and m.kernel_size != (1, 1)]
    assert wide and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in wide)
    base, half, most = result.baseline, *result.points
    sizes = [float(sum(p.numel() for p in m.parameters())) for m in models]
    assert half.latency_ms == base.latency_ms == max(sizes) and most.latency_ms == min(sizes) < max(sizes)
    assert result.settings["latency"]["form"] == "deployment" and result.settings["latency"]["note"] is None
    eager = sweep(sample_model("resnet").model, data, [50, 90], out_dir=tmp_path / "e")
    (eager_models, eager_x) = timed[1]
    assert any(isinstance(m, nn.BatchNorm2d) for m in eager_models[0].modules()) and eager_x.is_contiguous()
    for folded, plain in zip(models, eager_models, strict=True):
        # folding drops the batch norms' weights and biases and gives each conv a bias: the plain
        # count minus 2 per batch-norm channel, plus 1 per output channel of a conv without a bias
        norms = [m for m in plain.modules() if isinstance(m, nn.BatchNorm2d)]
        convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
        without_norms = sum(p.numel() for p in plain.parameters()) - sum(2 * n.num_features for n in norms)
        assert sum(p.numel() for p in folded.parameters()) == without_norms + sum(c.out_channels for c in convs if c.bias is None)
    assert eager.settings["latency"]["form"] == "eager"
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["settings"]["latency"]["form"] == "deployment"


def test_deployment_form_of_a_model_fx_cannot_trace_says_why() -> None:
    """A forward that branches on its input's values cannot be traced symbolically: the batch
    norms stay, the latency is still measured (channels-last), and `settings` says why."""

    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.norm(self.conv(x))
            if h.mean() > 0:  # data-dependent control flow: torch.fx raises on it
                h = h.relu()
            return self.head(h.mean(dim=(2, 3)))

    g = torch.Generator().manual_seed(0)
    data = Dataset(torch.randn(8, 1, 6, 6, generator=g), torch.arange(8) % 3, batch_size=4)
    result = sweep(Branching(), data, [0, 50], latency_repeats=1, latency_form="deployment")
    latency = result.settings["latency"]
    assert latency["form"] == "deployment" and "torch.fx cannot trace" in latency["note"]
    assert all(p.latency_ms is not None and p.latency_ms > 0 for p in (result.baseline, *result.points))


def test_adapt_runs_on_each_point_before_it_is_measured() -> None:
    """The extension point for fine-tuning each point: here a change whose effect is known. With
    the classifier silenced every logit is its bias alone, so every sample gets one class."""
    data = sample_data("resnet", batches=1)

    def silence(model: nn.Module) -> None:
        linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            linear.weight.zero_()

    result = sweep(sample_model("resnet").model, data, [50], latency_repeats=0, adapt=silence)
    linear = [m for m in sample_model("resnet").model.modules() if isinstance(m, nn.Linear)][-1]
    predicted = int(linear.bias.argmax())
    expected = float((data.y[: data.num_samples] == predicted).float().mean())
    assert result.points[0].metric == pytest.approx(expected)
    assert result.baseline.metric > 0.9


# ---- the search ---------------------------------------------------------------------------------
def _brute_last(grid: list[int], meets: list[bool]) -> int | None:
    return next((grid[i] for i in reversed(range(len(grid))) if meets[i] and meets[0]), None)


@pytest.mark.parametrize("boundary", [0, 1, 2, 37, 50, 97, 98, 99])
def test_bisection_finds_every_boundary_of_a_monotone_condition(boundary: int) -> None:
    grid, calls = list(range(100)), []

    def meets(p: int) -> bool:
        calls.append(p)
        return p <= boundary

    assert last_meeting(grid, meets) == boundary
    assert len(calls) <= 2 + math.ceil(math.log2(100)) + 5  # ends, bisection, look-ahead
    assert len(calls) == len(set(calls))  # no point twice: a probe can be a fine-tune


def test_the_look_ahead_does_not_probe_again_what_the_bisection_tried() -> None:
    # 0..99, meets up to 62: bisection tries 49, 74, 61, 67, 64, 62, 63; the look-ahead 64..68 reuses 64 and 67
    calls: list[int] = []
    assert last_meeting(list(range(100)), lambda p: calls.append(p) is None and p <= 62) == 62
    assert sorted(calls) == sorted(set(calls)) and {64, 67} <= set(calls)


def test_look_ahead_finds_a_condition_that_comes_back() -> None:
    grid = list(range(100))
    # fails at 41-43, meets again 44-46 (within the patience of 5), then never: the answer is 46
    pattern = [p <= 40 or 44 <= p <= 46 for p in grid]
    assert last_meeting(grid, lambda p: pattern[p]) == _brute_last(grid, pattern) == 46
    assert last_meeting(grid, lambda p: p >= 5) is None  # the start fails
    assert last_meeting(grid[::-1], lambda p: p >= 83) == 83  # reversed grid: the smallest pct that fits


def test_max_drop_is_the_largest_pct_of_a_brute_force_scan(tmp_path: Path) -> None:
    out = tmp_path / "small.safetensors"
    # the scan on all of the data given (no check split: tests/test_holdout.py checks that one)
    report = _json(_invoke("prune", MODEL, *DATA, "--max-drop", "0.01", "--check-fraction", "0", "--out", str(out), "--json"))
    chosen = int(report["pct_chosen"])
    assert report["pct"] == chosen and report["target"] == {"max_drop": 0.01, "max_params": None, "max_macs": None}
    assert report["metric_before"] - report["metric_after"] <= 0.01 + 1e-9
    # brute force, independently: every pct of the grid from the chosen one up, zeroing a fresh
    # copy (exact removal does not change the outputs, so this is the written model's metric)
    data = sample_data("resnet", batches=2)
    model = sample_model("resnet").model.eval()
    scores = spatial_saliency(model, data)
    before = metric(data, outputs(model, data))
    drops = {}
    for pct in range(chosen, 100):
        zeroed = copy.deepcopy(model)
        zero_least_salient(zeroed, scores, pct)
        drops[pct] = before - metric(data, outputs(zeroed, data))
    assert chosen == max(p for p, d in drops.items() if d <= 0.01 + 1e-9)
    assert 0 < chosen < 99
    assert [p["pct"] for p in report["probes"] if p["model"] == "zeroed"] == list(range(99, chosen - 1, -1))  # the scan, top down
    written = load_model(out)
    assert metric(data, outputs(written, data)) == pytest.approx(report["metric_after"], abs=1e-9)
    assert sum(p.numel() for p in written.parameters()) == report["params_after"]
    _, next_one = prune(copy.deepcopy(model), data, pct=chosen + 1, scores=scores)
    assert before - next_one.metric_after > 0.01  # the pruned model one step up fails too


def test_max_params_is_the_smallest_pct_that_fits(tmp_path: Path) -> None:
    data = sample_data("resnet", batches=1)
    budget = 40_000
    out = tmp_path / "fits.safetensors"
    report = _json(_invoke("prune", MODEL, *DATA, "--batches", "1", "--max-params", str(budget), "--out", str(out), "--json"))
    chosen = int(report["pct_chosen"])
    assert report["params_after"] <= budget
    _, below = prune(sample_model("resnet").model, data, pct=chosen - 1)
    assert below.params_after > budget
    assert sum(p.numel() for p in load_model(out).parameters()) == report["params_after"]
    assert all(p["model"] == "pruned" for p in report["probes"])
    assert len(report["probes"]) < 20  # bisection, not a scan


def test_target_refusals(tmp_path: Path) -> None:
    out = str(tmp_path / "x.safetensors")
    result = _invoke("prune", MODEL, *DATA, "--pct", "50", "--max-drop", "0.01", "--out", out)
    assert result.exit_code == 2 and "alternatives" in result.stderr
    result = _invoke("prune", MODEL, *DATA, "--max-drop", "0.01", "--granularity", "channel", "--out", out)
    assert result.exit_code == 2 and "kernel" in result.stderr
    result = _invoke("prune", MODEL, *DATA, "--max-drop", "-0.1", "--out", out)
    assert result.exit_code == 2 and "[0, 1]" in result.stderr
    result = _invoke("prune", MODEL, *DATA, "--batches", "1", "--max-params", "10", "--out", out)  # no pct gets that small
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and "no pct meets the target" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert os.listdir(tmp_path) == []


def test_sweep_fine_tunes_each_point_from_the_command_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from explainfix_cli.cli.app import app

    samples = Path(__file__).resolve().parents[1] / "sample_models"
    args = ["sweep", str(samples / "resnet.safetensors"), "--data", str(samples / "digits_val.npz"), "--pcts", "90", "--latency-repeats", "0", "--json"]
    plain = json.loads(CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a")]).stdout)
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b"), "--finetune-epochs", "3", "--train", str(samples / "digits_val.npz")])
    assert result.exit_code == 0, result.output
    tuned = json.loads(result.stdout)
    # at 90 % the zeroed model is near chance; three epochs with the teacher bring it far back
    assert tuned["points"][0]["params"] == plain["points"][0]["params"]
    assert tuned["points"][0]["metric"] > plain["points"][0]["metric"] + 0.3
    bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "c"), "--finetune-epochs", "1"])
    assert bad.exit_code == 2 and "--train" in bad.stderr


def test_max_drop_after_fine_tuning_from_the_command_line(tmp_path: Path) -> None:
    """`prune --max-drop X --finetune-epochs K --train T`: the target met after fine-tuning. The
    answer is at least the pct met without fine-tuning, every fine-tuned probe above it fails, and
    the probe one pct up is what `prune --pct` then `finetune` (same seed) gives, independently.
    One epoch on the 1,437 training digits per probe (a dozen probes), held out on 64 of them: enough
    to prune more. (On 64 training digits the default, which trains the surviving kernels of this
    sample, overfits them and the search keeps the unadapted pct, 54; the fixed form reached 57.)"""
    import numpy as np

    from explainfix_cli.training.finetune import Recipe, finetune
    from explainfix_cli.training.fixed import fix_spatial_filters

    digits = np.load(SAMPLES / "digits_train.npz")
    train = tmp_path / "train64.npz"
    np.savez(train, x=digits["x"][:64], y=digits["y"][:64])
    out = tmp_path / "tuned.safetensors"
    # --check-fraction 0: --val only reported, all of --data chooses (tests/test_holdout.py checks with it)
    report = _json(_invoke("prune", MODEL, *DATA, "--max-drop", "0.02", "--finetune-epochs", "1", "--train", str(SAMPLES / "digits_train.npz"), "--val", str(train), "--check-fraction", "0", "--json", "--out", str(out)))
    chosen = int(report["pct_chosen"])
    [unadapted] = [p["pct"] for p in report["probes"] if p["model"] == "pruned"]  # the answer without fine-tuning
    assert chosen > unadapted  # one fine-tuning epoch (batch norm in train mode) brings back enough to prune more
    tuned = [p for p in report["probes"] if p["model"] == "adapted"]
    assert not any(p["meets"] for p in tuned if p["pct"] > chosen)
    data = sample_data("resnet", batches=2)
    opened = open_model(out)
    written = opened.model
    assert metric(data, outputs(written, data)) == pytest.approx(report["metric_after"], abs=1e-6)
    assert report["metric_before"] - report["metric_after"] <= 0.02 + 1e-9
    assert report["finetune"]["step"] == "finetune" and report["finetune"]["metric_after"] == pytest.approx(report["metric_after"], abs=1e-6)
    assert [step["step"] for step in opened.history] == ["prune", "finetune"]
    assert opened.history[0]["metric_after"] == report["finetune"]["metric_before"]  # the prune step: before fine-tuning
    assert all(not conv.weight.requires_grad for conv in written.modules() if isinstance(conv, nn.Conv2d) and conv.kernel_size != (1, 1))
    # held-out data (--val): measured once, on the chosen pct's prune, and on the written model
    held_out = load_data(train)
    assert report["val_samples"] == opened.history[0]["val_samples"] == 64 and report["val_max_logit_change"] < 1e-4
    assert report["val_metric_before"] == pytest.approx(metric(held_out, outputs(sample_model("resnet").model, held_out)), abs=1e-6)
    assert report["val_metric_after"] == pytest.approx(metric(held_out, outputs(written, held_out)), abs=1e-6)
    # independently: prune one pct up, fix, fine-tune one epoch with the unpruned model as teacher
    model = sample_model("resnet").model.eval()
    up = next(p for p in tuned if p["pct"] == chosen + 1)
    pruned, _ = prune(copy.deepcopy(model), data, pct=chosen + 1, fix=False)
    fix_spatial_filters(pruned)
    finetune(pruned, load_data(SAMPLES / "digits_train.npz"), data, recipe=Recipe(epochs=1), teacher=copy.deepcopy(model))
    assert metric(data, outputs(pruned, data)) == pytest.approx(up["metric"], abs=1e-6)
    assert not up["meets"]
    for refused in (["--pct", "80"], []):  # a pct is fine-tuned by `finetune`; epochs need --train
        extra = ["--train", str(train)] if refused else []
        result = _invoke("prune", MODEL, *DATA, *refused, "--finetune-epochs", "1", *extra, "--out", str(tmp_path / "x.safetensors"))
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
