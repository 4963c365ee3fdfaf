"""explainfix export (docs/export.md): every bundled sample, pruned and fine-tuned ones too, exports to
ONNX and pt2 and matches the model within 1e-4 of its largest output at batch 1 and another size;
int8 keeps held-out accuracy at a third of the size; the exported files run in evaluate and bench."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SAMPLES, sample_data, sample_model
from torch import nn

from explainfix_cli.errors import UserError
from explainfix_cli.evaluation.bench import bench
from explainfix_cli.evaluation.scores import evaluate
from explainfix_cli.export.pipeline import export
from explainfix_cli.io.checkpoints import open_model
from explainfix_cli.io.data import load_data
from explainfix_cli.pruning.pipeline import prune
from explainfix_cli.training.finetune import Recipe, finetune

ALL = ["resnet", "densenet", "densenet_bc", "mobilenet", "vgg", "shufflenet", "convnext", "unet", "resnet_multilabel"]
HAS_ORT = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript"))
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="onnxruntime not installed (pip install explainfix[export]; CI installs it)")


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Every sample as bundled, pruned at pct 90 on its val split, and the ResNet pruned then fine-tuned for one short epoch."""
    built: dict[str, tuple[nn.Module, tuple[int, ...]]] = {}
    for name in ALL:
        loaded = sample_model(name)
        size = loaded.input_size
        assert size is not None
        built[name] = (loaded.model, size)
        pruned, report = prune(sample_model(name).model, sample_data(name, batch_size=16, batches=1), pct=90, sample_shape=size)
        assert report.zeroed_kernels > 0.8 * report.spatial_kernels_before
        built[f"{name}-pruned"] = (pruned.eval(), size)
    tuned, _ = finetune(
        prune(sample_model("resnet").model, sample_data("resnet", 32, 1), pct=90)[0],
        sample_data("resnet", 32, 2, split="train"), sample_data("resnet", 64, 1), recipe=Recipe(epochs=1, seed=0),
    )
    built["resnet-finetuned"] = (tuned.eval(), built["resnet"][1])
    return built


def _batches(size: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(n, *size, generator=g) for n in (1, 5)]  # 5: neither the trace's batch nor the check's


def _assert_close(reference: nn.Module, run, size: tuple[int, ...]) -> None:  # type: ignore[no-untyped-def]
    """The exported file's outputs (run by `run`) equal the model's within 1e-4 of the largest output magnitude."""
    for x in _batches(size):
        with torch.no_grad():
            want = reference(x)
        got = run(x)
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), f"batch {len(x)}"


@pytest.mark.parametrize("name", [*ALL, *(f"{n}-pruned" for n in ALL), "resnet-finetuned"])
def test_pt2_matches_the_model(models, name: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, size = models[name]
    out = tmp_path / "m.pt2"
    report = export(model, "pt2", out, input_shape=size, seed=0)
    assert report.max_abs_diff <= report.tolerance == pytest.approx(1e-4 * report.max_abs_output)
    program = torch.export.load(str(out)).module()  # torch.export alone, not explainfix's wrapper
    _assert_close(model, lambda x: program(x), size)
    assert report.file_bytes == out.stat().st_size


@needs_ort
@pytest.mark.parametrize("name", [*(f"{n}-pruned" for n in ALL), "resnet-finetuned", "unet"])
def test_onnx_matches_the_model(models, name: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    model, size = models[name]
    out = tmp_path / "m.onnx"
    report = export(model, "onnx", out, input_shape=size, seed=0)
    assert report.opset == 18 and report.max_abs_diff <= report.tolerance
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    _assert_close(model, lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), size)


@needs_ort
@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_int8_keeps_held_out_accuracy_at_a_third_of_the_size(models, name: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, size = models[name]
    held_out = load_data(SAMPLES / "digits_train.npz", batch_size=512)  # never pruned or calibrated on
    calib = load_data(SAMPLES / "digits_val.npz", batch_size=60)
    out = tmp_path / "int8.onnx"
    report = export(model, "onnx", out, input_shape=size, quantize="int8", calib=calib, val=held_out)
    assert report.quantized == "int8" and report.tolerance is None
    assert report.float_file_bytes and out.stat().st_size <= 0.35 * report.float_file_bytes
    assert report.metric == "accuracy" and report.metric_before - report.metric_after <= 0.01
    # evaluate on the .onnx (through open_model) scores what onnxruntime scores
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(None, {"input": x.numpy()})[0] for x, _ in held_out])
    by_ort = float((logits.argmax(1) == held_out.y.numpy()).mean())
    evaluated = evaluate(open_model(out).model, held_out).model.value
    assert evaluated == pytest.approx(by_ort, abs=0) and report.metric_after == pytest.approx(by_ort, abs=0)


@needs_ort
def test_bench_runs_the_onnx_beside_the_eager_model(models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, size = models["resnet-pruned"]
    out = tmp_path / "small.onnx"
    export(model, "onnx", out, input_shape=size)
    loaded = open_model(out)
    assert loaded.input_size == size  # recorded in the file
    report = bench(loaded.model, size, name="small.onnx", path=out, vs=model, batch_size=4, repeats=2, warmup=1, threads=1)
    # folded: each batch norm's scale and shift (2 per channel) become its conv's bias (1 per channel)
    assert report.model.params == report.vs.params - sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert report.model.macs <= report.vs.macs and report.model.file_bytes == out.stat().st_size
    assert all(v > 0 for v in report.model.latency_ms.values())


class DataDependent(nn.Module):
    """A layer whose control flow depends on its input's values: torch.export cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.mean() > 0 else -x


def test_an_unsupported_layer_is_named_and_nothing_is_written(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Sequential(nn.Identity(), DataDependent()), nn.Flatten(), nn.Linear(4 * 14 * 14, 3)).eval()
    out = tmp_path / "bad.pt2"
    with pytest.raises(UserError, match=r"cannot export layer 2\.1 \(DataDependent\): "):
        export(model, "pt2", out, input_shape=(1, 16, 16))
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxruntime_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install explainfix\[export\]"):
        export(nn.Conv2d(1, 1, 3), "onnx", tmp_path / "m.onnx", input_shape=(1, 8, 8))
    assert list(tmp_path.iterdir()) == []


# ---- the command line -------------------------------------------------------------------------
def _invoke(*args: str):  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from explainfix_cli.cli.app import app

    return CliRunner().invoke(app, list(args))


def _json(result) -> dict:  # type: ignore[no-untyped-def]
    import json

    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1, "stdout must be one JSON line"
    return json.loads(result.stdout)


@needs_ort
def test_cli_exports_then_evaluate_and_bench_run_the_file(tmp_path: Path) -> None:
    import onnxruntime as ort

    resnet, held_out = str(SAMPLES / "resnet.safetensors"), str(SAMPLES / "digits_train.npz")
    small = tmp_path / "small.onnx"
    report = _json(_invoke("export", resnet, "--format", "onnx", "--out", str(small), "--json"))
    assert report["format"] == "onnx" and report["opset"] == 18 and report["input_size"] == [1, 16, 16]
    assert report["max_abs_diff"] <= report["tolerance"] and report["file_bytes"] == small.stat().st_size
    again = _invoke("export", resnet, "--format", "onnx", "--out", str(small))
    assert again.exit_code == 2 and "already exists" in again.stderr
    scored = _json(_invoke("evaluate", str(small), "--data", held_out, "--json"))["model"]["value"]
    data = np.load(held_out)
    session = ort.InferenceSession(str(small), providers=["CPUExecutionProvider"])
    by_ort = float((session.run(None, {"input": data["x"]})[0].argmax(1) == data["y"]).mean())
    assert scored == by_ort
    bench_report = _json(_invoke("bench", str(small), "--vs", resnet, "--json", "--repeats", "2", "--warmup", "1", "--batch-size", "4", "--threads", "1"))
    assert bench_report["model"]["file_bytes"] == small.stat().st_size and bench_report["vs"]["folded_batch_norms"] > 0
    assert bench_report["model"]["macs"] == bench_report["vs"]["macs"] and bench_report["input_size"] == [1, 16, 16]
    refused = _invoke("prune", str(small), "--data", held_out)
    assert refused.exit_code == 2 and "is an ONNX model" in refused.stderr


BAD_ARCH = '''
import torch
from torch import nn


class DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.mean() > 0 else -x


def make():
    return nn.Sequential(nn.Conv2d(1, 4, 3), DataDependent(), nn.Flatten(), nn.Linear(4 * 14 * 14, 3))
'''


def test_cli_unsupported_layer_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    script = tmp_path / "bad_arch.py"
    script.write_text(BAD_ARCH)
    torch.manual_seed(0)
    state = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Identity(), nn.Flatten(), nn.Linear(4 * 14 * 14, 3)).state_dict()
    torch.save(state, tmp_path / "bad.pt")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _invoke("export", str(tmp_path / "bad.pt"), "--arch", f"{script}:make", "--format", "pt2", "--out", str(tmp_path / "bad.pt2"), "--input-size", "1,16,16")
    assert result.exit_code == 2, result.output
    assert "cannot export layer 1 (DataDependent)" in result.stderr and result.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before
