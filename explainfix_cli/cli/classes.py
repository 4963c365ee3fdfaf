"""`classes` and `extract`: class-specific channels (docs/method.md §6)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from explainfix_cli.cli.options import (
    CheckFractionOpt,
    DataOpt,
    ForceOpt,
    ModelArg,
    flag,
    shared_options,
)
from explainfix_cli.cli.render import (
    stdout_console,
    working,
)
from explainfix_cli.cli.run import (
    Inputs,
    check_paths,
)
from explainfix_cli.errors import UserError

if TYPE_CHECKING:
    from explainfix_cli.io.checkpoints import LoadedModel
    from explainfix_cli.io.data import Dataset


def _require_data(data: Path | None, o: Inputs, model: LoadedModel) -> Dataset:
    dataset = o.load_data(data, model)
    if dataset is None:
        raise UserError("this command needs data with class labels: pass --data D.")
    return dataset


@shared_options('model', 'data', 'run')
def classes(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Folder to write classes.json and the figures into (a non-empty folder needs --force; only these files are replaced).")],
    data: DataOpt = None,
    share: Annotated[float, typer.Option("--share", help="Share of a class's positive importance its needed channels must reach.")] = 0.9,
    bins: Annotated[int, typer.Option("--bins", help="Quantile bins of each channel's pooled activation for the mutual information.")] = 8,
    with_figures: Annotated[bool, flag("--figures/--no-figures", help="Draw the heatmap and the channels-needed figure.")] = True,
    force: ForceOpt = False,
    o: Inputs = Inputs(),  # the shared options (shared_options)
) -> None:
    """Which channels serve which class (docs/method.md §6): importance, channels needed, MI specificity."""

    def body() -> None:
        check_paths(model, data)
        o.check_batches()
        o.setup()
        from explainfix_cli.classes.analysis import classes as analyse

        loaded = o.load_model(model)
        dataset = _require_data(data, o, loaded)
        with working("analysing classes"):
            result = analyse(loaded.model.to(o.device), dataset, out, share=share, bins=bins, with_figures=with_figures, force=force, device=o.device)

        def render() -> None:
            from rich.table import Table

            table = Table(title=f"classes → {out}")
            for col in ("layer", "channels", "specificity (bits)", f"channels needed for {share:.0%} per class"):
                table.add_column(col)
            for layer in result.layers:
                table.add_row(layer.name, str(layer.channels), f"{layer.specificity:.3f}", " ".join(map(str, layer.channels_needed)))
            stdout_console().print(table)
            d = result.decomposition
            if d is not None:
                stdout_console().print(f"decomposed classifier ({d.classifier}, needed inputs only): {d.metric} {d.metric_decomposed}, full model {d.metric_full}")
            stdout_console().print(f"specificity score ({result.specificity_layer}): {result.specificity:.4f} bits")

        o.emit(result.to_json(), render)

    o.run(body)


def _render_extract(report: Any, target: int, target_path: Path) -> None:
    from rich.table import Table

    table = Table(title=f"extract class {target} → {target_path}  (keep {report.keep:.4g})")
    for col in ("", "params", "MACs", "AUC", "acc.", "val AUC", "val acc.", *(("check AUC",) if report.check else ())):
        table.add_column(col, justify="right")

    def number(value: float | None) -> str:
        return "" if value is None else f"{value:.4f}"

    for which, params, macs in (("full", report.params_before, report.macs_before), ("extracted", report.params_after, report.macs_after)):
        d, v, c = report.data[which], (report.val or {}).get(which), (report.check or {}).get(which)
        checked = (number(c and c.auc),) if report.check else ()
        table.add_row(which, f"{params:,}", f"{macs:,}", number(d.auc), number(d.accuracy), number(v and v.auc), number(v and v.accuracy), *checked)
    stdout_console().print(table)
    if report.check is not None:
        full, sub = report.data["full"].auc, report.data["extracted"].auc
        chose = "" if full is None or sub is None else f"; on the samples that chose: {full - sub:+.4f}"
        stdout_console().print(f"the AUC drop checked on {report.check_samples} samples kept out of scoring and choosing: {report.check_auc_drop:+.4f}{chose}.")
    if report.check_note:
        print(f"explainfix: {report.check_note}", file=sys.stderr)


@shared_options('model', 'data', 'run')
def extract(
    model: ModelArg,
    target: Annotated[int, typer.Option("--class", help="The class to keep (its index in the model's outputs).")],
    data: DataOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output .safetensors (default: MODEL-classK.safetensors beside the input).")] = None,
    keep: Annotated[float | None, typer.Option("--keep", help="Share of the one-vs-rest importance kept in every coupled channel group, in [0, 1].")] = None,
    max_drop: Annotated[float | None, typer.Option("--max-drop", help="Instead of --keep: the largest one-vs-rest AUC drop allowed on --data and on the check split (greedy cut, re-scored after each step).")] = None,
    val: Annotated[Path | None, typer.Option("--val", help="Held-out data to report the sub-model's AUC and accuracy on; with --max-drop, the check split the drop must also hold on.")] = None,
    check_fraction: CheckFractionOpt = None,
    drop_margin: Annotated[float | None, typer.Option("--drop-margin", help="With --max-drop: a cut stays when its AUC drop plus this many standard errors (DeLong) is within X (default 4); 0: the drop alone (larger cuts that hold less often on other samples).", show_default=False)] = None,
    force: ForceOpt = False,
    o: Inputs = Inputs(),  # the shared options (shared_options)
) -> None:
    """A one-vs-rest sub-model for one class, without the channels it does not need (docs/method.md §6)."""

    def body() -> None:
        if keep is None and max_drop is None:
            raise UserError("pass --keep F (share of the class's importance to keep) or --max-drop X (largest AUC drop).")
        if keep is not None and max_drop is not None:
            raise UserError("pass --keep or --max-drop, not both.")
        if check_fraction is not None and max_drop is None:
            raise UserError("--check-fraction keeps a part of --data to check a --max-drop limit on; give --max-drop X, or drop --check-fraction.")
        target_path = out or model.with_name(f"{model.stem}-class{target}.safetensors")
        check_paths(model, data, val)
        o.check_batches()
        o.setup()
        from explainfix_cli.classes.extract import extract as extract_class

        loaded = o.load_model(model)
        dataset = _require_data(data, o, loaded)
        held_out = o.load_data(val, loaded, every_batch=True)
        check = None
        if max_drop is not None:  # the drop must hold on samples that chose nothing
            from explainfix_cli.search.holdout import check_split

            split = check_split(dataset, held_out, check_fraction, o.seed)
            dataset, check = split.calibration, split.check
        with working(f"extracting class {target}"):
            _, report = extract_class(
                loaded.model.to(o.device), dataset, target, keep=keep, max_drop=max_drop, **({} if drop_margin is None else {"drop_margin": drop_margin}), val=held_out, check=check, arch=loaded.arch,
                history=loaded.history, out=target_path, force=force, device=o.device,
            )

        o.emit(report.to_json(), lambda: _render_extract(report, target, target_path))

    o.run(body)

