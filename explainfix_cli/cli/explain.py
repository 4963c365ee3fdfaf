"""`explain`: which spatial frequencies each layer uses (ExplainSteer, docs/method.md §5)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from explainfix_cli.cli.options import (
    AttributionOpt,
    DataOpt,
    FigureFormat,
    ForceOpt,
    ModelArg,
    flag,
    shared_options,
)
from explainfix_cli.cli.render import (
    key_value_table,
    working,
)
from explainfix_cli.cli.run import (
    Inputs,
    check_paths,
    explicit_preprocessing,
    folder_preprocessing,
)
from explainfix_cli.errors import check_pct

if TYPE_CHECKING:
    pass


@shared_options('model', 'data', 'run')
def explain(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Folder to write the figures, spectra.json and index.html to.")],
    data: DataOpt = None,
    fmt: Annotated[FigureFormat, typer.Option("--format", help="Figure file format.")] = FigureFormat.png,
    attributions: Annotated[int, typer.Option("--attributions", help="Inputs to show attribution maps for (needs --data; 0 for none).")] = 4,
    attribution_method: Annotated[AttributionOpt, typer.Option("--attribution-method", help="saliency (input gradient, one backward pass) or integrated-gradients (more faithful, 32 passes per input).")] = AttributionOpt.saliency,
    log_scale: Annotated[bool, flag("--log-scale", help="Logarithmic colour scale in the spectra heatmaps (the kernel-saliency figure always has one).")] = False,
    pct: Annotated[float, typer.Option("--pct", help="Mark in the kernel-saliency figure the kernels `explainfix prune --pct P` would zero.")] = 50.0,
    with_figures: Annotated[bool, flag("--figures/--no-figures", help="Draw the figures and attributions; --no-figures writes spectra.json and index.html only (fast, for CI).")] = True,
    force: ForceOpt = False,
    o: Inputs = Inputs(),  # the shared options (shared_options)
) -> None:
    """Which spatial frequencies each layer uses (ExplainSteer, docs/method.md §5): figures, spectra and attributions."""

    def body() -> None:
        from explainfix_cli.io.outputs import check_folder_target

        check_folder_target(out, force)
        check_paths(model, data)
        o.check_batches()
        explicit_preprocessing(data, o.mean, o.std)
        check_pct("pct", pct)
        o.setup()
        from explainfix_cli.explanation import ReportSource
        from explainfix_cli.explanation import explain as explain_model

        loaded = o.load_model(model)
        dataset = o.load_data(data, loaded)
        with working("explaining"):
            result = explain_model(
                loaded.model.to(o.device), dataset, out, fmt=fmt.value, attributions=attributions, attribution_method=attribution_method.value, force=force,
                log_scale=log_scale, with_figures=with_figures, device=o.device, pct=pct, source=ReportSource(
                    model=str(model), arch=loaded.arch.to_json() if loaded.arch else None, data=None if data is None else str(data), history=loaded.history,
                    preprocessing=folder_preprocessing(data, o.mean, o.std, loaded),
                ),
            )
        for note in result.notes:
            print(f"explainfix: note: {note}", file=sys.stderr)
        shares = [(s.name, f"{'x'.join(map(str, s.kernel_shape))}  low-frequency share {s.low_frequency_share:.2f}") for s in result.layers]
        o.emit(result.to_json(), lambda: key_value_table(f"explain → {out / 'index.html'}", shares))

    o.run(body)

