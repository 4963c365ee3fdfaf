"""`bench`: the deployment form computes what the model computes, the costs are the model's own, and the gates exit 1."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from helpers import SAMPLES, sample_data, sample_model
from pytest import approx
from torch import nn
from typer.testing import CliRunner, Result

from explainfix_cli.cli.app import app
from explainfix_cli.errors import UserError
from explainfix_cli.evaluation.bench import bench, deployment_form, peak_forward_bytes
from explainfix_cli.evaluation.measure import count_macs, median_latency_ms
from explainfix_cli.io.checkpoints import open_model
from explainfix_cli.pruning.pipeline import prune

BATCH_NORMS_AFTER_A_CONV = {"resnet": 9, "mobilenet": 14, "vgg": 4, "shufflenet": 15, "unet": 10, "densenet": 0, "convnext": 0}

pytestmark = pytest.mark.usefixtures("keep_global_rng")


@pytest.fixture(scope="module")
def pruned_vgg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The VGG sample pruned at 90 %: a smaller file that remembers its input size."""
    out = tmp_path_factory.mktemp("bench") / "vgg-small.safetensors"
    with torch.random.fork_rng():  # prune seeds torch's global RNG; later test files must not notice
        loaded = sample_model("vgg")
        prune(loaded.model, sample_data("vgg", batches=1), pct=90, arch=loaded.arch, out=out)
    return out


@pytest.mark.parametrize("name", list(BATCH_NORMS_AFTER_A_CONV))
def test_deployment_form_computes_what_the_model_computes(name: str) -> None:
    model = sample_model(name).model
    x = sample_data(name).x[:8]  # (8, C, H, W)
    deployed = deployment_form(model)
    assert deployed.note is None and deployed.folded_batch_norms == BATCH_NORMS_AFTER_A_CONV[name]
    left = sum(isinstance(m, nn.BatchNorm2d) for m in deployed.model.modules())
    assert left == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) - deployed.folded_batch_norms
    with torch.no_grad():
        expected = model(x)
        got = deployed.model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.equal(got, expected) or deployed.folded_batch_norms == 0  # folding really changed the arithmetic


def test_untraceable_model_keeps_its_batch_norms_and_says_so() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.norm(self.conv(x))
            return y if y.sum() > 0 else -y  # data-dependent control flow: torch.fx cannot trace it

    deployed = deployment_form(Branchy().eval())
    assert deployed.folded_batch_norms == 0 and deployed.note is not None and "torch.fx" in deployed.note


def test_peak_memory_of_a_chain_by_hand() -> None:
    # each activation of an element-wise chain is 2*4*8*8 floats = 2,048 bytes; at most two are
    # alive at once (the one being computed and its input), the model's input not counted
    chain = nn.Sequential(nn.ReLU(), nn.Sigmoid(), nn.Tanh())
    assert peak_forward_bytes(chain, torch.randn(2, 4, 8, 8)) == 2 * 2048


def test_median_of_the_timed_runs_only() -> None:
    calls: list[int] = []

    class Counter(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            return x

    (ms,) = median_latency_ms([Counter()], torch.zeros(1), repeats=5, warmup=2)
    assert len(calls) == 7 and 0 <= ms < 100


def test_latency_is_a_median_of_timed_forwards() -> None:
    class Sleeper(nn.Module):
        def __init__(self, seconds: float):
            super().__init__()
            self.seconds = seconds

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            time.sleep(self.seconds)
            return x

    fast, slow = median_latency_ms([Sleeper(0.0), Sleeper(0.004)], torch.zeros(1, 1), repeats=5, warmup=1)
    assert 4.0 <= slow < 40.0
    assert fast < slow


def test_costs_and_ratios_against_the_files(pruned_vgg: Path) -> None:
    small, original = open_model(pruned_vgg), sample_model("vgg")
    assert small.input_size == (1, 16, 16)
    threads = torch.get_num_threads()
    report = bench(small.model, (1, 16, 16), path=pruned_vgg, vs=original.model, vs_path=SAMPLES / "vgg.safetensors", batch_size=4, repeats=1, warmup=0, threads=1)
    params = [sum(p.numel() for p in m.parameters()) for m in (small.model, original.model)]
    assert report.vs is not None and report.ratios is not None
    assert (report.model.params, report.vs.params) == tuple(params) and report.ratios["params"] == approx(params[0] / params[1])
    assert report.model.macs == count_macs(small.model, (1, 16, 16)) < report.vs.macs
    assert report.model.file_bytes == os.path.getsize(pruned_vgg) and report.vs.file_bytes == os.path.getsize(SAMPLES / "vgg.safetensors")
    assert report.model.weight_bytes == sum(t.numel() * t.element_size() for t in small.model.state_dict().values())
    assert report.model.peak_memory_bytes == report.model.weight_bytes + report.model.peak_activation_bytes
    assert set(report.model.latency_ms) == {"eager_batch_1", "eager_batch_n", "deployment_batch_1", "deployment_batch_n"}
    assert all(v > 0 for v in report.model.latency_ms.values()) and report.model.deployment_max_change < 1e-4
    assert report.threads == 1 and torch.get_num_threads() == threads  # set for the run, then restored


# ---- the command line ---------------------------------------------------------------------------
def _bench(model: Path, *args: str) -> Result:
    return CliRunner().invoke(app, ["bench", str(model), "--repeats", "1", "--warmup", "0", "--batch-size", "2", "--threads", "1", *args])


@pytest.mark.parametrize(
    ("args", "code", "verdicts"),
    [
        (["--max-params", "10000", "--max-macs", "1000000"], 0, [True, True]),  # the pruned VGG: 2,851 params, ~0.2M MACs
        (["--max-params", "1000"], 1, [False]),
        (["--max-macs", "1000"], 1, [False]),
        (["--max-latency-ms", "60000"], 0, [True]),
        (["--max-latency-ms", "0.000001", "--max-params", "10000"], 1, [False, True]),
    ],
)
def test_gates_exit_codes_and_json(pruned_vgg: Path, args: list[str], code: int, verdicts: list[bool]) -> None:
    result = _bench(pruned_vgg, *args, "--json")  # no --input-size: the pruned file remembers it
    assert result.exit_code == code, result.output
    payload = json.loads(result.stdout)
    assert [g["passed"] for g in payload["gates"]] == verdicts and payload["passed"] is all(verdicts)
    assert payload["threads"] == 1 and payload["input_size"] == [1, 16, 16]
    # one verdict line per gate, passed ones too (a busy machine adds a note before them)
    verdict_lines = [line for line in result.stderr.splitlines() if not line.startswith("explainfix: note: ")]
    expected = [f"explainfix: gate {g['name']} {'passed' if g['passed'] else 'failed'}: {g['sentence']}" for g in payload["gates"]]
    assert verdict_lines == expected, result.stderr


def test_side_by_side_table_and_usage_errors(pruned_vgg: Path) -> None:
    result = _bench(pruned_vgg, "--vs", str(SAMPLES / "vgg.safetensors"))
    assert result.exit_code == 0, result.output
    assert "ratio" in result.stdout and "deployment batch 2" in result.stdout
    vgg_arch = ["--arch", "explainfix_cli.zoo:vgg", "--arch-kwargs", '{"num_classes": 10, "in_channels": 1, "input_size": 16}']
    unknown = _bench(SAMPLES / "vgg.pt", *vgg_arch)  # a state dict records no input size
    assert unknown.exit_code == 2 and "--input-size" in unknown.stderr and unknown.stdout == ""
    recorded = _bench(SAMPLES / "vgg.safetensors", "--json")  # the sample records the input it was trained on
    assert recorded.exit_code == 0 and json.loads(recorded.stdout)["input_size"] == [1, 16, 16]
    wrong = _bench(SAMPLES / "vgg.safetensors", "--input-size", "3,16,16")
    assert wrong.exit_code == 2 and "do not fit" in wrong.stderr
    # a gate no model can pass is a mistake in the command (exit 2), not a failed gate (exit 1)
    for args, message in ((["--max-latency-ms", "-1"], "--max-latency-ms must be above 0"), (["--max-latency-ms", "nan"], "above 0"),
                          (["--max-params", "0"], "--max-params must be at least 1"), (["--max-macs", "-3"], "--max-macs must be at least 1")):  # fmt: skip
        impossible = _bench(pruned_vgg, *args, "--json")
        assert impossible.exit_code == 2 and impossible.stdout == "" and message in impossible.stderr, impossible.output
    with pytest.raises(UserError, match="`max_latency_ms` must be above 0"):  # the library checks the same, before measuring
        bench(open_model(pruned_vgg).model, (1, 16, 16), max_latency_ms=0.0)


# ---- threads on a busy machine ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cores", "load", "threads"),
    [(2, 15.3, 1), (2, 0.2, 1), (2, 0.0, 2), (16, 0.5, 4), (16, 13.5, 2), (8, None, 4), (1, 0.0, 1), (4, 3.0, 1)],
)
def test_default_threads_are_the_free_cores_up_to_4(cores: int, load: float | None, threads: int) -> None:
    from explainfix_cli.evaluation.bench import default_threads

    assert default_threads(cores, load) == threads


def test_a_busy_machine_defaults_to_one_thread_and_says_the_figure_may_be_unreliable(monkeypatch: pytest.MonkeyPatch) -> None:
    from explainfix_cli.evaluation import bench as bench_module

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 1, 8, 8))
    monkeypatch.setattr(bench_module, "machine_load", lambda: (2, 15.3))  # the loaded 2-core machine of issue 22
    busy = bench(model, (1, 8, 8), batch_size=2, repeats=1, warmup=0)
    assert busy.threads == 1 and busy.load_average == 15.3
    assert busy.notes == ["the machine's 1-minute load is 15.3 on 2 cores, so other work competes with the 1 thread measured: the latencies may be unreliable; bench on an idle machine."]
    assert busy.to_json()["notes"] == busy.notes
    monkeypatch.setattr(bench_module, "machine_load", lambda: (8, 0.5))  # an idle machine
    idle = bench(model, (1, 8, 8), batch_size=2, repeats=1, warmup=0)
    assert idle.threads == 4 and idle.notes == []
    assert bench(model, (1, 8, 8), batch_size=2, repeats=1, warmup=0, threads=8).notes  # 8 threads, 7.5 cores free


def test_the_command_says_the_machine_was_busy_and_shows_a_passing_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    from explainfix_cli.evaluation import bench as bench_module

    monkeypatch.setattr(bench_module, "machine_load", lambda: (2, 15.3))
    result = CliRunner().invoke(app, ["bench", str(SAMPLES / "resnet.safetensors"), "--repeats", "1", "--warmup", "0", "--batch-size", "2", "--max-latency-ms", "10000", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["threads"] == 1 and len(payload["notes"]) == 1
    lines = result.stderr.splitlines()
    assert lines[0] == f"explainfix: note: {payload['notes'][0]}"
    assert lines[1:] == [f"explainfix: gate max_latency_ms passed: {payload['gates'][0]['sentence']}"]
