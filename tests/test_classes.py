"""Class-specific filters (docs/method.md §6): importance, channels needed and MI against hand-worked
cases; one-vs-rest sub-models that equal the full model's class score where nothing they need
was removed; the `classes` and `extract` commands."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SAMPLES, sample_model
from torch import nn
from typer.testing import CliRunner

from explainfix_cli.classes.analysis import (
    FEATURES,
    analyse_classes,
    channels_needed,
    mutual_information,
)
from explainfix_cli.classes.extract import extract
from explainfix_cli.cli.app import app
from explainfix_cli.errors import UserError
from explainfix_cli.io.checkpoints import load_model
from explainfix_cli.io.data import Dataset, load_data


def _tiny() -> nn.Module:
    """conv3x3 (centre taps 1 and 2: channel c is (c+1) * x) -> global mean -> Linear(2, 2)."""
    conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
    linear = nn.Linear(2, 2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1], conv.weight[1, 0, 1, 1] = 1.0, 2.0
        linear.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0]]))
        linear.bias.copy_(torch.tensor([0.25, -0.5]))
    return nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear).eval()


# constant 4x4 images of values 1..4: pooled features f[n] = (v, 2v)
TINY_X = torch.arange(1.0, 5.0).view(4, 1, 1, 1).expand(4, 1, 4, 4).contiguous()


def test_importance_by_hand() -> None:
    """Class k's importance of channel c is the mean over class-k samples of W[k,c] f[c]:
    class 0 (v = 1, 2): (1 * 1.5, -1 * 3) = (1.5, -3); class 1 (v = 3, 4): (0.5 * 3.5, 2 * 7) = (1.75, 14).
    Before pooling and a linear layer the conv output's importance is the same."""
    result, matrices = analyse_classes(_tiny(), Dataset(TINY_X, torch.tensor([0, 0, 1, 1]), batch_size=3))
    expected = np.array([[1.5, -3.0], [1.75, 14.0]])
    np.testing.assert_allclose(matrices[FEATURES], expected, rtol=1e-6)
    np.testing.assert_allclose(matrices["0"], expected, rtol=1e-6)
    features = next(layer for layer in result.layers if layer.name == FEATURES)
    assert features.channels_needed == [1, 2]  # class 1: 14 < 0.9 * 15.75, so both
    assert features.preferred_class == [1, 1]
    # the decomposed classifier: class 0 from channel 0 only, class 1 from both
    f = torch.stack([TINY_X[:, 0, 0, 0], 2 * TINY_X[:, 0, 0, 0]], dim=1)  # (4, 2)
    z = torch.stack([f[:, 0] + 0.25, 0.5 * f[:, 0] + 2 * f[:, 1] - 0.5], dim=1)
    d = result.decomposition
    assert d is not None and d.classifier == "3"
    assert d.metric_decomposed == pytest.approx(float((z.argmax(1) == torch.tensor([0, 0, 1, 1])).float().mean()))


def test_multilabel_importance_by_hand() -> None:
    """One indicator per label: label k's importance averages over its positives only."""
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    _, matrices = analyse_classes(_tiny(), Dataset(TINY_X, y, batch_size=4))
    v = TINY_X[:, 0, 0, 0]
    w = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    for k, rows in ((0, [0, 1, 3]), (1, [1, 2, 3])):
        f = torch.stack([v[rows], 2 * v[rows]], dim=1)  # (n, 2)
        np.testing.assert_allclose(matrices[FEATURES][k], (w[k] * f).mean(0).numpy(), rtol=1e-6)


def test_channels_needed_by_hand() -> None:
    importance = torch.tensor([[0.5, 0.3, 0.15, 0.05, -0.2], [0.0, -1.0, 0.0, 0.0, 0.0]])
    assert channels_needed(importance, 0.9).tolist() == [3, 0]  # 0.5 + 0.3 + 0.15 >= 0.9; nothing positive
    assert channels_needed(importance, 0.5).tolist() == [1, 0]
    assert channels_needed(importance, 1.0).tolist() == [4, 0]


def test_mutual_information_by_hand() -> None:
    values = torch.tensor([[0.0, 5.0, 0.0, 3.0], [0.0, 5.0, 1.0, 0.0], [1.0, 5.0, 0.0, 1.0], [1.0, 5.0, 1.0, 2.0]])
    indicators = torch.tensor([[1, 0, 1], [1, 0, 0], [0, 1, 0], [0, 1, 0]])
    mi = mutual_information(values, indicators, bins=2)  # (4 channels, 3 indicators)
    # against [1, 0, 0, 0], any split into two pairs: H(Y) - H(Y | bin) = H(1/4) - 1/2
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)) - 0.5
    assert mi[0].tolist() == pytest.approx([1.0, 1.0, h])  # tells the classes apart: 1 bit
    assert mi[1].tolist() == pytest.approx([0.0, 0.0, 0.0])  # constant: one bin, no information
    assert mi[2].tolist() == pytest.approx([0.0, 0.0, h])  # independent of the classes, not of the third
    # quantile edge 1.5: bins {1, 2} and {0, 3}, each holding one sample of each class
    assert mi[3].tolist() == pytest.approx([0.0, 0.0, h])


@pytest.fixture(scope="module")
def resnet_and_data() -> tuple[nn.Module, Dataset]:
    loaded = sample_model("resnet")
    return loaded.model, load_data(SAMPLES / "digits_val.npz", batch_size=64, batches=2)


def _margin(z: torch.Tensor, k: int) -> torch.Tensor:
    others = torch.cat([z[:, :k], z[:, k + 1 :]], dim=1)
    return z[:, k] - others.max(dim=1).values


def test_extract_equals_the_class_score_where_nothing_needed_is_removed(resnet_and_data, tmp_path: Path) -> None:
    """Half the features the classifier reads are made unused (their columns zeroed): they carry no
    importance, so `keep=1.0` removes them (and with them channels of the last residual stream),
    and the sub-model's output is the full model's margin for the class, also after writing and
    loading the file."""
    model, data = resnet_and_data
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.fc.weight[:, ::2] = 0
    k = 3
    sub, report = extract(model, data, k, keep=1.0, arch=sample_model("resnet").arch, out=tmp_path / "three.safetensors")
    assert report.channels_removed >= 32 and report.params_after < report.params_before
    assert sub.model.fc.in_features == 32
    x = data.x[:128]
    with torch.no_grad():
        expected = _margin(model(x), k)
        torch.testing.assert_close(sub(x)[:, 0], expected, atol=1e-5, rtol=0)
        loaded = load_model(tmp_path / "three.safetensors")
        torch.testing.assert_close(loaded(x)[:, 0], expected, atol=1e-5, rtol=0)
    assert report.data["full"].auc == report.data["extracted"].auc


def test_extract_max_drop_keeps_the_auc(resnet_and_data) -> None:
    """The greedy cut: the result's AUC on the data is within the allowed drop, the sub-model is
    smaller, and the last candidate that stayed is the one reported."""
    model, data = resnet_and_data
    _, report = extract(model, data, 7, max_drop=0.01)
    assert report.data["full"].auc is not None and report.data["extracted"].auc is not None
    assert report.data["full"].auc - report.data["extracted"].auc <= 0.01
    assert report.params_after < 0.5 * report.params_before
    # a candidate stays when its drop plus DROP_MARGIN_SE standard errors (DeLong) is within the limit
    stayed = [t for t in report.bisection if t["auc_drop_bound"] <= 0.01]
    assert stayed and stayed[-1]["keep"] == report.keep < 1.0
    assert all(t["auc_drop_bound"] >= t["auc_drop"] for t in report.bisection)
    assert any(t["auc_drop"] <= 0.01 < t["auc_drop_bound"] for t in report.bisection)  # the margin refused a cut the drop alone took


def test_extract_drop_margin_0_takes_the_drop_alone(resnet_and_data) -> None:
    # --drop-margin 0: every candidate's bound is its drop, and the cut is at least as large as
    # with the default margin, which refuses cuts whose drop is small only by chance
    model, data = resnet_and_data
    _, bare = extract(model, data, 7, max_drop=0.01, drop_margin=0.0)
    _, margined = extract(model, data, 7, max_drop=0.01)
    assert all(t["auc_drop_bound"] == t["auc_drop"] for t in bare.bisection)
    assert bare.drop_margin == 0.0 and margined.drop_margin == 4.0
    assert bare.params_after < margined.params_after
    with pytest.raises(UserError, match="drop_margin"):
        extract(model, data, 7, max_drop=0.01, drop_margin=-1.0)


def _invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, list(args))


def test_classes_cli_writes_only_its_files(tmp_path: Path) -> None:
    out = tmp_path / "classes"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["classes", str(SAMPLES / "resnet.safetensors"), "--data", str(SAMPLES / "digits_val.npz"), "--batches", "2", "--out", str(out)]
    refused = _invoke(*args)
    assert refused.exit_code == 2 and "--force" in refused.stderr  # a non-empty folder needs --force
    result = _invoke(*args, "--json", "--force")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["specificity_layer"] == FEATURES and 0 < payload["specificity"] < 0.47  # H(1/10) = 0.469 bits at most
    assert len(payload["layers"]) == 8 and payload["decomposition"]["classifier"] == "fc"
    assert sorted(p.name for p in out.iterdir()) == ["channels_needed.png", "class_channels.png", "classes.json", "notes.txt"]
    saved = json.loads((out / "classes.json").read_text())
    assert saved["layers"] == payload["layers"]
    before = {name: (out / name).read_bytes() for name in ("classes.json", "class_channels.png", "channels_needed.png")}
    again = _invoke(*args)
    assert again.exit_code == 2 and "--force" in again.stderr
    forced = _invoke(*args, "--force")
    assert forced.exit_code == 0, forced.output
    assert {name: (out / name).read_bytes() for name in before} == before  # same inputs, same bytes
    assert (out / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_extract_cli_loads_and_explains(tmp_path: Path) -> None:
    out = tmp_path / "seven.safetensors"
    data = ["--data", str(SAMPLES / "digits_val.npz"), "--batches", "2"]
    result = _invoke("extract", str(SAMPLES / "densenet.safetensors"), *data, "--class", "7", "--keep", "0.8", "--val", str(SAMPLES / "digits_val.npz"), "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["params_after"] < report["params_before"] and report["val"]["full"]["auc"] > 0.99
    model = load_model(out)
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 1)
    explained = _invoke("explain", str(out), "--out", str(tmp_path / "report"), "--no-figures", "--json")
    assert explained.exit_code == 0, explained.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["extract", "resnet.safetensors", "--class", "12", "--keep", "0.5"], "class 12 does not exist"),
        (["extract", "resnet.safetensors", "--class", "1", "--keep", "0.5", "--max-drop", "0.1"], "not both"),
        (["extract", "resnet.safetensors", "--class", "1", "--keep", "1.5"], "[0, 1]"),
        (["classes", "unet.safetensors", "--out", "x"], "segmentation masks"),
    ],
)
def test_bad_input(args: list[str], message: str, tmp_path: Path) -> None:
    data = SAMPLES / ("nuclei_val.npz" if "unet" in args[1] else "digits_val.npz")
    args = [args[0], str(SAMPLES / args[1]), *args[2:], "--data", str(data), "--batches", "1"]
    if args[0] == "extract":
        args += ["--out", str(tmp_path / "k.safetensors")]
    else:
        args[args.index("--out") + 1] = str(tmp_path / "x")
    result = _invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_class_gates_by_hand() -> None:
    """CSG: a sample of class k reaches the classifier as f * G[:, k]; the gate's step is gradient
    descent then each channel's gates divided by its largest, clamped to [0, 1]."""
    from explainfix_cli.classes.gates import ClassGates

    model = _tiny()
    gates = ClassGates.for_model(model, TINY_X[:1])
    assert gates.classifier == "3" and tuple(gates.gate.shape) == (2, 2)
    with torch.no_grad():
        gates.gate.copy_(torch.tensor([[0.5, 0.25], [-0.2, 0.1]]))
        y = torch.tensor([0, 1, 1, 0])
        with gates.applied(model, y):
            gated = model(TINY_X)
        f = torch.stack([TINY_X[:, 0, 0, 0], 2 * TINY_X[:, 0, 0, 0]], dim=1)  # (4, 2)
        expected = (f * gates.gate[:, y].T) @ model[3].weight.T + model[3].bias
        torch.testing.assert_close(gated, expected)
        torch.testing.assert_close(model(TINY_X), f @ model[3].weight.T + model[3].bias)  # no gate outside
    assert float(gates.penalty().detach()) == pytest.approx((0.5 + 0.25 + 0.2 + 0.1) / 2)
    gates.gate.grad = torch.tensor([[0.0, -0.5], [0.0, 0.0]])
    gates.step(lr=0.5)  # [[0.5, 0.5], [-0.2, 0.1]] -> rows / max -> clamped
    torch.testing.assert_close(gates.gate.detach(), torch.tensor([[1.0, 1.0], [0.0, 1.0]]))


def test_class_gated_step_keeps_the_architecture() -> None:
    """Standard steps leave the gate alone; gated steps move it; the model's tensors stay the same
    set and shapes (the gate lives outside it, nothing to fold)."""
    from explainfix_cli.classes.gates import ClassGates, class_gated_step, uses_gates

    assert [uses_gates(e) for e in range(6)] == [False, True, True, False, True, True]
    assert not uses_gates(1, warmup=2)
    model = _tiny()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    gates = ClassGates.for_model(model, TINY_X[:1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    y = torch.tensor([0, 0, 1, 1])
    class_gated_step(model, gates, TINY_X, y, optimizer, gated=False)
    assert torch.equal(gates.gate.detach(), torch.full((2, 2), 0.5))
    # the gated step by hand, from the model as the standard step left it: cross-entropy of the
    # gated logits plus sparsity * |G|_1 / K, one plain step of 0.5 on G, rows / max, clamped
    with torch.no_grad():
        f, weight, bias = model[:3](TINY_X), model[3].weight.clone(), model[3].bias.clone()
    gate = torch.full((2, 2), 0.5, requires_grad=True)
    loss = nn.functional.cross_entropy((f * gate[:, y].T) @ weight.T + bias, y) + 1.0 * gate.abs().sum() / 2
    (grad,) = torch.autograd.grad(loss, gate)
    stepped = (gate - 0.5 * grad).detach()
    expected = (stepped / stepped.amax(dim=1, keepdim=True)).clamp(0, 1)
    class_gated_step(model, gates, TINY_X, y, optimizer, gated=True, sparsity=1.0)
    torch.testing.assert_close(gates.gate.detach(), expected)
    assert float(expected.min()) < 0.9  # the L1 push closed a gate: the step is not a no-op
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
