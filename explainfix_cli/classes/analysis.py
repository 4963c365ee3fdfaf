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

The gradient pass here (`gradient_times_activation`) also scores channels for `extract.py`'s
one-vs-rest sub-models; `gates.py` holds the class-specific gate training of Liang et al.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

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
    pooled_parts: dict[str, list[torch.Tensor]] = {p.name: [] for p in probes if p.name in pooled or centred}
    parts: dict[str, list[_Part]] = {p.name: [] for p in probes}
    counts: torch.Tensor | None = None
    outs = []
    n_scores = 0
    with _watching(probes) as captured, torch.enable_grad():
        for x, y in data:
            x = x.to(device).requires_grad_(True)  # activations need a gradient even when every weight is fixed
            out = model_output(model, x)
            s, member = scores(out), membership(y.to(device)).to(out.dtype)  # (N, J), (N, J)
            n_scores = s.shape[1]
            weighted = member if weights is None else member * weights(s.detach())  # (N, J)
            outs.append(out.detach().cpu())
            counts = member.sum(0).cpu() if counts is None else counts + member.sum(0).cpu()
            _backward(probes, [captured[p.name] for p in probes], s * member, weighted, disjoint, centred, parts)
            for p in probes:
                if p.name in pooled_parts:
                    pooled_parts[p.name].append(_per_channel(p.module, p.side, captured[p.name].detach(), mean=True).cpu())
            captured.clear()
    assert counts is not None
    sums = {p.name: _summed(parts[p.name], pooled_parts.get(p.name), n_scores, p.name in pooled, centred) for p in probes}
    return GradientPass(sums, counts.double(), torch.cat(outs))


# one backward pass at one probe: (rows of the scores, (N, J') weights, (N, C) Σ a g, (N, C) Σ g or None)
_Part = tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor | None]


@contextmanager
def _watching(probes: list[Probe]) -> Iterator[dict[str, torch.Tensor]]:
    """While inside, every forward leaves each probe's tensor, by name, in the dict yielded: a copy
    of its own, so that its gradient is this probe's only (a tensor read by two layers)."""
    captured: dict[str, torch.Tensor] = {}

    def watch(p: Probe) -> RemovableHandle:
        if p.side == "output":
            def out_hook(_m: nn.Module, _inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
                captured[p.name] = out.clone()
                return captured[p.name]

            return p.module.register_forward_hook(out_hook)

        def in_hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            captured[p.name] = inputs[0].clone()
            return (captured[p.name], *inputs[1:])

        return p.module.register_forward_pre_hook(in_hook)

    hooks = [watch(p) for p in probes]
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


def _backward(
    probes: list[Probe],
    tensors: list[torch.Tensor],
    member_scores: torch.Tensor,
    weighted: torch.Tensor,
    disjoint: bool,
    centred: bool,
    parts: dict[str, list[_Part]],
) -> None:
    """One minibatch's backward passes (one for disjoint scores, else one per score, (N, J)
    `member_scores`), each probe's per-sample `Σ a g` (and `Σ g` when `centred`) appended to `parts`."""
    n_scores = member_scores.shape[1]
    passes = [member_scores.sum()] if disjoint else [member_scores[:, j].sum() for j in range(n_scores)]
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


def _summed(parts: list[_Part], pooled: list[torch.Tensor] | None, n_scores: int, keep_pooled: bool, centred: bool) -> ProbeResult:
    """One probe's passes summed per score, centred on the channels' mean when asked."""
    every = torch.cat(pooled).double() if pooled is not None else None  # (N, C)
    centre = every.mean(dim=0) if centred and every is not None else None  # (C,)
    width = parts[0][2].shape[1]
    result = ProbeResult(
        torch.zeros(n_scores, width, dtype=torch.float64),
        torch.zeros(n_scores, width, dtype=torch.float64),
        every if keep_pooled else None,
        centre,
    )
    for rows, w, t, q in parts:
        if centre is not None and q is not None:
            t = t - centre * q
        result.signed[rows] += w.T @ t
        result.magnitude[rows] += w.T @ t.abs()
    return result


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
    layers = [_layer_classes(p.name, measured, indicators, share, bins) for p in probes]
    matrices = {p.name: measured.mean(p.name).numpy() for p in probes}  # (K, C) each
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


def _layer_classes(name: str, measured: GradientPass, indicators: torch.Tensor, share: float, bins: int) -> LayerClasses:
    """One watched layer's class importance, channels needed and MI specificity."""
    importance = measured.mean(name)  # (K, C)
    mi = mutual_information(measured.probes[name].pooled, indicators, bins).amax(dim=1)  # (C,)
    return LayerClasses(
        name=name,
        channels=importance.shape[1],
        importance=_round(importance),
        channels_needed=channels_needed(importance, share).tolist(),
        preferred_class=importance.argmax(dim=0).tolist(),
        mutual_information=_round(mi),
        specificity=round(float(mi.mean()), 10),
    )


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

