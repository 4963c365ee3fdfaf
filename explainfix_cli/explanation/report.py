"""`explain`: spectra, figures and attributions of a model, written as one report folder."""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from explainfix_cli import progress
from explainfix_cli.data import Dataset
from explainfix_cli.dct import dct2_basis
from explainfix_cli.errors import UserError
from explainfix_cli.explanation import figures
from explainfix_cli.explanation.attributions import METHODS, Attributions
from explainfix_cli.explanation.spectra import LOW_FREQUENCY_DEFINITION, LayerSpectra, layer_spectra
from explainfix_cli.outputs import atomic_dir, check_folder_target
from explainfix_cli.saliency import gradient_weights, require_spatial_convs

SPECTRA_FILE = "spectra.json"
INDEX_FILE = "index.html"


@dataclass(frozen=True)
class FigureFile:
    """A figure in the report folder: its file name there and a one-line caption."""

    name: str
    caption: str


@dataclass
class ExplainResult:
    """What `explain` measured and wrote (PRODUCT.md, `explain --json`)."""

    out: Path
    layers: list[LayerSpectra]
    figures: list[FigureFile]
    saliency_weighted: bool
    seconds: dict[str, float]  # wall time per stage: saliency, spectra, attributions, figures

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
) -> ExplainResult:
    """ExplainSteer spectra of every spatial conv (METHOD.md §5), their figures, and attributions.

    With `data`, kernels are weighted by their saliency (one forward + backward per minibatch)
    and the first `attributions` inputs get an attribution map (`attribution_method`, see
    `attributions.input_attributions`); without it the spectra
    are plain averages. `with_figures=False` writes the numbers only (spectra.json and index.html): no
    figures and no attributions, for a CI job that tracks the spectra. `model` must already be on
    `device`. Everything lands in `out_dir`, which appears only once complete.
    """
    if fmt not in figures.FORMATS:
        raise UserError(f"figure format {fmt!r} is not supported; use one of {', '.join(figures.FORMATS)}.")
    if attributions < 0:
        raise UserError(f"--attributions must be 0 or more, not {attributions}.")
    if attribution_method not in METHODS:
        raise UserError(f"--attribution-method must be one of {', '.join(METHODS)}, not {attribution_method!r}.")
    out_dir = Path(out_dir)
    convs = require_spatial_convs(model)
    check_folder_target(out_dir, force)  # fail before the expensive part, not after it

    seconds: dict[str, float] = {}
    with _timed(seconds, "saliency"):
        weights = gradient_weights(model, data, device) if data is not None else None
    with _timed(seconds, "spectra"):
        layers = [layer_spectra(name, conv.weight, None if weights is None else weights[name]) for name, conv in convs]
    attributed: Attributions | None = None
    if with_figures and data is not None and attributions > 0:
        from explainfix_cli.explanation.attributions import input_attributions

        with _timed(seconds, "attributions"):
            attributed = input_attributions(model, data, attributions, attribution_method, device)

    plan = _figures(layers, convs[0], weights, attributed, fmt, log_scale) if with_figures else []

    # The result shares `seconds`, so the figures' time lands in it when the block below ends.
    result = ExplainResult(out_dir, layers, [figure for figure, _ in plan], weights is not None, seconds)
    with _timed(seconds, "figures"), atomic_dir(out_dir, force) as tmp:
        figures.draw_all([(draw, tmp / figure.name) for figure, draw in plan])
        (tmp / SPECTRA_FILE).write_text(json.dumps(result.spectra_json(), indent=2) + "\n")
        (tmp / INDEX_FILE).write_text(_index_html(result))
    return result


def _figures(
    layers: list[LayerSpectra],
    first: tuple[str, nn.Conv2d],
    weights: dict[str, torch.Tensor] | None,
    attributed: Attributions | None,
    fmt: str,
    log_scale: bool,
) -> list[tuple[FigureFile, figures.Draw]]:
    """Every figure of the report, in order, with the call that draws it."""
    first_name, first_conv = first
    plan = _spectra_figures(layers, fmt, log_scale)
    plan.append(
        (
            FigureFile(f"kernels.{fmt}", f"The kernels of the first spatial layer, {first_name}."),
            partial(figures.draw_kernels, first_name, _array(first_conv.weight)),
        )
    )
    if weights is not None:
        plan.append(
            (
                FigureFile(f"kernel_saliency.{fmt}", f"How much each kernel of {first_name} matters on the data."),
                partial(figures.draw_kernel_saliency, first_name, _array(weights[first_name]), log_scale=log_scale),
            )
        )
    if attributed is not None:
        plan.append(
            (
                FigureFile(f"attributions.{fmt}", f"Input pixels that drive the target output ({attributed.method})."),
                partial(
                    figures.draw_attributions,
                    _array(attributed.images),
                    _array(attributed.attributions),
                    attributed.captions,
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
                    f"Share of each {size} layer's energy on each DCT-II basis vector, low to high frequency "
                    "(ExplainSteer e_d), with totals per layer and per basis vector.",
                ),
                partial(figures.draw_heatmap, group, log_scale=log_scale),
            ),
            (
                FigureFile(
                    f"profile_{size}.{fmt}",
                    f"Vertical, horizontal and combined frequency profile (e_1, e_0) of each {size} layer.",
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
    rows = "\n".join(
        f"<tr><td>{i}</td><td>{html.escape(s.name)}</td><td>{s.kernel_shape[0]}x{s.kernel_shape[1]}</td>"
        f"<td>{s.low_frequency_share:.3f}</td></tr>"
        for i, s in enumerate(result.layers)
    )
    shown = "\n".join(_figure_html(f) for f in result.figures) or "<p>No figures (written with --no-figures).</p>"
    weighting = "weighted by kernel saliency on the data" if result.saliency_weighted else "unweighted (no data)"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>explainfix explain</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:auto}} img{{max-width:100%}}
td,th{{padding:2px 8px;text-align:left}} figure{{margin:2em 0}}</style></head>
<body><h1>Which spatial frequencies each layer uses</h1>
<p>ExplainSteer spectra, {weighting}. Numbers: <a href="{SPECTRA_FILE}">{SPECTRA_FILE}</a>.
Low-frequency share: {html.escape(LOW_FREQUENCY_DEFINITION)}.</p>
<table><tr><th>depth</th><th>layer</th><th>kernel</th><th>low-frequency share</th></tr>
{rows}
</table>
{shown}
</body></html>
"""


def _figure_html(figure: FigureFile) -> str:
    src = html.escape(figure.name)
    # Browsers show PNG and SVG in <img>; a PDF needs an embedded viewer.
    if figure.name.endswith(".pdf"):
        shown = f'<object data="{src}" type="application/pdf" width="900" height="600"></object>'
    else:
        shown = f'<img src="{src}" alt="{html.escape(figure.caption)}">'
    return f"<figure>{shown}<figcaption>{html.escape(figure.caption)}</figcaption></figure>"
