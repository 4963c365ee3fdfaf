"""The command line (docs/cli.md "Commands" and "Bad input"), in process and as a real process.

The installed typer's CliRunner keeps stdout and stderr apart (`result.stdout`, `result.stderr`;
`result.output` is both interleaved), so every test can check that stdout holds only the JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner, Result

from explainfix_cli.cli.app import app
from explainfix_cli.io.checkpoints import load_model
from explainfix_cli.models import spatial_convs

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
PRUNE_FIELDS = {
    "params_before", "params_after", "spatial_kernels_before", "spatial_kernels_after", "zeroed_kernels",
    "channels_removed", "macs_before", "macs_after", "max_logit_change", "metric", "metric_before",
    "metric_after", "seconds", "out",
}  # fmt: skip
RESNET_ARCH = ["--arch", "explainfix_cli.zoo:resnet", "--arch-kwargs", '{"num_classes": 10, "in_channels": 1}']


def _sample(name: str) -> str:
    path = SAMPLES / name
    if not path.exists():
        pytest.fail(f"the committed sample {name} is missing (sample_models/make_samples.py makes it)")
    return str(path)


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def _json(result: Result) -> dict:
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n") and result.stdout.count("\n") == 1, "stdout must be one JSON line"
    payload = json.loads(result.stdout)
    assert isinstance(payload, dict)
    return payload


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def _data(args: list[str] | None = None) -> list[str]:
    return ["--data", _sample("digits_val.npz"), "--batches", "2", *(args or [])]


# ---- help and info ------------------------------------------------------------------------------
def test_help_lists_every_command_and_takes_h() -> None:
    import typer.main

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for args in (["--help"], ["-h"]):
        result = _invoke(*args)
        assert result.exit_code == 0
        listed = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("│ ") and len(line.split()) > 2}
        assert set(commands) <= listed, listed
    assert _invoke("prune", "-h").stdout == _invoke("prune", "--help").stdout


def test_version() -> None:
    from explainfix_cli import __version__

    result = _invoke("--version")
    assert result.exit_code == 0 and result.stdout == f"explainfix {__version__}\n"


def test_flags_show_no_value_in_help() -> None:
    text = _invoke("prune", "--help").stdout
    assert "--no-fix" in text and "<bool>" not in text


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["prune", "MODEL", "--data", "missing.npz"], "--data missing.npz does not exist"),
        (["prune", "MODEL", "--data", "DATA", "--image-size", "0"], "--image-size must be at least 1"),
        (["prune", "MODEL", "--data", "DATA", "--pct", "100"], "--pct must be in [0, 100)"),
        (["prune", "NOISE", "--data", "DATA"], "unrecognised model format"),
        (["explain", "MODEL", "--out", "DATA"], "is a file"),
        (["explain", "MODEL", "--out", "report", "--pct", "-1"], "--pct must be in [0, 100)"),
        (["prune", "MODEL", "--data", "DATA", "--mean", "0.5", "--std", "0.2"], "already preprocessed"),
        (["saliency", "MODEL", "--data", "DATA", "--mean", "0.5", "--out", "s.safetensors"], "--mean and --std go together"),
    ],
)
def test_argument_errors_answer_before_torch_is_imported(args: list[str], words: str, tmp_path: Path) -> None:
    noise = tmp_path / "noise.onnx"
    noise.write_bytes(bytes(range(9, 200)))
    argv = [{"MODEL": _sample("resnet.safetensors"), "DATA": _sample("digits_val.npz"), "NOISE": str(noise)}.get(a, a) for a in args]
    code = (
        "import sys\nfrom explainfix_cli.cli import main\n"
        f"sys.argv = ['explainfix', *{argv!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr
    assert words in proc.stderr and proc.stderr.count("\n") == 1


def test_help_and_no_torch_as_a_real_process() -> None:
    proc = subprocess.run([sys.executable, "-m", "explainfix_cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "prune" in proc.stdout and "Traceback" not in proc.stderr
    # --help answers at once: loading the command line imports none of the heavy libraries
    code = "import sys, explainfix_cli.cli; print(sorted({'torch', 'captum', 'matplotlib'} & set(sys.modules)))"
    check = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert check.stdout.strip() == "[]", check.stdout + check.stderr


def _independent_macs(model: nn.Module, shape: tuple[int, int, int]) -> int:
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output[0].numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    for h in handles:
        h.remove()
    return total


def test_info_json() -> None:
    path = _sample("resnet.safetensors")
    info = _json(_invoke("info", path, "--json", "--input-size", "1,16,16"))
    model = load_model(path)
    convs = spatial_convs(model)
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert info["spatial_kernels"] == sum(c.weight.shape[0] * c.weight.shape[1] for _, c in convs)
    assert info["spatial_layers"] == len(convs)
    assert info["zero_kernels"] == 0
    assert info["input_size"] == [1, 16, 16]
    assert info["macs"] == _independent_macs(model, (1, 16, 16))
    layers = {layer["name"]: layer for layer in info["layers"]}
    assert {name for name, layer in layers.items() if layer["spatial"]} == {name for name, _ in convs}
    first, conv = convs[0]
    assert layers[first]["weight_shape"] == list(conv.weight.shape)
    assert info["arch"]["factory"] == "explainfix_cli.zoo:resnet"
    # without --input-size the input the file records is used, and no MACs are invented for a bare state dict
    recorded = _json(_invoke("info", path, "--json"))
    assert (recorded["input_size"], recorded["macs"]) == ([1, 16, 16], info["macs"])
    assert _json(_invoke("info", _sample("resnet.pt"), *RESNET_ARCH, "--json"))["macs"] is None


def test_info_tables_go_to_stdout_as_a_real_process(tmp_path: Path) -> None:
    # `explainfix info m > info.txt` keeps the table; nothing else is said on stderr
    with open(tmp_path / "info.txt", "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "explainfix_cli", "info", _sample("resnet.pt"), *RESNET_ARCH, "--input-size", "1,16,16"],
            stdout=f, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "info.txt").read_text()
    assert "spatial kernels" in text and "8,208" in text and "layer1.conv1" in text
    assert proc.stderr == ""


def test_prune_summary_reads_before_and_after(tmp_path: Path) -> None:
    args = ["prune", _sample("resnet.safetensors"), *_data(), "--pct", "90"]
    result = _invoke(*args, "--out", str(tmp_path / "p.safetensors"))
    report = _json(_invoke(*args, "--out", str(tmp_path / "q.safetensors"), "--json"))
    assert result.exit_code == 0, result.output
    before, after = report["params_before"], report["params_after"]
    assert f"{before:,}" in result.stdout and f"{after:,}" in result.stdout
    assert f"{(after - before) / before:+.1%}" in result.stdout
    assert f"{report['metric_before']:.3f}" in result.stdout and str(report["metric_before"]) not in result.stdout
    assert "None" not in result.stdout and "{" not in result.stdout
    assert "reach the model's output" in result.stdout
    # accuracy falls far at 90 %: the way back is named on stderr
    assert "explainfix finetune" in result.stderr


# ---- prune and saliency -------------------------------------------------------------------------
def test_prune_json_reports_every_field(tmp_path: Path) -> None:
    out = tmp_path / "pruned.safetensors"
    report = _json(_invoke("prune", _sample("resnet.safetensors"), *_data(), "--pct", "60", "--out", str(out), "--json"))
    assert set(report) >= PRUNE_FIELDS
    assert report["out"] == str(out)
    assert out.is_file()
    assert _listing(tmp_path) == ["pruned.safetensors"]
    assert report["metric"] == "accuracy"
    assert 0 <= report["metric_after"] <= 1 and report["metric_before"] > 0.9
    assert report["params_after"] <= report["params_before"]
    assert report["zeroed_kernels"] == int(0.6 * report["spatial_kernels_before"])
    pruned = load_model(out)
    assert sum(p.numel() for p in pruned.parameters()) == report["params_after"]
    assert all(not c.weight.requires_grad for _, c in spatial_convs(pruned))


def test_prune_default_out_beside_the_input(tmp_path: Path) -> None:
    model = tmp_path / "mine.safetensors"
    shutil.copy(_sample("resnet.safetensors"), model)
    report = _json(_invoke("prune", str(model), *_data(["--batches", "1"]), "--json"))
    expected = tmp_path / "mine-pruned.safetensors"
    assert report["out"] == str(expected)
    assert expected.is_file()
    assert _listing(tmp_path) == ["mine-pruned.safetensors", "mine.safetensors"]


def test_prune_magnitude_without_data(tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    report = _json(_invoke(
        "prune", _sample("resnet.safetensors"), "--criterion", "magnitude", "--input-size", "1,16,16",
        "--out", str(out), "--json",
    ))  # fmt: skip
    assert report["criterion"] == "magnitude"
    assert report["metric"] is None and report["max_logit_change"] is None
    assert report["macs_before"] > 0
    assert out.is_file()


def test_saliency_then_prune_reuses_scores(tmp_path: Path) -> None:
    model = _sample("resnet.safetensors")
    scores = tmp_path / "scores.safetensors"
    payload = _json(_invoke("saliency", model, *_data(), "--out", str(scores), "--json", "--seed", "3"))
    from safetensors.torch import load_file

    tensors = load_file(str(scores))
    convs = spatial_convs(load_model(model))
    assert set(tensors) == {name for name, _ in convs}
    assert set(payload["layers"]) == set(tensors)
    for name, conv in convs:
        assert tuple(tensors[name].shape) == tuple(conv.weight.shape[:2])

    reused, fresh = tmp_path / "reused.safetensors", tmp_path / "fresh.safetensors"
    _json(_invoke("prune", model, *_data(), "--saliency", str(scores), "--out", str(reused), "--json", "--seed", "3"))
    _json(_invoke("prune", model, *_data(), "--out", str(fresh), "--json", "--seed", "3"))
    assert reused.read_bytes() == fresh.read_bytes()


# ---- bad input ----------------------------------------------------------------------------------
TINY_ARCH = """
from torch import nn


def make(num_classes=10):
    return nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
"""


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Inputs for the bad-input cases, in their own folder (outputs go elsewhere)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    files: dict[str, str] = {}

    def cut(name: str) -> str:
        data = Path(_sample(name)).read_bytes()
        path = root / f"cut_{name}"
        path.write_bytes(data[: len(data) // 2])
        return str(path)

    files["cut_safetensors"] = cut("resnet.safetensors")
    files["cut_pt"] = cut("resnet.pt")
    files["cut_npz"] = cut("digits_val.npz")
    (root / "notes.pt").write_text("these are my notes, not a model\n")
    files["text_pt"] = str(root / "notes.pt")
    (root / "table.csv").write_text("x,y\n1,2\n")
    files["csv"] = str(root / "table.csv")
    np.savez(root / "rgb.npz", x=np.zeros((4, 3, 16, 16), np.float32), y=np.arange(4))
    files["rgb"] = str(root / "rgb.npz")
    np.savez(root / "labels12.npz", x=np.zeros((4, 1, 16, 16), np.float32), y=np.array([0, 1, 12, 3]))
    files["labels12"] = str(root / "labels12.npz")
    script = root / "tiny_arch.py"
    script.write_text(TINY_ARCH)
    tiny = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    torch.save(tiny.state_dict(), root / "tiny.pt")
    files["tiny"] = str(root / "tiny.pt")
    files["tiny_arch"] = f"{script}:make"
    spatial = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 10)).eval()
    torch.export.save(torch.export.export(spatial, (torch.zeros(1, 1, 16, 16),)), str(root / "tiny.pt2"))
    files["pt2"] = str(root / "tiny.pt2")
    return files


def _bad_cases(f: dict[str, str]) -> dict[str, list[str]]:
    resnet = _sample("resnet.safetensors")
    resnet_pt = _sample("resnet.pt")
    data = _data(["--batches", "1"])
    return {
        # wrong path
        "missing model": ["prune", "no/such/model.safetensors", *data],
        "missing data": ["prune", resnet, "--data", "no_such_data.npz"],
        "missing saliency": ["prune", resnet, *data, "--saliency", "no_such_scores.safetensors"],
        # unreadable / truncated
        "truncated safetensors": ["prune", f["cut_safetensors"], *data],
        "truncated pt": ["prune", f["cut_pt"], *RESNET_ARCH, *data],
        "truncated data": ["prune", resnet, "--data", f["cut_npz"]],
        "truncated saliency": ["prune", resnet, *data, "--saliency", f["cut_safetensors"]],
        # wrong format
        "text file as model": ["prune", f["text_pt"], *RESNET_ARCH, *data],
        "text file as model, trusted": ["prune", f["text_pt"], "--trust-checkpoint", *data],
        "data file as model": ["prune", _sample("digits_val.npz"), *RESNET_ARCH, *data],
        "csv data": ["prune", resnet, "--data", f["csv"]],
        "scores of another model": ["prune", resnet, *data, "--saliency", _sample("vgg.safetensors")],
        # shape mismatch between model and data
        "3-channel data": ["prune", resnet, "--data", f["rgb"]],
        "masks for a classifier": ["prune", resnet, "--data", _sample("nuclei_val.npz"), "--batches", "1"],
        "multi-label of another width": ["prune", resnet, "--data", _sample("digits_multilabel_val.npz"), "--batches", "1"],
        "wrong --arch-kwargs": ["prune", resnet_pt, "--arch", "explainfix_cli.zoo:resnet", "--arch-kwargs", '{"num_classes": 5}', *data],
        "wrong --input-size": ["prune", resnet, "--criterion", "magnitude", "--input-size", "3,16,16"],
        # labels out of range
        "labels out of range": ["prune", resnet, "--data", f["labels12"]],
        # no spatial convolutions
        "no spatial convs": ["prune", f["tiny"], "--arch", f["tiny_arch"], *data],
        "no spatial convs, saliency": ["saliency", f["tiny"], "--arch", f["tiny_arch"], *data],
        # pct out of range
        "pct -1": ["prune", resnet, *data, "--pct", "-1"],
        "pct 100": ["prune", resnet, *data, "--pct", "100"],
        "pct 150": ["prune", resnet, *data, "--pct", "150"],
        # unknown --arch
        "unknown arch module": ["prune", resnet_pt, "--arch", "no_such_package.models:resnet", *data],
        "unknown arch factory": ["prune", resnet_pt, "--arch", "explainfix_cli.zoo:no_such_net", *data],
        "arch without colon": ["prune", resnet_pt, "--arch", "explainfix_cli.zoo.resnet", *data],
        "arch script missing": ["prune", resnet_pt, "--arch", "no_such_script.py:Net", *data],
        # bad --arch-kwargs
        "arch-kwargs not JSON": ["prune", resnet_pt, "--arch", "explainfix_cli.zoo:resnet", "--arch-kwargs", "{num_classes: 10}", *data],
        "arch-kwargs not an object": ["prune", resnet_pt, "--arch", "explainfix_cli.zoo:resnet", "--arch-kwargs", "[10]", *data],
        "arch-kwargs unknown keyword": ["prune", resnet_pt, "--arch", "explainfix_cli.zoo:resnet", "--arch-kwargs", '{"depth": 3}', *data],
        # pickle without trust, state dict without arch
        "pickle without trust": ["prune", _sample("vgg_module.pt"), *data],
        "state dict without arch": ["prune", resnet_pt, *data],
        # gradient criterion without data
        "gradient without data": ["prune", resnet],
        "saliency without data": ["saliency", resnet],
        # torch.export programs keep no conv modules to cut
        "pt2 prune": ["prune", f["pt2"], *data],
        # no GPU here
        "cuda": ["prune", resnet, *data, "--device", "cuda"],
        "cuda, saliency": ["saliency", resnet, *data, "--device", "cuda"],
        "unknown device": ["prune", resnet, *data, "--device", "tpu"],
    }


BAD_CASE_NAMES = [
    "missing model", "missing data", "missing saliency", "truncated safetensors", "truncated pt", "truncated data",
    "truncated saliency", "text file as model", "text file as model, trusted", "data file as model", "csv data",
    "scores of another model", "3-channel data", "masks for a classifier", "multi-label of another width",
    "wrong --arch-kwargs", "wrong --input-size", "labels out of range", "no spatial convs",
    "no spatial convs, saliency", "pct -1", "pct 100", "pct 150", "unknown arch module", "unknown arch factory",
    "arch without colon", "arch script missing", "pt2 prune", "arch-kwargs not JSON", "arch-kwargs not an object",
    "arch-kwargs unknown keyword", "pickle without trust", "state dict without arch", "gradient without data",
    "saliency without data", "cuda", "cuda, saliency", "unknown device",
]  # fmt: skip
EXPECTED_WORDS = {
    "missing model": ["does not exist"],
    "pct 150": ["--pct", "[0, 100)"],
    "unknown arch module": ["--arch", "no_such_package"],
    "arch-kwargs not JSON": ["--arch-kwargs", "JSON"],
    "pickle without trust": ["--trust-checkpoint"],
    "state dict without arch": ["--arch"],
    "gradient without data": ["--data", "--criterion magnitude"],
    "saliency without data": ["--data", "--criterion magnitude"],
    "cuda": ["--device cpu"],
    "labels out of range": ["12", "10 outputs"],
    "no spatial convs": ["spatial convolutions"],
    "3-channel data": ["(3, 16, 16)"],
    "wrong --arch-kwargs": ["fc.weight", "--arch-kwargs"],
    "truncated safetensors": ["cut_resnet.safetensors"],
    "truncated pt": ["cut_resnet.pt"],
}


def _assert_bad_input(result: Result, out_dir: Path, before: list[str]) -> None:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("explainfix: error: ")
    assert "Traceback" not in result.output
    assert _listing(out_dir) == before  # no output and no temporary file left behind


def test_every_bad_case_is_listed(bad_files: dict[str, str]) -> None:
    assert sorted(_bad_cases(bad_files)) == sorted(BAD_CASE_NAMES)


@pytest.mark.parametrize("case", BAD_CASE_NAMES)
def test_bad_input(case: str, bad_files: dict[str, str], tmp_path: Path) -> None:
    args = _bad_cases(bad_files)[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / ("scores.safetensors" if args[0] == "saliency" else "pruned.safetensors")
    result = _invoke(*args, "--out", str(out), "--json")
    _assert_bad_input(result, out_dir, [])
    for word in EXPECTED_WORDS.get(case, []):
        assert word in result.stderr, result.stderr


@pytest.mark.parametrize("command", ["prune", "saliency"])
@pytest.mark.parametrize("as_json", [True, False])
def test_existing_output_without_force(command: str, as_json: bool, tmp_path: Path) -> None:
    out = tmp_path / "already.safetensors"
    out.write_bytes(b"precious")
    args = [command, _sample("resnet.safetensors"), *_data(["--batches", "1"]), "--out", str(out)]
    result = _invoke(*args, *(["--json"] if as_json else []))
    _assert_bad_input(result, tmp_path, ["already.safetensors"])
    assert "--force" in result.stderr
    assert out.read_bytes() == b"precious"
    if command == "saliency":  # and --force replaces it
        _json(_invoke(*args, "--json", "--force"))
        assert out.read_bytes() != b"precious"
        assert _listing(tmp_path) == ["already.safetensors"]


def test_missing_output_folder(tmp_path: Path) -> None:
    result = _invoke("prune", _sample("resnet.safetensors"), *_data(), "--out", str(tmp_path / "no" / "p.safetensors"))
    _assert_bad_input(result, tmp_path, [])
    assert "does not exist" in result.stderr


def test_bad_input_as_a_real_process(tmp_path: Path) -> None:
    out = tmp_path / "p.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "explainfix_cli", "prune", _sample("vgg_module.pt"), *_data(), "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [proc.stderr.strip()]
    assert "--trust-checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert _listing(tmp_path) == []


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "explainfix_cli", "prune", _sample("resnet.pt"), "--pct", "150", "--debug"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "UserError" in proc.stderr


@pytest.mark.parametrize(
    "args",
    [["prune", "model.pt", "--granularity", "foo"], ["explain", "m.safetensors", "--out", "r", "--format", "jpg"], ["prune"], ["bogus"]],
)
def test_usage_errors_are_one_sentence_as_a_real_process(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "explainfix_cli", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("explainfix: error: ")


def test_prune_reports_the_criterion_of_a_saliency_file(tmp_path: Path) -> None:
    scores = tmp_path / "magnitude.safetensors"
    assert _invoke("saliency", _sample("resnet.safetensors"), "--criterion", "magnitude", "--out", str(scores)).exit_code == 0
    report = _json(_invoke("prune", _sample("resnet.safetensors"), "--saliency", str(scores), *_data(), "--out", str(tmp_path / "p.safetensors"), "--json"))
    assert report["criterion"] == "magnitude"
    assert load_model(tmp_path / "p.safetensors") is not None


def test_json_is_strict_undefined_numbers_are_null(tmp_path: Path) -> None:
    # one sample: every label has one kind only, so the mean AUC is undefined
    args = ["prune", _sample("resnet_multilabel.safetensors"), "--data", _sample("digits_multilabel_val.npz"), "--batch-size", "1", "--batches", "1"]
    result = _invoke(*args, "--out", str(tmp_path / "p.safetensors"), "--json")
    assert result.exit_code == 0, result.output

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in JSON")

    report = json.loads(result.stdout, parse_constant=refuse)
    assert report["metric"] == "auc" and report["metric_before"] is None and report["metric_after"] is None


# ---- image folders normalised the model's way ---------------------------------------------------
def test_image_folder_scores_what_the_npz_does(tmp_path: Path) -> None:
    """The bundled folder holds digits_val.npz's images 0-9 (ten each, named by index); with the
    model file's recorded normalisation it scores what those npz samples do, not 0.13."""
    root = Path(_sample("digits_images"))
    index = [int(f.stem) for c in sorted(p.name for p in root.iterdir()) for f in sorted((root / c).iterdir())]
    from explainfix_cli.io.checkpoints import open_model

    model = _sample("resnet.safetensors")
    with np.load(_sample("digits_val.npz")) as val, torch.no_grad():
        logits = open_model(model).model(torch.from_numpy(val["x"][index]))
        on_npz = float((logits.argmax(1) == torch.from_numpy(val["y"][index])).float().mean())
    out = tmp_path / "b.safetensors"
    on_folder = _json(_invoke("prune", model, "--data", str(root), "--pct", "30", "--out", str(out), "--json"))
    assert on_folder["metric_before"] == pytest.approx(on_npz) and on_npz == pytest.approx(0.99)
    assert _json(_invoke("evaluate", model, "--data", str(root), "--json"))["model"]["value"] == pytest.approx(on_npz)
    assert open_model(out).preprocessing == open_model(model).preprocessing  # carried through
    fixed = tmp_path / "fixed.safetensors"
    assert _invoke("fix", str(out), "--init", "keep", "--out", str(fixed)).exit_code == 0
    assert open_model(fixed).preprocessing == open_model(model).preprocessing  # and through fix
    digits = json.loads((SAMPLES / "metrics.json").read_text())["data"]["digits"]
    recorded = _json(_invoke("info", str(out), "--json"))["preprocessing"]
    assert recorded == {"mean": [digits["mean"]], "std": [digits["std"]], "channels": 1, "size": [16, 16]}
    raw = _json(_invoke("prune", model, "--data", str(root), "--mean", "0", "--std", "1", "--pct", "0", "--out", str(tmp_path / "c.safetensors"), "--json"))
    assert raw["metric_before"] < 0.3  # [0, 1] pixels: what the model was not trained on
    written = open_model(tmp_path / "c.safetensors").preprocessing
    assert written is not None and (written.mean, written.std, written.channels, written.size) == ((0.0,), (1.0,), 1, (16, 16))


def test_mean_and_std_refused_for_a_data_file(tmp_path: Path) -> None:
    result = _invoke("prune", _sample("resnet.safetensors"), *_data(["--mean", "0.5", "--std", "0.2"]), "--out", str(tmp_path / "o.safetensors"))
    assert result.exit_code == 2 and "already preprocessed" in result.stderr
    assert _listing(tmp_path) == []


def test_library_errors_name_parameters_and_the_command_line_names_flags(tmp_path: Path) -> None:
    from explainfix_cli.errors import UserError
    from explainfix_cli.pruning.pipeline import zero_least_salient

    with pytest.raises(UserError) as e:
        zero_least_salient(nn.Sequential(nn.Conv2d(1, 2, 3)), {}, 150)
    assert "--" not in str(e.value) and "`pct`" in str(e.value)
    result = _invoke("prune", _sample("resnet.safetensors"), *_data(), "--pct", "150", "--out", str(tmp_path / "p.safetensors"))
    assert result.exit_code == 2 and "--pct must be in [0, 100)" in result.stderr


# ---- output a person reads: rounded, undefined as such; Ctrl-C --------------------------------------
@pytest.fixture(scope="module")
def small_train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with np.load(_sample("digits_val.npz")) as d:
        path = tmp_path_factory.mktemp("data") / "small.npz"
        np.savez(path, x=d["x"][:96], y=d["y"][:96])
    return path


def test_finetune_rounds_for_people_keeps_json_exact_and_records_the_teacher(small_train: Path, tmp_path: Path) -> None:
    base = ["finetune", _sample("resnet.safetensors"), "--data", str(small_train), "--val", str(small_train), "--epochs", "1", "--teacher", _sample("resnet.safetensors")]
    exact = _json(_invoke(*base, "--out", str(tmp_path / "a.safetensors"), "--json"))
    table = _invoke(*base, "--out", str(tmp_path / "b.safetensors"))
    assert table.exit_code == 0, table.output
    row = next(line for line in table.stdout.splitlines() if "metric_after" in line)
    assert f" {exact['metric_after']:.4g} " in row, row  # rounded for people; --json has every digit
    assert not any(len(t) > 7 and t.replace(".", "", 1).isdigit() for t in table.stdout.split()), table.stdout
    from explainfix_cli.io.checkpoints import open_model

    step = open_model(tmp_path / "a.safetensors").history[-1]  # the model file's history names the teacher
    assert step["step"] == "finetune" and step["teacher"] == _sample("resnet.safetensors")
    report = _invoke("explain", str(tmp_path / "a.safetensors"), "--no-figures", "--out", str(tmp_path / "r"))
    assert report.exit_code == 0, report.output
    index = (tmp_path / "r" / "index.html").read_text()
    assert f"distilled from {_sample('resnet.safetensors')}" in index
    assert f"accuracy {exact['metric_before']:.3f} → {exact['metric_after']:.3f}" in index


def test_explain_says_an_all_zero_layer_has_no_share(tmp_path: Path) -> None:
    from explainfix_cli.io.checkpoints import open_model, save_model

    loaded = open_model(_sample("resnet.safetensors"))
    name, conv = spatial_convs(loaded.model)[1]
    with torch.no_grad():
        conv.weight.zero_()
    path = save_model(loaded.model, tmp_path / "zero.safetensors", arch=loaded.arch)
    table = _invoke("explain", str(path), "--no-figures", "--out", str(tmp_path / "r"))
    assert table.exit_code == 0, table.output
    row = next(line for line in table.stdout.splitlines() if f" {name} " in f" {line} ")
    assert "undefined (all kernels zero)" in row and "nan" not in table.stdout
    payload = _json(_invoke("explain", str(path), "--no-figures", "--out", str(tmp_path / "j"), "--json"))
    assert [layer["low_frequency_share"] is None for layer in payload["layers"]].count(True) == 1


def _interrupt(*args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("command", ["finetune", "explain"])
def test_ctrl_c_says_so_in_one_sentence_and_leaves_nothing(command: str, small_train: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if command == "finetune":
        from explainfix_cli.training import finetune

        monkeypatch.setattr(finetune, "batch_loss", _interrupt)  # inside the first training step
        out = tmp_path / "t.safetensors"
        args = ["finetune", _sample("resnet.safetensors"), "--data", str(small_train), "--val", str(small_train), "--epochs", "1", "--out", str(out)]
    else:
        from explainfix_cli.figures import spectra

        monkeypatch.setattr(spectra, "draw_all", _interrupt)  # while the figures are drawn into the staging folder
        out = tmp_path / "report"
        args = ["explain", _sample("resnet.safetensors"), *_data(), "--attributions", "0", "--out", str(out)]
    result = _invoke(*args)
    assert result.exit_code == 130, result.output
    assert result.stderr == "explainfix: interrupted; nothing was written.\n" and result.stdout == ""
    assert _listing(tmp_path) == []  # no output, no temporary file or folder
