"""`explain`: spectra, figures and attributions of a model, written as one report folder."""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from explainfix_cli import progress
from explainfix_cli.dct import dct2_basis
from explainfix_cli.errors import UserError, check_pct
from explainfix_cli.evaluation.measure import metric
from explainfix_cli.explanation.attributions import MAX_ATTRIBUTIONS, METHODS, Attributions
from explainfix_cli.explanation.spectra import LOW_FREQUENCY_DEFINITION, LayerSpectra, layer_spectra
from explainfix_cli.figures import spectra as figures
from explainfix_cli.io.data import Dataset
from explainfix_cli.io.outputs import atomic_dir, check_folder_target
from explainfix_cli.models import require_spatial_convs
from explainfix_cli.saliency import saliency_and_gradient_weights

SPECTRA_FILE = "spectra.json"
MAX_SALIENCY_PANELS = 16  # layers in the kernel-saliency figure
INDEX_FILE = "index.html"


@dataclass(frozen=True)
class FigureFile:
    """A figure in the report folder: its file name there and a one-line caption."""

    name: str
    caption: str


@dataclass(frozen=True)
class ReportSource:
    """What the report's header names: the model file, its architecture, the data, and the model
    file's history (e.g. how it was pruned) and input preprocessing."""

    model: str | None = None
    arch: dict[str, Any] | None = None
    data: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    preprocessing: dict[str, Any] | None = None


@dataclass(frozen=True)
class PruneMarks:
    """The saliency (docs/method.md §1) of each spatial layer's kernels, (O, I/groups) by layer name, the
    kernels that are zero already (a pruned model's), and the `pct` % least salient of the kernels
    still non-zero (§2, one ranking over the whole model): what a further prune would zero."""

    pct: float
    scores: dict[str, torch.Tensor]
    zeroed: dict[str, torch.Tensor]  # bool masks: crossed, the least salient non-zero kernels
    already_zero: dict[str, torch.Tensor]  # bool masks: kernels whose weights are all zero

    @classmethod
    def of(cls, model: nn.Module, scores: dict[str, torch.Tensor], pct: float) -> PruneMarks:
        """Rank the non-zero kernels only: on a pruned model a pct of all kernels would cross the
        kernels already zero (their saliency is 0, the least of all) and nothing else."""
        convs = require_spatial_convs(model)
        zero = {name: conv.weight.detach().flatten(2).eq(0).all(dim=2).cpu() for name, conv in convs}  # (O, I/groups)
        flat = torch.cat([scores[name].double().flatten() for name, _ in convs])  # layer, then o, then i
        alive = ~torch.cat([zero[name].flatten() for name, _ in convs])
        k = math.floor(pct / 100 * int(alive.sum()))
        chosen = torch.zeros(len(flat), dtype=torch.bool)
        chosen[alive.nonzero().flatten()[torch.argsort(flat[alive], stable=True)[:k]]] = True  # ties: layer, o, i order
        masks, start = {}, 0
        for name, conv in convs:
            n = conv.weight.shape[0] * conv.weight.shape[1]
            masks[name] = chosen[start : start + n].reshape(conv.weight.shape[:2])
            start += n
        return cls(pct, scores, masks, zero)

    @property
    def totals(self) -> tuple[int, int]:
        """(crossed, still non-zero) kernels of the model."""
        return sum(int(m.sum()) for m in self.zeroed.values()), sum(int((~m).sum()) for m in self.already_zero.values())

    @property
    def prune_pct(self) -> float:
        """The `prune --pct` (a share of all kernels) that zeroes the crossed kernels with the zero ones."""
        total = sum(m.numel() for m in self.already_zero.values())
        zero = sum(int(m.sum()) for m in self.already_zero.values())
        return 100 * (zero + self.totals[0]) / total


@dataclass
class ExplainResult:
    """What `explain` measured and wrote (docs/cli.md, `explain --json`)."""

    out: Path
    layers: list[LayerSpectra]
    figures: list[FigureFile]
    saliency_weighted: bool
    seconds: dict[str, float]  # wall time per stage: saliency, spectra, attributions, figures
    notes: list[str] = field(default_factory=list)  # what a person should know, e.g. a capped request
    source: ReportSource = field(default_factory=ReportSource)
    metric: str | None = None  # the model's metric on the data, e.g. accuracy
    metric_value: float | None = None
    samples: int | None = None  # how many samples the data gave
    pct: float = 50.0  # the prune percentage the kernel-saliency figure marks

    def spectra_json(self) -> dict[str, Any]:
        """The measurements alone, as written to `spectra.json` (identical across runs)."""
        return {
            "saliency_weighted": self.saliency_weighted,
            "low_frequency_share_definition": LOW_FREQUENCY_DEFINITION,
            "layers": [s.to_json() for s in self.layers],
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            **self.spectra_json(),
            "figures": [{"path": str(self.out / f.name), "caption": f.caption} for f in self.figures],
            "spectra": str(self.out / SPECTRA_FILE),
            "index": str(self.out / INDEX_FILE),
            "seconds": self.seconds,
            "notes": self.notes,
            "metric": self.metric,
            "metric_value": self.metric_value,
            "pct": self.pct,
        }


@contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    with progress.stage(stage):
        yield
    seconds[stage] = round(time.perf_counter() - start, 4)


def explain(
    model: nn.Module,
    data: Dataset | None,
    out_dir: Path,
    *,
    fmt: str = "png",
    attributions: int = 4,
    attribution_method: str = "saliency",
    with_figures: bool = True,
    force: bool = False,
    log_scale: bool = False,
    device: str = "cpu",
    pct: float = 50.0,
    source: ReportSource | None = None,
) -> ExplainResult:
    """ExplainSteer spectra of every spatial conv (docs/method.md §5), their figures, and attributions.

    With `data`, kernels are weighted by their saliency (one forward + backward per minibatch)
    and the first `attributions` inputs get an attribution map (`attribution_method`, see
    `attributions.input_attributions`); without it the spectra
    are plain averages. `with_figures=False` writes the numbers only (spectra.json and index.html): no
    figures and no attributions, for a CI job that tracks the spectra. `model` must already be on
    `device`. Everything lands in `out_dir`, which appears only once complete. With data, the
    kernel-saliency figure marks the kernels a prune at `pct` would zero (§2), and index.html gives
    the model's metric on the data; `source` names the model file, data and history there.
    Long because each input is checked before the expensive stages, which it then runs in turn.
    """
    if fmt not in figures.FORMATS:
        raise UserError(f"figure format {fmt!r} is not supported; use one of {', '.join(figures.FORMATS)}.")
    if attributions < 0:
        raise UserError(f"`attributions` must be 0 or more, not {attributions}.")
    if attribution_method not in METHODS:
        raise UserError(f"`attribution_method` must be one of {', '.join(METHODS)}, not {attribution_method!r}.")
    check_pct("pct", pct)
    out_dir = Path(out_dir)
    convs = require_spatial_convs(model)
    check_folder_target(out_dir, force)  # fail before the expensive part, not after it

    seconds: dict[str, float] = {}
    seen: list[torch.Tensor] = []  # the model's outputs from the saliency passes
    weights: dict[str, torch.Tensor] | None = None
    marks: PruneMarks | None = None
    with _timed(seconds, "saliency"):
        if data is not None:
            scores, weights = saliency_and_gradient_weights(model, data, device, outputs=seen)
            marks = PruneMarks.of(model, scores, pct)
    with _timed(seconds, "spectra"):
        layers = [layer_spectra(name, conv.weight, None if weights is None else weights[name]) for name, conv in convs]
    attributed: Attributions | None = None
    notes: list[str] = []
    if with_figures and data is not None and attributions > 0:
        from explainfix_cli.explanation.attributions import input_attributions

        count = min(attributions, MAX_ATTRIBUTIONS, data.num_samples)
        if count < attributions:
            why = "one figure shows at most" if count == MAX_ATTRIBUTIONS else "the data holds only"
            notes.append(f"attribution maps for the first {count} inputs, not {attributions}: {why} {count}.")
        with _timed(seconds, "attributions"):
            attributed = input_attributions(model, data, count, attribution_method, device)

    plan = _figures(layers, convs[0], marks, attributed, fmt, log_scale) if with_figures else []

    # The result shares `seconds`, so the figures' time lands in it when the block below ends.
    result = ExplainResult(
        out_dir, layers, [figure for figure, _ in plan], weights is not None, seconds, notes, source or ReportSource(),
        metric=None if data is None else data.metric_name,
        metric_value=metric(data, torch.cat(seen)) if data is not None and seen else None,
        samples=None if data is None else data.num_samples,
        pct=pct,
    )
    with _timed(seconds, "figures"), atomic_dir(out_dir, force) as tmp:
        with progress.stage("drawing figures", total=len(plan)):
            figures.draw_all([(draw, tmp / figure.name) for figure, draw in plan], done=progress.advance)
        (tmp / SPECTRA_FILE).write_text(json.dumps(result.spectra_json(), indent=2) + "\n")
        (tmp / INDEX_FILE).write_text(_index_html(result))
    return result


def _figures(
    layers: list[LayerSpectra],
    first: tuple[str, nn.Conv2d],
    marks: PruneMarks | None,
    attributed: Attributions | None,
    fmt: str,
    log_scale: bool,
) -> list[tuple[FigureFile, figures.Draw]]:
    """Every figure of the report, in order, with the call that draws it.
    Long because each figure's caption is written out here, beside its drawing call."""
    first_name, first_conv = first
    plan = _spectra_figures(layers, fmt, log_scale)
    plan.append(
        (
            FigureFile(f"kernels.{fmt}", f"The kernels of the first spatial layer, {first_name}."),
            partial(figures.draw_kernels, first_name, _array(first_conv.weight)),
        )
    )
    if marks is not None:
        shown = list(marks.scores)[:MAX_SALIENCY_PANELS]
        crossed, alive = marks.totals
        zero = sum(int(m.sum()) for m in marks.already_zero.values())
        already = f"; black: the {zero:,} kernels already zero" if zero else ""
        which = "every spatial layer" if len(shown) == len(marks.scores) else f"the first {len(shown)} of {len(marks.scores)} spatial layers"
        plan.append(
            (
                FigureFile(
                    f"kernel_saliency.{fmt}",
                    f"How much each kernel matters on the data (the saliency prune ranks by), for {which}; a red "
                    f"cross marks the {marks.pct:g} % least salient of the kernels still non-zero, over all layers: "
                    f"{crossed:,} of {alive:,}, which `explainfix prune --pct {marks.prune_pct:.4g}` would zero{already}.",
                ),
                partial(
                    figures.draw_kernel_saliency,
                    shown,
                    [_array(marks.scores[name]) for name in shown],
                    [marks.zeroed[name].numpy() for name in shown],
                    marks.pct,
                    marks.totals,
                    [marks.already_zero[name].numpy() for name in shown],
                    marks.prune_pct,
                ),
            )
        )
    if attributed is not None:
        plan.append(
            (
                FigureFile(
                    f"attributions.{fmt}",
                    f"Which pixels of the first {len(attributed.captions)} inputs drive the target output "
                    f"({attributed.method}; brighter = more, relative to the input's brightest pixel). Titles give "
                    "the true target and the prediction, green when right and red when wrong.",
                ),
                partial(
                    figures.draw_attributions,
                    _array(attributed.images),
                    _array(attributed.attributions),
                    attributed.captions,
                    attributed.correct,
                    attributed.method,
                ),
            )
        )
    return plan


def _array(t: torch.Tensor) -> np.ndarray:
    """A float64 copy for the figures, made here: they are drawn in forked processes without torch."""
    return t.detach().cpu().double().numpy()


def _spectra_figures(layers: list[LayerSpectra], fmt: str, log_scale: bool) -> list[tuple[FigureFile, figures.Draw]]:
    """Heatmap, frequency profiles and basis per kernel shape: e_d of different sizes do not align."""
    by_shape: dict[tuple[int, int], list[tuple[int, LayerSpectra]]] = {}
    for depth, spectra in enumerate(layers):
        by_shape.setdefault(spectra.kernel_shape, []).append((depth, spectra))
    plan: list[tuple[FigureFile, figures.Draw]] = []
    for (kh, kw), group in by_shape.items():
        size = f"{kh}x{kw}"
        plan += [
            (
                FigureFile(
                    f"spectra_{size}.{fmt}",
                    f"Each {size} layer (row, input at the top) and the share of its kernel energy on each DCT-II basis "
                    "vector (column, low to high frequency). Right: the layer's low-frequency share (the three columns "
                    "left of the dashed line), orange where it is above the share a layer without preference has "
                    "(dotted). Top: each basis vector's mean share over the layers.",
                ),
                partial(figures.draw_heatmap, group, log_scale=log_scale),
            ),
            (
                FigureFile(
                    f"profile_{size}.{fmt}",
                    f"Each {size} layer's energy folded onto vertical, horizontal and both frequencies "
                    "(e_1 and e_0 of ExplainSteer), each curve divided by its sum: a curve that falls to the right "
                    "means the layer prefers smooth patterns in that direction.",
                ),
                partial(figures.draw_curves, group),
            ),
            (
                FigureFile(f"dct_basis_{size}.{fmt}", f"The {size} DCT-II basis vectors the spectra refer to."),
                partial(figures.draw_basis, _array(dct2_basis(kh, kw).reshape(kh, kw, kh, kw))),
            ),
        ]
    return plan


def _index_html(result: ExplainResult) -> str:
    """The report's page: what was explained, how to read the figures, the numbers per layer."""
    rows = "\n".join(
        f"<tr><td>{i}</td><td>{html.escape(s.name)}</td><td>{s.kernel_shape[0]}x{s.kernel_shape[1]}</td>"
        f"<td>{html.escape(s.share_words(3))}</td><td>{3 / len(s.e_d):.3f}</td></tr>"
        for i, s in enumerate(result.layers)
    )
    shown = "\n".join(_figure_html(f) for f in result.figures) or "<p>No figures (written with --no-figures).</p>"
    source = result.source
    title = html.escape(Path(source.model).name) if source.model else "the model"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>explainfix explain: {title}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:auto;line-height:1.4}} img{{max-width:100%}}
td,th{{padding:2px 8px;text-align:left;vertical-align:top}} figure{{margin:2em 0}} .facts th{{white-space:nowrap}}</style></head>
<body><h1>Which spatial frequencies {title} uses</h1>
<h2>What was explained</h2>
<table class="facts">
{_facts_html(result)}
</table>
<h2>How to read this report</h2>
<p>A <b>spatial kernel</b> is one kh&times;kw slice of a convolution's weight (one output channel reading one input
channel). Any kernel is a weighted sum of the kh&middot;kw <b>DCT-II basis vectors</b> (figure <i>dct_basis</i>):
vector (0,0) is constant, vector (a,b) changes sign a times from top to bottom and b times from left to right, so
higher indices mean finer detail (higher spatial frequency).</p>
<p>For each layer, the <b>energy on a basis vector</b> is the sum over the layer's kernels of the absolute
coefficient of that vector, each kernel {_weighting_words(result.saliency_weighted)}. This is ExplainSteer's
spectrum (called e<sub>d</sub> in Gaudio et al., <i>ExplainFix</i>, 2022). The heatmaps (<i>spectra</i>) show each
layer's energy as shares of its total, basis vectors ordered from low to high frequency.</p>
<p>The <b>low-frequency share</b> is the share of a layer's energy on the three lowest-frequency basis vectors,
(0,0), (0,1) and (1,0). A layer with no preference has 3/(kh&middot;kw), 0.33 for 3x3 kernels; more means the
layer relies on smooth, slowly varying patterns, less that it relies on edges and fine texture. The paper's
observation is that trained networks concentrate their energy on low frequencies.</p>
<p>The <b>frequency profiles</b> (<i>profile</i>) fold the spectrum onto one direction: the square root of each
basis vector's energy summed over the other direction, for vertical (e<sub>1</sub>, rows) and horizontal
(e<sub>1</sub>, columns) frequency, and both added (e<sub>0</sub>, square kernels). Each curve is divided by its own
sum, so its points are shares that add up to 1.</p>
<p>The numbers behind every figure are in <a href="{SPECTRA_FILE}">{SPECTRA_FILE}</a> (energies in the units of
the kernels' weights, times the saliency weights when data is given).</p>
<h2>Layers</h2>
<table><tr><th>depth</th><th>layer</th><th>kernel</th><th>low-frequency share</th><th>without preference</th></tr>
{rows}
</table>
<h2>Figures</h2>
{shown}
</body></html>
"""


def _weighting_words(weighted: bool) -> str:
    if weighted:
        return "weighted by its saliency on the data (the summed magnitude of the objective's gradient with respect to it)"
    return "counted equally (no data was given, so the spectrum is a plain average)"


def _facts_html(result: ExplainResult) -> str:
    """Rows naming the model file, its architecture, the data, the metric and the history."""
    source = result.source
    facts: list[tuple[str, str]] = []
    if source.model:
        facts.append(("model file", html.escape(source.model)))
    if source.arch:
        kwargs = ", ".join(f"{k}={v!r}" for k, v in source.arch.get("kwargs", {}).items())
        facts.append(("architecture", html.escape(f"{source.arch.get('factory')}({kwargs})")))
    if source.data:
        samples = f", {result.samples:,} samples" if result.samples is not None else ""
        facts.append(("data", html.escape(f"{source.data}{samples}")))
    else:
        facts.append(("data", "none: spectra are plain averages of the kernels, no attributions"))
    if source.preprocessing:
        pre = source.preprocessing
        mean, std = (", ".join(f"{v:.4g}" for v in pre[k]) for k in ("mean", "std"))
        facts.append(("inputs", html.escape(f"image pixels scaled to [0, 1], then (x - mean) / std per channel, mean {mean}, std {std}")))
    if result.metric is not None and result.metric_value is not None:
        facts.append((f"{result.metric} on this data", f"{result.metric_value:.3f}"))
    history = "".join(f"<li>{html.escape(_history_words(step))}</li>" for step in source.history)
    facts.append(("history", f"<ol>{history}</ol>" if history else "none recorded: an original model, not pruned or fixed by explainfix"))
    facts.append(("spectra", html.escape(f"each kernel {_weighting_words(result.saliency_weighted)}")))
    return "\n".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)


def _history_words(step: dict[str, Any]) -> str:
    """One step of a model file's history in words, e.g. how it was pruned."""
    name = str(step.get("step", "step"))
    if name == "finetune":
        return _finetune_words(step)
    if name != "prune":
        details = ", ".join(f"{k} {_rounded(v)}" for k, v in step.items() if k != "step" and isinstance(v, (int, float, str)))
        return f"{name}: {details}" if details else name
    words = f"prune at --pct {step.get('pct')} ({step.get('granularity')} granularity, {step.get('removal')} removal, {step.get('criterion')} saliency)"
    if step.get("params_before") is not None:
        words += f": {step['params_before']:,} → {step['params_after']:,} parameters"
    if step.get("metric") and step.get("metric_before") is not None and step.get("metric_after") is not None:
        words += f", {step['metric']} {step['metric_before']:.3f} → {step['metric_after']:.3f} on the data it was pruned with"
    return words


def _rounded(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _finetune_words(step: dict[str, Any]) -> str:
    """A finetune step: epochs, the metric before and after on the validation data, the teacher."""
    words = f"finetune for {step.get('epochs')} epochs (best epoch {step.get('best_epoch')})"
    if step.get("trainable_params") is not None and step.get("params") is not None:
        words += f", {step['trainable_params']:,} of {step['params']:,} parameters trained"
    before, after = step.get("metric_before"), step.get("metric_after")
    if step.get("metric") and before is not None and after is not None:
        words += f", {step['metric']} {before:.3f} → {after:.3f} on the validation data"
    teacher = step.get("teacher")
    return words + (f", distilled from {teacher}" if teacher else ", no teacher")


def _figure_html(figure: FigureFile) -> str:
    src = html.escape(figure.name)
    # Browsers show PNG and SVG in <img>; a PDF needs an embedded viewer.
    if figure.name.endswith(".pdf"):
        shown = f'<object data="{src}" type="application/pdf" width="900" height="600"></object>'
    else:
        shown = f'<img src="{src}" alt="{html.escape(figure.caption)}">'
    return f"<figure>{shown}<figcaption>{html.escape(figure.caption)}</figcaption></figure>"
