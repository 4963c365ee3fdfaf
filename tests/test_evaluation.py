"""`evaluate` on the sample models: every number against scikit-learn, and the CI gates' exit codes."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import SAMPLES, sample_data, sample_model
from pytest import approx
from sklearn import metrics as sk
from typer.testing import CliRunner, Result

from explainfix_cli.cli.app import app
from explainfix_cli.evaluation.scores import confusion_matrix, evaluate, evaluate_model

pytestmark = pytest.mark.usefixtures("keep_global_rng")


def _logits(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The sample's outputs on its data, computed here in one plain forward pass."""
    data = sample_data(name)
    with torch.no_grad():
        return sample_model(name).model.eval()(data.x), data.y


def test_confusion_matrix_by_hand() -> None:
    labels, predicted = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 0, 2])
    assert confusion_matrix(labels, predicted, 3).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_labels_against_sklearn() -> None:
    result = evaluate_model(sample_model("mobilenet").model, sample_data("mobilenet"), "mobilenet")
    out, y = _logits("mobilenet")
    pred = out.argmax(dim=1).numpy()
    assert result.metric == "accuracy" and result.samples == len(y) == 360
    assert result.value == approx(sk.accuracy_score(y.numpy(), pred), abs=1e-6)
    assert result.confusion_matrix == sk.confusion_matrix(y.numpy(), pred, labels=list(range(10))).tolist()
    assert result.per_class_accuracy == approx(list(sk.recall_score(y.numpy(), pred, average=None)))
    assert result.loss_name == "cross_entropy"
    assert result.loss == approx(sk.log_loss(y.numpy(), out.double().softmax(dim=1).numpy(), labels=list(range(10))), rel=1e-4)
    assert result.value < 1  # the MobileNet sample misclassifies a few digits, so the matrix is not diagonal
    assert sum(map(sum, result.confusion_matrix)) == 360


def test_multilabel_auc_per_label_against_sklearn() -> None:
    result = evaluate_model(sample_model("resnet_multilabel").model, sample_data("resnet_multilabel"))
    out, y = _logits("resnet_multilabel")
    expected = [sk.roc_auc_score(y[:, k].numpy(), out[:, k].numpy()) for k in range(4)]
    assert result.metric == "auc" and result.loss_name == "bce"
    assert result.auc_per_label == approx(expected, abs=1e-9)
    assert result.value == approx(sum(expected) / 4, abs=1e-9)
    assert result.loss == approx(sk.log_loss(y.flatten().numpy(), out.sigmoid().flatten().double().numpy()), rel=1e-4)


def test_masks_dice_and_iou_against_sklearn() -> None:
    result = evaluate_model(sample_model("unet").model, sample_data("unet"))
    out, y = _logits("unet")
    pred, truth = (out > 0).flatten().numpy(), (y > 0.5).flatten().numpy()
    assert result.metric == "dice" and result.loss_name == "bce_dice"
    assert result.dice == result.value == approx(sk.f1_score(truth, pred), abs=1e-5)
    assert result.iou == approx(sk.jaccard_score(truth, pred), abs=1e-6)
    assert result.iou < result.dice  # IoU = d / (2 - d) for the same overlap


def test_drop_and_gates_in_the_library() -> None:
    data = sample_data("mobilenet")
    report = evaluate(sample_model("mobilenet").model, data, name="m", vs=sample_model("resnet").model, vs_name="r", min_metric=0.9, max_drop=0.001)
    assert report.vs is not None and report.vs.value is not None and report.model.value is not None
    assert report.drop == approx(report.vs.value - report.model.value) and report.drop == approx(5 / 360, abs=1e-6)
    assert [g.passed for g in report.gates] == [True, False] and not report.passed


# ---- the command line: exit codes a CI job can branch on ----------------------------------------
def _evaluate(*args: str) -> Result:
    return CliRunner().invoke(app, ["evaluate", str(SAMPLES / "mobilenet.safetensors"), "--data", str(SAMPLES / "digits_val.npz"), *args])


@pytest.mark.parametrize(
    ("args", "code", "verdicts"),
    [
        (["--min-metric", "0.95"], 0, [True]),  # MobileNet sample: 0.9806
        (["--min-metric", "0.99"], 1, [False]),
        (["--vs", str(SAMPLES / "resnet.safetensors"), "--max-drop", "0.02"], 0, [True]),  # drop 0.0139
        (["--vs", str(SAMPLES / "resnet.safetensors"), "--max-drop", "0.01", "--min-metric", "0.5"], 1, [True, False]),
    ],
)
def test_gates_exit_codes_and_json(args: list[str], code: int, verdicts: list[bool]) -> None:
    result = _evaluate(*args, "--json")
    assert result.exit_code == code, result.output
    payload = json.loads(result.stdout)  # the object is printed whether or not a gate failed
    assert [g["passed"] for g in payload["gates"]] == verdicts and payload["passed"] is all(verdicts)
    # one verdict line per gate, passed ones too (a CI log shows every verdict), each once
    lines = result.stderr.splitlines()
    assert [line.split(":")[1].split()[-1] for line in lines] == ["passed" if v else "failed" for v in verdicts], lines
    assert all(line.startswith(f"explainfix: gate {g['name']} ") for line, g in zip(lines, payload["gates"], strict=True))
    assert [g["sentence"] in line for line, g in zip(lines, payload["gates"], strict=True)] == [True] * len(verdicts)
    table = _evaluate(*args)  # the same verdicts under the table, not twice
    assert table.exit_code == code and table.stderr == result.stderr, table.stderr


def test_table_for_people_and_usage_errors() -> None:
    result = _evaluate("--vs", str(SAMPLES / "resnet.safetensors"))
    assert result.exit_code == 0, result.output
    assert "accuracy of class 9" in result.stdout and "confusion matrix" in result.stdout
    bad = _evaluate("--max-drop", "0.01")
    assert bad.exit_code == 2 and "--vs" in bad.stderr and bad.stdout == ""
    nodata = CliRunner().invoke(app, ["evaluate", str(SAMPLES / "mobilenet.safetensors")])
    assert nodata.exit_code == 2 and "--data" in nodata.stderr
    # a limit no metric can meet is a mistake in the command, not a failed gate: exit 2, not 1
    for args, flag in ((["--min-metric", "1.5"], "--min-metric"), (["--min-metric", "nan"], "--min-metric"),
                       (["--vs", str(SAMPLES / "resnet.safetensors"), "--max-drop", "-2"], "--max-drop")):  # fmt: skip
        impossible = _evaluate(*args, "--json")
        assert impossible.exit_code == 2 and impossible.stdout == "", impossible.output
        assert impossible.stderr.count("\n") == 1 and f"{flag} must be " in impossible.stderr and "in [" in impossible.stderr
