"""docs/method.md §6: which channels serve which class.

- **Class importance** (Badola et al., *Decomposing the Deep*): for a watched tensor `a` (a spatial
  conv's output, or the classifier's input) and class `k`, over the samples of class `k`, the mean
  of `t[c] = Σ_(h,w) a[c,h,w] · ∂z_k/∂a[c,h,w]`. It is the first-order change of the class's
  output `z_k` if channel `c` were zeroed there; at the input of the final linear layer it is
  exactly `W[k,c] · f[c]`, the channel's share of the logit (bias aside).
- **Channels needed** for class `k`: the fewest channels whose positive importances reach a share
  (90 %) of the class's total positive importance. The **decomposed classifier** computes each
  class's logit from its needed classifier inputs only, `z'_k = b_k + Σ_(c ∈ S_k) W[k,c] f[c]`.
- **Specificity** (Liang et al., *Class-Specific Gates*): per channel, the mutual information in
  bits between its spatially averaged activation, discretised into equal-count (quantile) bins
  over the data, and each class indicator `1[y = k]`; a layer's score is the mean over channels
  of the max over classes. Plug-in estimate: it is biased upwards by about
  `(bins - 1) / (2 N ln 2)` bits for N samples (0.014 bits for 8 bins and 360 samples).

Multi-label targets (N, K) give one indicator per label; the class's samples are its positives.
One forward and one backward pass per minibatch for class labels (a sample's gradient is that of
its own class's logit), one backward per label for multi-label targets.

Also here: `extract`, a one-vs-rest sub-model for one class (Avranas & Kountouris, *Coded
ResNeXt*) cut with the channel-removal engine of `channels.py`; and `ClassGates` with
`class_gated_step`, the class-specific gate training of Liang et al., for `finetune`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from explainfix_cli.errors import UserError
from explainfix_cli.io.data import Dataset
from explainfix_cli.models import model_output, require_spatial_convs
from explainfix_cli.numbers import finite

Side = Literal["input", "output"]
FEATURES = "classifier input"


@dataclass(frozen=True)
class Probe:
    """A tensor the gradient pass watches: a module's output or its (first) input."""

    name: str
    module: nn.Module
    side: Side


@dataclass
class ProbeResult:
    """What one pass measured at one probe, for J scores (classes, or one target score)."""

    signed: torch.Tensor  # (J, C) per score j, the sum over its samples of t[n, c]
    magnitude: torch.Tensor  # (J, C) per score j, the sum over its samples of |t[n, c]|
    pooled: torch.Tensor | None  # (N, C) spatially averaged activation, if asked for
    centre: torch.Tensor | None = None  # (C,) with `centred`, the mean the activation was measured from


@dataclass
class GradientPass:
    """`gradient_times_activation`'s result: per probe, and how many samples each score had."""

    probes: dict[str, ProbeResult]
    counts: torch.Tensor  # (J,) samples per score
    outputs: torch.Tensor  # (N, K) the model's outputs

    def mean(self, name: str, magnitude: bool = False) -> torch.Tensor:
        """(J, C) the per-sample mean (of |t| with `magnitude`) over each score's samples."""
        r = self.probes[name]
        return (r.magnitude if magnitude else r.signed) / self.counts.clamp_min(1)[:, None]


def _channels_last(module: nn.Module, side: Side) -> bool:
    """A linear layer's input has its features in the last dimension; everything else in dim 1."""
    return isinstance(module, nn.Linear) and side == "input"


def _per_channel(module: nn.Module, side: Side, t: torch.Tensor, mean: bool = False) -> torch.Tensor:
    """(N, C, ...) or (N, ..., F) -> (N, C): summed (or averaged) over every dimension but samples
    and channels."""
    reduce = torch.mean if mean else torch.sum
    if _channels_last(module, side):
        return reduce(t.flatten(1, -2), dim=1) if t.dim() > 2 else t
    return reduce(t.flatten(2), dim=2) if t.dim() > 2 else t


def gradient_times_activation(
    model: nn.Module,
    data: Dataset,
    probes: list[Probe],
    scores: Callable[[torch.Tensor], torch.Tensor],
    membership: Callable[[torch.Tensor], torch.Tensor],
    disjoint: bool,
    pooled: set[str] | None = None,
    centred: bool = False,
    weights: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: str = "cpu",
) -> GradientPass:
    """Per probe and score j, sums over score j's samples of `t[n, c] = Σ a[n,c,...] ∂s_j[n]/∂a[n,c,...]`.

    `scores(out)` maps the model's outputs to (N, J) scores, `membership(y)` says which samples
    belong to which score (N, J). With `disjoint` (at most one score per sample, as for class
    labels) one backward pass serves every score; otherwise one per score. Each probe watches its
    own copy of the tensor, so a tensor read by two layers gives each its own gradient. With
    `centred`, `a` is measured from its channel's mean over the data and over space, `ā`:
    `(a - ā) · ∂s/∂a`, the first-order change of the score when the channel is replaced by its
    mean. It takes no pass of its own: `Σ (a - ā) g = Σ a g - ā Σ g`, so each sample's two sums
    are kept until `ā` is known. With `weights(scores)` (N, J), each sample's `t` counts with that
    weight in the sums (the counts stay plain sample counts). Batch norms use their running
    statistics (eval mode), so samples do not interact.
    """
    model.eval()
    pooled = pooled or set()
    captured: dict[str, torch.Tensor] = {}

    def watch(p: Probe) -> Callable[..., Any]:
        if p.side == "output":
            def out_hook(_m: nn.Module, _inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
                captured[p.name] = out.clone()  # a node of its own: its gradient is this probe's only
                return captured[p.name]

            return p.module.register_forward_hook(out_hook)

        def in_hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            captured[p.name] = inputs[0].clone()
            return (captured[p.name], *inputs[1:])

        return p.module.register_forward_pre_hook(in_hook)

    keep_pooled = {p.name for p in probes if p.name in pooled or centred}
    pooled_parts: dict[str, list[torch.Tensor]] = {name: [] for name in keep_pooled}
    # per probe and pass: (rows of the scores, (N, J') weights, (N, C) Σ a g, (N, C) Σ g or None)
    parts: dict[str, list[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor | None]]] = {p.name: [] for p in probes}
    counts: torch.Tensor | None = None
    outs = []
    n_scores = 0
    hooks = [watch(p) for p in probes]
    try:
        with torch.enable_grad():
            for x, y in data:
                x = x.to(device).requires_grad_(True)  # activations need a gradient even when every weight is fixed
                out = model_output(model, x)
                s, member = scores(out), membership(y.to(device)).to(out.dtype)  # (N, J), (N, J)
                n_scores = s.shape[1]
                weighted = member if weights is None else member * weights(s.detach())  # (N, J)
                outs.append(out.detach().cpu())
                counts = member.sum(0).cpu() if counts is None else counts + member.sum(0).cpu()
                tensors = [captured[p.name] for p in probes]
                passes = [(s * member).sum()] if disjoint else [(s[:, j] * member[:, j]).sum() for j in range(s.shape[1])]
                for j, objective in enumerate(passes):
                    grads = torch.autograd.grad(objective, tensors, retain_graph=j < len(passes) - 1, allow_unused=True)
                    w = (weighted if disjoint else weighted[:, j : j + 1]).double().cpu()  # (N, J) or (N, 1)
                    rows = slice(None) if disjoint else slice(j, j + 1)
                    for p, a, g in zip(probes, tensors, grads, strict=True):
                        if g is None:
                            width = a.shape[-1] if _channels_last(p.module, p.side) else a.shape[1]
                            t, q = torch.zeros(len(a), width, dtype=torch.float64), None
                        else:
                            t = _per_channel(p.module, p.side, a.detach() * g).double().cpu()
                            q = _per_channel(p.module, p.side, g).double().cpu() if centred else None
                        parts[p.name].append((rows, w, t, q))
                for p in probes:
                    if p.name in pooled_parts:
                        pooled_parts[p.name].append(_per_channel(p.module, p.side, captured[p.name].detach(), mean=True).cpu())
                captured.clear()
    finally:
        for h in hooks:
            h.remove()
    assert counts is not None
    sums: dict[str, ProbeResult] = {}
    for p in probes:
        every = torch.cat(pooled_parts[p.name]).double() if p.name in pooled_parts else None  # (N, C)
        centre = every.mean(dim=0) if centred and every is not None else None  # (C,)
        width = parts[p.name][0][2].shape[1]
        result = ProbeResult(
            torch.zeros(n_scores, width, dtype=torch.float64),
            torch.zeros(n_scores, width, dtype=torch.float64),
            every if p.name in pooled else None,
            centre,
        )
        for rows, w, t, q in parts[p.name]:
            if centre is not None and q is not None:
                t = t - centre * q
            result.signed[rows] += w.T @ t
            result.magnitude[rows] += w.T @ t.abs()
        sums[p.name] = result
    return GradientPass(sums, counts.double(), torch.cat(outs))


def mutual_information(values: torch.Tensor, indicators: torch.Tensor, bins: int = 8) -> torch.Tensor:
    """(C, K) mutual information in bits between each column of `values` (N, C), discretised into
    `bins` equal-count bins over the N samples, and each 0/1 column of `indicators` (N, K).

    Bin edges are the inner quantiles of each column; a value goes to the bin of the edges it
    exceeds, so tied values share a bin (a constant channel has one bin and no information).
    """
    values, indicators = values.double(), indicators.double()
    n = len(values)
    qs = torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1]
    edges = torch.quantile(values, qs, dim=0)  # (bins - 1, C)
    index = (values[:, None, :] > edges[None]).sum(dim=1)  # (N, C) bin of each value
    onehot = torch.nn.functional.one_hot(index, bins).double()  # (N, C, bins)
    p_bin = onehot.sum(0) / n  # (C, bins)
    p_pos = indicators.mean(0)  # (K,)
    joint_pos = torch.einsum("ncb,nk->cbk", onehot, indicators) / n  # (C, bins, K)
    joint_neg = p_bin[..., None] - joint_pos  # (C, bins, K)
    mi = torch.zeros(values.shape[1], indicators.shape[1], dtype=torch.float64)
    for joint, marginal in ((joint_pos, p_pos), (joint_neg, 1 - p_pos)):
        expected = p_bin[..., None] * marginal  # (C, bins, K)
        terms = torch.where(joint > 0, joint * torch.log2(joint / expected.clamp_min(1e-300)), torch.zeros_like(joint))
        mi += terms.sum(dim=1)
    return mi.clamp_min(0)


def channels_needed(importance: torch.Tensor, share: float = 0.9) -> torch.Tensor:
    """(K,) per class (row of `importance`, (K, C)), the fewest channels whose positive importances
    reach `share` of the row's total positive importance (0 when nothing is positive)."""
    positive = importance.clamp_min(0).double()  # (K, C)
    ranked = positive.sort(dim=1, descending=True).values.cumsum(dim=1)  # (K, C)
    total = ranked[:, -1:]  # (K, 1)
    # a relative tolerance: float32 importances summed in another order must still reach a share
    reached = ranked >= share * total * (1 - 1e-6)
    needed = reached.double().argmax(dim=1) + 1
    return torch.where(total[:, 0] > 0, needed, torch.zeros_like(needed))


def needed_mask(importance: torch.Tensor, needed: torch.Tensor) -> torch.Tensor:
    """(K, C) True at each class's `needed[k]` most important channels (ties: lower index first)."""
    order = torch.sort(importance.double(), dim=1, descending=True, stable=True).indices  # (K, C)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(importance.shape[1]).expand_as(order).contiguous())
    return ranks < needed[:, None]


def class_membership(data: Dataset, classes: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], bool]:
    """Which samples belong to which class: one-hot labels (disjoint) or multi-label indicators."""
    if data.target_kind == "labels":
        if int(data.y.max()) >= classes:
            raise UserError(f"the data has class label {int(data.y.max())} but the model has only {classes} outputs.")
        return (lambda y: torch.nn.functional.one_hot(y, classes)), True
    if data.target_kind == "multilabel":
        if data.y.shape[1] != classes:
            raise UserError(f"the data has {data.y.shape[1]} labels per sample but the model has {classes} outputs.")
        return (lambda y: (y > 0.5).long()), False
    raise UserError("class-specific analysis needs class labels (N,) or multi-label targets (N, K), not segmentation masks.")


def find_classifier(model: nn.Module, example: torch.Tensor) -> tuple[str, nn.Linear] | None:
    """The linear layer whose output is the model's output, if there is one (it must read (N, F))."""
    called: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def hook(m: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        called.append((m, inputs[0], out))

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            out = model_output(model, example)
    finally:
        for h in hooks:
            h.remove()
    if not called or called[-1][2] is not out or called[-1][1].dim() != 2:
        return None
    names = {m: n for n, m in model.named_modules()}
    module = called[-1][0]
    assert isinstance(module, nn.Linear)
    return names[module], module


@dataclass
class LayerClasses:
    """One watched layer: class-by-channel importance, channels needed, specificity."""

    name: str  # a spatial conv's module name, or "classifier input"
    channels: int
    importance: list[list[float]]  # (K, C) mean class importance
    channels_needed: list[int]  # (K,) for the share of positive importance
    preferred_class: list[int]  # (C,) argmax over classes of the importance
    mutual_information: list[float]  # (C,) max over classes of the MI, bits
    specificity: float  # mean over channels of `mutual_information`


@dataclass
class Decomposition:
    """Badola's decomposed classifier at the final linear layer's input."""

    classifier: str
    metric: str
    metric_full: float | None
    metric_decomposed: float | None


@dataclass
class ClassesResult:
    """`classes`: per watched layer the analysis, the decomposition, and the files written."""

    classes: int
    samples: int
    samples_per_class: list[int]
    target_kind: str
    share: float
    bins: int
    specificity: float  # of the classifier input when there is one, else of the last spatial layer
    specificity_layer: str
    decomposition: Decomposition | None
    layers: list[LayerClasses]
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _round(t: torch.Tensor) -> Any:
    """Floats as JSON numbers that repeat across runs (no NaN: the inputs are finite)."""
    return np.round(t.double().numpy(), 10).tolist()


def analyse_classes(
    model: nn.Module, data: Dataset, *, share: float = 0.9, bins: int = 8, device: str = "cpu"
) -> tuple[ClassesResult, dict[str, np.ndarray]]:
    """docs/method.md §6 post hoc: class importance of every spatial layer's output channels and of the
    classifier's input features, channels needed per class, the decomposed classifier's metric,
    and the MI specificity score. Returns the result and the matrices for the figures."""
    start = time.perf_counter()
    if not 0 < share <= 1:
        raise UserError(f"the share of importance to keep must be in (0, 1], not {share}.")
    if bins < 2:
        raise UserError(f"mutual information needs at least 2 bins, not {bins}.")
    if data.target_kind == "mask":
        class_membership(data, 0)  # says that masks are not classes
    convs = require_spatial_convs(model)
    model.eval().to(device)
    example = data.x[:1].to(device)
    with torch.no_grad():
        out = model_output(model, example)
    classes = out.shape[1] if out.dim() == 2 else 0
    if classes < 2:
        raise UserError("class-specific analysis needs a model with one output per class (N, K), K >= 2.")
    membership, disjoint = class_membership(data, classes)
    classifier = find_classifier(model, example)
    probes = [Probe(name, m, "output") for name, m in convs]
    if classifier is not None:
        probes.append(Probe(FEATURES, classifier[1], "input"))
    measured = gradient_times_activation(
        model, data, probes, lambda out: out, membership, disjoint, pooled={p.name for p in probes}, device=device
    )
    indicators = torch.cat([membership(y) for _, y in data]).double()  # (N, K)
    layers, matrices = [], {}
    for p in probes:
        importance = measured.mean(p.name)  # (K, C)
        mi = mutual_information(measured.probes[p.name].pooled, indicators, bins).amax(dim=1)  # (C,)
        matrices[p.name] = importance.numpy()
        layers.append(
            LayerClasses(
                name=p.name,
                channels=importance.shape[1],
                importance=_round(importance),
                channels_needed=channels_needed(importance, share).tolist(),
                preferred_class=importance.argmax(dim=0).tolist(),
                mutual_information=_round(mi),
                specificity=round(float(mi.mean()), 10),
            )
        )
    decomposition = None
    if classifier is not None:
        decomposition = _decompose(classifier, measured, data, share)
    last = layers[-1]
    result = ClassesResult(
        classes=classes,
        samples=len(indicators),
        samples_per_class=measured.counts.long().tolist(),
        target_kind=data.target_kind,
        share=share,
        bins=bins,
        specificity=last.specificity,
        specificity_layer=last.name,
        decomposition=decomposition,
        layers=layers,
    )
    result.seconds = round(time.perf_counter() - start, 3)
    return result, matrices


def _decompose(classifier: tuple[str, nn.Linear], measured: GradientPass, data: Dataset, share: float) -> Decomposition:
    """Each class's logit from only the classifier inputs it needs (Badola's decomposition)."""
    from explainfix_cli.evaluation.measure import metric

    name, linear = classifier
    importance = measured.mean(FEATURES)  # (K, F)
    features = measured.probes[FEATURES].pooled  # (N, F)
    assert features is not None
    mask = needed_mask(importance, channels_needed(importance, share))  # (K, F)
    w = linear.weight.detach().double().cpu() * mask  # (K, F)
    bias = linear.bias.detach().double().cpu() if linear.bias is not None else torch.zeros(len(w), dtype=torch.float64)
    decomposed = features @ w.T + bias  # (N, K)
    subset = Dataset(data.x[: len(features)], data.y[: len(features)])
    return Decomposition(
        classifier=name,
        metric=data.metric_name,
        metric_full=_rounded(metric(subset, measured.outputs)),
        metric_decomposed=_rounded(metric(subset, decomposed.float())),
    )


def _rounded(value: float) -> float | None:
    """A metric for JSON: None where it is undefined (an AUC over labels that all have one kind)."""
    return None if (v := finite(value)) is None else round(v, 10)


CLASSES_FILES = ("classes.json", "class_channels.png", "channels_needed.png")


def classes(
    model: nn.Module,
    data: Dataset,
    out_dir: str | Path | None,
    *,
    share: float = 0.9,
    bins: int = 8,
    with_figures: bool = True,
    force: bool = False,
    device: str = "cpu",
) -> ClassesResult:
    """`analyse_classes`, written into `out_dir`: classes.json, and with figures the class x
    channel heatmap of the last layers and the channels needed per class. A non-empty folder needs
    `force`, and then only these files are replaced; they appear together or not at all."""
    import json

    from explainfix_cli.io.outputs import atomic_dir

    names = list(CLASSES_FILES if with_figures else CLASSES_FILES[:1])
    if out_dir is None:
        return analyse_classes(model, data, share=share, bins=bins, device=device)[0]
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, force) as tmp:  # checks the folder before the work
        result, matrices = analyse_classes(model, data, share=share, bins=bins, device=device)
        result.files = [str(out_dir / n) for n in names]
        if with_figures:
            from explainfix_cli.figures.classes import draw_channels_needed, draw_class_channels

            last = [layer for layer in result.layers if layer.name != FEATURES][-1:] + [
                layer for layer in result.layers if layer.name == FEATURES
            ]
            draw_class_channels([(layer.name, matrices[layer.name]) for layer in last], tmp / names[1])
            draw_channels_needed([(layer.name, np.array(layer.channels_needed), layer.channels) for layer in last], share, tmp / names[2])
        payload = {**result.to_json(), "seconds": None}  # the file repeats across runs; the time does not
        (tmp / names[0]).write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    return result


# ---- one-vs-rest sub-models (Coded ResNeXt's single-purpose classifier) --------------------------
class OneVsRest(nn.Module):
    """A classifier reduced to one score for class `target`: its logit minus the largest other
    logit (`margin`, for class labels: positive exactly when the model predicts `target`), or its
    own logit (for multi-label targets, where each label is its own binary problem). (N, 1)."""

    def __init__(self, model: nn.Module, target: int, margin: bool = True) -> None:
        super().__init__()
        self.model = model
        self.target = target
        self.margin = margin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = model_output(self.model, x)  # (N, K)
        own = z[:, self.target : self.target + 1]  # (N, 1)
        if not self.margin:
            return own
        others = torch.cat([z[:, : self.target], z[:, self.target + 1 :]], dim=1)  # (N, K - 1)
        return own - others.amax(dim=1, keepdim=True)


def one_vs_rest(arch: dict[str, Any], target: int, margin: bool = True) -> OneVsRest:
    """The factory `load_model` rebuilds an extracted sub-model with: the original architecture
    (`{"factory": ..., "kwargs": ...}`) wrapped in `OneVsRest`."""
    from explainfix_cli.io.checkpoints import ArchSpec

    return OneVsRest(ArchSpec(**arch).build(), target, margin)


@dataclass
class BinaryScore:
    """How well a one-vs-rest score separates class K from the rest on one data set."""

    auc: float | None  # None when the data holds only one kind
    accuracy: float  # score > 0 against the truth


def binary_score(score: torch.Tensor, positive: torch.Tensor) -> BinaryScore:
    """ROC AUC (ties count half) and accuracy at threshold 0 of a (N,) score for (N,) bool truth."""
    from explainfix_cli.evaluation.measure import _roc_auc

    auc = _roc_auc(score, positive)
    return BinaryScore(None if auc is None else round(auc, 10), round(float(((score > 0) == positive).double().mean()), 10))


@dataclass
class ExtractReport:
    """What `extract` did: the sub-model's size and its one-vs-rest quality against the full model's."""

    target: int
    score: str  # "margin" (logit minus the largest other) or "logit" (multi-label)
    keep: float  # --keep: share of importance kept in every coupled group; --max-drop: share of the removable channels kept
    max_drop: float | None
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    channels_removed: int
    data: dict[str, BinaryScore]  # "full" and "extracted" on the data the channels were chosen on
    val: dict[str, BinaryScore] | None  # the same on held-out data
    bisection: list[dict[str, float | None]]  # with --max-drop, each candidate cut tried: (keep, AUC drop)
    seconds: float
    out: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReaderImportance:
    """Per conv and linear layer (by name), per input channel: importance for the one-vs-rest score
    and mean input."""

    importance: dict[str, torch.Tensor]  # (input channels,)
    means: dict[str, torch.Tensor]  # (input channels,) mean over the data and over space
    scores: torch.Tensor  # (N,) the one-vs-rest score of every sample, from the same pass


# a positive's weight is sigmoid(-s), a negative's sigmoid(s): the slope of the logistic loss of score s
_SLOPE_SIGNS = torch.tensor([-1.0, 1.0])


def reader_importance(model: nn.Module, data: Dataset, target: int, margin: bool = True, device: str = "cpu") -> ReaderImportance:
    """Per conv and linear layer (by name), (input channels,) the importance of what it reads for
    the one-vs-rest score `s` of class `target` (docs/method.md §6): with `t = Σ (a - ā) ∂s/∂a` at
    the layer's input (`ā` the mean input over the data), half the mean of `sigmoid(-s) |t|` over
    the class's samples plus half the mean of `sigmoid(s) |t|` over the others.

    `|t|` is the first-order change of the score when the channel is replaced by its mean; the
    sigmoid is the slope of the logistic loss of `s`, so samples the score already separates by a
    wide margin count little and those near or across the boundary count fully; the two halves
    weigh both kinds equally, as the AUC does. Removing a channel from a coupled group changes
    every layer that reads it, so a group's importance is the sum over its readers."""
    classes = model_output(model, data.x[:1].to(device)).shape[1]
    membership, _ = class_membership(data, classes)
    if not 0 <= target < classes:
        raise UserError(f"class {target} does not exist; the model has classes 0 to {classes - 1}.")
    probes = [Probe(n, m, "input") for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]

    def sides(y: torch.Tensor) -> torch.Tensor:
        positive = membership(y)[:, target] > 0
        return torch.stack([positive, ~positive], dim=1)  # (N, 2): the class, the rest

    measured = gradient_times_activation(
        OneVsRest(model, target, margin), data, probes, lambda s: s.expand(-1, 2), sides, True,
        centred=True, weights=lambda s: torch.sigmoid(s * _SLOPE_SIGNS.to(s)), device=device,
    )
    if int(measured.counts[0]) == 0:
        raise UserError(f"the data holds no sample of class {target}; its channels cannot be chosen.")
    means = {p.name: measured.probes[p.name].centre for p in probes}
    return ReaderImportance(
        {p.name: measured.mean(p.name, magnitude=True).sum(dim=0) / 2 for p in probes},
        {name: m for name, m in means.items() if m is not None},
        measured.outputs[:, 0],
    )


def _kept_share(importance: torch.Tensor, keep: float) -> torch.Tensor:
    """(C,) True at the fewest channels (largest first) whose importance reaches `keep` of the total."""
    total = float(importance.sum())
    if total <= 0:
        return torch.zeros(len(importance), dtype=torch.bool)
    order = torch.sort(importance, descending=True, stable=True).indices
    reached = importance[order].cumsum(0) >= keep * total * (1 - 1e-6)
    n = int(reached.double().argmax()) + 1 if keep > 0 else 0
    kept = torch.zeros(len(importance), dtype=torch.bool)
    kept[order[:n]] = True
    return kept


@dataclass
class GroupScores:
    """One coupled group that may lose channels: per root channel, its importance (summed over the
    group's readers) and the parameters that leave with it."""

    importance: torch.Tensor  # (n,)
    params: torch.Tensor  # (n,)


def group_scores(model: nn.Module, example: torch.Tensor, measured: ReaderImportance) -> list[GroupScores]:
    """Every coupled group that may lose channels, in the channel-removal engine's order."""
    from explainfix_cli.pruning.channels import remove_chosen_channels

    names = {m: n for n, m in model.named_modules()}
    groups: list[GroupScores] = []

    def record(readers: list[Any], params: torch.Tensor) -> None:
        importance = torch.zeros(len(params), dtype=torch.float64)
        for r in readers:
            importance.index_add_(0, r.root, measured.importance[names[r.module]][r.local].double())
        groups.append(GroupScores(importance, params))

    remove_chosen_channels(model, example, record)  # chooses nothing: the model stays as it is
    return groups


def remove_for_class(model: nn.Module, example: torch.Tensor, measured: ReaderImportance, chosen: list[torch.Tensor]) -> int:
    """Remove, in place, the channels `chosen` (a mask per group, in `group_scores`' order), each
    replaced by its mean input, folded into its readers' biases; returns the channels removed."""
    from explainfix_cli.pruning.channels import remove_chosen_channels

    names = {m: n for n, m in model.named_modules()}
    masks = iter(chosen)
    means = {m: measured.means[n].to(m.weight.dtype) for m, n in names.items() if n in measured.means}
    removed = remove_chosen_channels(model, example, lambda _readers, _params: next(masks), means).removed
    assert next(masks, None) is None, "the model's groups changed between scoring and cutting"
    return removed


def cut_for_class(model: nn.Module, example: torch.Tensor, measured: ReaderImportance, keep: float) -> int:
    """Remove, in place, in every coupled group the channels outside the fewest that keep `keep` of
    the group's importance; returns the channels removed."""
    chosen = [~_kept_share(g.importance, keep) for g in group_scores(model, example, measured)]
    return remove_for_class(model, example, measured, chosen)


GREEDY_STEP = 0.2  # the largest share of the remaining channels one candidate cut removes
GREEDY_EVALUATIONS = 60  # candidate cuts measured at most


@dataclass
class GreedyCut:
    """`greedy_cut`'s result."""

    model: nn.Module
    kept: float  # share of the removable channels (those of groups that may lose channels) kept
    removed: int  # channels removed


def greedy_cut(
    model: nn.Module,
    example: torch.Tensor,
    score: Callable[[nn.Module], ReaderImportance],
    drop: Callable[[nn.Module], float],
    max_drop: float,
    tried: list[dict[str, float | None]],
) -> GreedyCut:
    """`extract --max-drop` (docs/method.md §6): a copy of `model` cut in rounds, each channel
    ranked by its importance per parameter (`score` of the model as it is now). A candidate cut
    removes the `n` lowest-ranked channels and stays when `drop(candidate) <= max_drop`; then the
    smaller model is scored again and `n` doubles (at most `GREEDY_STEP` of the channels left).
    When it fails, `n` halves; when one channel alone fails, it is passed over and the next one
    is tried. Ends after `GREEDY_EVALUATIONS` candidates or when every channel was passed over.
    `model` is not changed; `tried` gets every candidate's share of channels kept and its drop."""
    import copy

    measured = score(model)
    current = copy.deepcopy(model)
    groups = group_scores(current, example, measured)
    channels_before = sum(len(g.params) for g in groups)
    n, skip = max(1, int(GREEDY_STEP * channels_before)), 0
    for _ in range(GREEDY_EVALUATIONS):
        ratio = torch.cat([g.importance / g.params.clamp_min(1) for g in groups])
        order = torch.sort(ratio, stable=True).indices
        if skip >= len(order):
            break
        mask = torch.zeros(len(order), dtype=torch.bool)
        mask[order[skip : skip + n]] = True
        candidate = copy.deepcopy(current)
        removed = remove_for_class(candidate, example, measured, list(mask.split([len(g.params) for g in groups])))
        if removed == 0:
            skip += n  # nothing there may leave (each group keeps a channel)
            continue
        d = drop(candidate)
        kept = (len(order) - removed) / channels_before
        tried.append({"keep": round(kept, 10), "auc_drop": round(d, 10)})
        if d <= max_drop:
            current, skip = candidate, 0
            measured = score(current)
            groups = group_scores(current, example, measured)
            n = min(2 * n, max(1, int(GREEDY_STEP * len(order))))
        elif n > 1:
            n //= 2
        else:
            skip += 1
    left = sum(len(g.params) for g in groups)
    return GreedyCut(current, round(left / channels_before, 10), channels_before - left)


def extract(
    model: nn.Module,
    data: Dataset,
    target: int,
    *,
    keep: float | None = None,
    max_drop: float | None = None,
    val: Dataset | None = None,
    arch: Any = None,
    history: list[dict[str, Any]] | None = None,
    out: str | Path | None = None,
    force: bool = False,
    device: str = "cpu",
) -> tuple[OneVsRest, ExtractReport]:
    """A one-vs-rest sub-model for class `target` (docs/method.md §6, Coded ResNeXt): remove the
    channels the class's one-vs-rest score needs least (`reader_importance`) with the
    channel-removal engine, and reduce the outputs to that one score. With `keep`, every coupled
    group keeps the fewest channels holding a share `keep` of its importance; with `max_drop`,
    `greedy_cut` removes channels in rounds while the one-vs-rest AUC on `data` stays at most
    `max_drop` below the full model's. `model` is not changed; the sub-model is written to `out`
    (rebuilt by `load_model`).
    """
    import copy

    from explainfix_cli.evaluation.measure import model_size
    from explainfix_cli.io.checkpoints import save_model
    from explainfix_cli.io.outputs import check_target

    start = time.perf_counter()
    if (keep is None) == (max_drop is None):
        raise UserError("give either a share of importance to keep or a largest allowed AUC drop, not both or neither.")
    if keep is not None and not 0 <= keep <= 1:
        raise UserError(f"the share of importance to keep must be in [0, 1], not {keep}.")
    if max_drop is not None and not 0 <= max_drop < 1:
        raise UserError(f"the largest allowed AUC drop must be in [0, 1), not {max_drop}.")
    if out is not None:
        check_target(Path(out), force)
    model.eval().to(device)
    margin = data.target_kind == "labels"
    importance = reader_importance(model, data, target, margin, device)
    example = data.x[:1].to(device)
    shape = tuple(data.x.shape[1:])

    def truth(d: Dataset) -> torch.Tensor:
        y = torch.cat([y for _, y in d])
        return (y == target) if margin else (y[:, target] > 0.5)

    def scores(m: nn.Module, d: Dataset) -> torch.Tensor:
        from explainfix_cli.evaluation.measure import outputs

        return outputs(m, d, device)[:, 0]  # (N,)

    full = OneVsRest(model, target, margin)
    truth_data = truth(data)
    full_score = binary_score(importance.scores, truth_data)  # the importance pass ran the full model on the data
    tried: list[dict[str, float | None]] = []
    if max_drop is not None:
        if full_score.auc is None:
            raise UserError(f"the data holds only one kind of sample for class {target}; an AUC cannot guide the cut.")

        def drop(m: nn.Module) -> float:
            auc = binary_score(scores(OneVsRest(m, target, margin), data), truth_data).auc
            assert auc is not None and full_score.auc is not None
            return full_score.auc - auc

        def score(m: nn.Module) -> ReaderImportance:
            return importance if m is model else reader_importance(m, data, target, margin, device)

        greedy = greedy_cut(model, example, score, drop, max_drop, tried)
        cut, keep, removed = greedy.model, greedy.kept, greedy.removed
    else:
        assert keep is not None
        cut = copy.deepcopy(model)
        removed = cut_for_class(cut, example, importance, keep)
    sub = OneVsRest(cut, target, margin).eval()
    before, after = model_size(full, shape), model_size(sub, shape)
    report = ExtractReport(
        target=target,
        score="margin" if margin else "logit",
        keep=keep,
        max_drop=max_drop,
        params_before=before.params,
        params_after=after.params,
        macs_before=before.macs,
        macs_after=after.macs,
        channels_removed=removed,
        data={"full": full_score, "extracted": binary_score(scores(sub, data), truth_data)},
        val=None
        if val is None
        else {"full": binary_score(scores(full, val), truth(val)), "extracted": binary_score(scores(sub, val), truth(val))},
        bisection=tried,
        seconds=0.0,
        out=None if out is None else str(out),
    )
    if out is not None:
        from explainfix_cli.io.checkpoints import ArchSpec

        spec = ArchSpec(f"{__name__}:one_vs_rest", {"arch": arch.to_json(), "target": target, "margin": margin}) if arch is not None else None
        step = {"step": "extract", **{k: v for k, v in report.to_json().items() if k not in ("seconds", "out")}, "input_size": list(shape)}
        save_model(sub, out, arch=spec, history=[*(history or []), step], report=step, force=force)
    report.seconds = round(time.perf_counter() - start, 3)
    return sub, report


# ---- class-specific gate training (Liang et al., Class-Specific Gates) ----------------------------
class ClassGates(nn.Module):
    """CSG's gate: a (channels, classes) matrix in [0, 1] on the classifier's input features.

    On a gated (CSG-path) step a sample of class k passes only `f * G[:, k]` to the classifier,
    so each channel is pushed to serve the classes whose gates stay open; an L1 penalty closes
    gates. Global average pooling is linear, so gating the pooled features is gating the last
    spatial layer's feature maps. The gate is used in training only: at inference there is none,
    so "folding it away" is detaching it, and the model keeps its architecture.
    """

    def __init__(self, classifier: str, channels: int, classes: int) -> None:
        super().__init__()
        self.classifier = classifier  # module name of the linear layer whose input is gated
        self.gate = nn.Parameter(torch.full((channels, classes), 0.5))  # (C, K), the paper's start

    @classmethod
    def for_model(cls, model: nn.Module, example: torch.Tensor) -> ClassGates:
        """A gate that fits `model`'s classifier (its final linear layer)."""
        found = find_classifier(model, example)
        if found is None:
            raise UserError("class gates need a model whose output comes from a linear layer reading (N, features).")
        name, linear = found
        return cls(name, linear.in_features, linear.out_features)

    def penalty(self) -> torch.Tensor:
        """The L1 norm of the gate, per class (so that its weight does not grow with K)."""
        return self.gate.abs().sum() / self.gate.shape[1]

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """Plain gradient descent on the gate, then the paper's clip: every channel's gates divided
        by its largest (its favourite class stays fully open) and clamped to [0, 1]. Not Adam: its
        per-element normalisation turns the L1 push into the same step for every gate, which the
        clip then undoes, so the gates would never close."""
        if self.gate.grad is not None:
            self.gate -= lr * self.gate.grad
            self.gate.grad = None
        largest = self.gate.amax(dim=1, keepdim=True).clamp_min(1e-12)  # (C, 1)
        self.gate.copy_((self.gate / largest).clamp(0, 1))

    def density(self) -> float:
        """Mean gate value: 1 with every gate open, 1/K with one class per channel."""
        return float(self.gate.detach().mean())

    @contextmanager
    def applied(self, model: nn.Module, labels: torch.Tensor) -> Iterator[None]:
        """While inside, `model`'s classifier sees `f * G[:, y]` for each sample's label y."""

        def gate(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return (inputs[0] * self.gate[:, labels].T, *inputs[1:])  # (N, C) * (N, C)

        handle = model.get_submodule(self.classifier).register_forward_pre_hook(gate)
        try:
            yield
        finally:
            handle.remove()


def uses_gates(epoch: int, period: int = 3, warmup: int = 0) -> bool:
    """The paper's alternation: after `warmup` epochs, in every `period` epochs the first trains the
    standard (ungated) path and the others the gated path."""
    return epoch >= warmup and epoch % period != 0


def class_gated_step(
    model: nn.Module,
    gates: ClassGates,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    gated: bool,
    sparsity: float = 0.05,
    gate_lr: float = 0.5,
) -> float:
    """One training step on a minibatch of class labels: the standard path (cross-entropy of the
    model's output) or the gated path (cross-entropy with each sample's features gated by its
    class's gates, plus `sparsity` times the gate's L1 norm per class, then the gate's own step).
    `optimizer` holds the model's trainable parameters (not the gate); returns the loss."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with gates.applied(model, y) if gated else nullcontext():
        out = model_output(model, x)  # (N, K)
    loss = nn.functional.cross_entropy(out, y)
    if gated:
        loss = loss + sparsity * gates.penalty()
    loss.backward()
    optimizer.step()
    if gated:
        gates.step(gate_lr)
    return float(loss.detach())
