"""`explainfix evaluate`: how well a model does on held-out data, alone or against another, with CI gates.

The metric follows the target kind (docs/method.md §1): accuracy with per-class accuracy and a
confusion matrix for class labels, ROC AUC per label for multi-label targets, Dice and IoU for
masks; plus the loss of that kind (`losses.loss_for`, the loss `finetune` minimises). The metric is `measure.metric`, the same
number `prune` reports as `metric_before` / `metric_after`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from explainfix_cli.errors import UserError, check_range
from explainfix_cli.evaluation.gates import Gate, at_least, at_most
from explainfix_cli.evaluation.measure import auc_per_label, metric, outputs
from explainfix_cli.io.data import Dataset
from explainfix_cli.numbers import finite
from explainfix_cli.training.losses import loss_for


@dataclass
class Evaluation:
    """One model on one data set."""

    model: str
    samples: int
    target: str  # labels | multilabel | mask
    metric: str  # accuracy | auc | dice
    value: float | None  # None only when no label of a multi-label target has both classes
    loss_name: str
    loss: float | None  # None when the outputs are not finite
    classes: list[str] | None = None  # class names of an image folder
    per_class_accuracy: list[float | None] | None = None  # recall of each class; None when absent from the data
    confusion_matrix: list[list[int]] | None = None  # [true class][predicted class]
    auc_per_label: list[float | None] | None = None
    dice: float | None = None
    iou: float | None = None


@dataclass
class EvaluationReport:
    """`evaluate --json`: the model, the one it is compared with, the drop, and the gates' verdicts."""

    model: Evaluation
    vs: Evaluation | None = None
    drop: float | None = None  # vs.value - model.value: positive when the model does worse
    gates: list[Gate] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": asdict(self.model),
            "vs": asdict(self.vs) if self.vs else None,
            "drop": self.drop,
            "gates": [g.to_json() for g in self.gates],
            "passed": self.passed,
        }




def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes, classes) counts, rows the true class, columns the predicted one."""
    return torch.bincount(labels * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def evaluate_model(model: nn.Module, data: Dataset, name: str = "model", device: str = "cpu") -> Evaluation:
    """Metric, loss and the per-class / per-label / per-pixel breakdown of one model on `data`."""
    out = outputs(model, data, device)  # (N, K) or (N, K, H, W)
    y = data.y[: len(out)]
    data.targets(out, y)  # the data must fit the model's outputs (shapes, label range)
    kind = data.target_kind
    loss = loss_for(kind)
    value = metric(data, out)
    result = Evaluation(
        model=name, samples=len(out), target=kind, metric=data.metric_name, value=finite(value),
        loss_name=loss.name, loss=finite(float(loss(out, y))), classes=data.classes,
    )
    if kind == "labels":
        matrix = confusion_matrix(y, out.argmax(dim=1), out.shape[1])  # (K, K)
        seen = matrix.sum(dim=1)
        result.confusion_matrix = matrix.tolist()
        result.per_class_accuracy = [int(matrix[k, k]) / int(seen[k]) if seen[k] else None for k in range(len(seen))]
    elif kind == "multilabel":
        result.auc_per_label = auc_per_label(y, out)
    else:
        pred, truth = out > 0, y > 0.5
        overlap, union = (pred & truth).sum(), (pred | truth).sum()
        result.dice = value
        result.iou = float(overlap / union.clamp_min(1))
    return result


def check_gate_limits(min_metric: float | None, max_drop: float | None) -> None:
    """Limits a gate can meet: accuracy, AUC and Dice all lie in [0, 1], so a drop lies in
    [-1, 1] (a negative `max_drop` asks the model to beat the other by that much). NaN is none."""
    check_range("min_metric", min_metric, 0, 1)
    check_range("max_drop", max_drop, -1, 1)


def evaluate(
    model: nn.Module,
    data: Dataset,
    *,
    name: str = "model",
    vs: nn.Module | None = None,
    vs_name: str = "other",
    min_metric: float | None = None,
    max_drop: float | None = None,
    device: str = "cpu",
) -> EvaluationReport:
    """Evaluate `model` (and `vs`, the model it is compared with) on `data`, then apply the gates:
    `min_metric` (the model's metric at least this) and `max_drop` (the model's metric at most this
    far below `vs`'s)."""
    if max_drop is not None and vs is None:
        raise UserError("a maximum drop is measured against another model; give the model to compare with.")
    check_gate_limits(min_metric, max_drop)
    report = EvaluationReport(evaluate_model(model, data, name, device))
    what = f"the {report.model.metric} of {name}"
    if vs is not None:
        report.vs = evaluate_model(vs, data, vs_name, device)
        if report.model.value is not None and report.vs.value is not None:
            report.drop = report.vs.value - report.model.value
    if min_metric is not None:
        report.gates.append(at_least("min_metric", what, report.model.value, min_metric))
    if max_drop is not None:
        report.gates.append(at_most("max_drop", f"the {report.model.metric} drop of {name} against {vs_name}", report.drop, max_drop))
    return report
