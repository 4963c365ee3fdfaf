"""`prune` and `sweep` (docs/method.md §1-3): prune at a pct or to a target (--max-drop, --max-params,
--max-macs, optionally fine-tuning each candidate), and the trade-off at several pcts."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from explainfix_cli import distributed
from explainfix_cli.cli.options import (
    CheckFractionOpt,
    CriterionOpt,
    DataOpt,
    FigureFormat,
    FillOpt,
    FinetuneEpochsOpt,
    ForceOpt,
    Granularity,
    InputSizeOpt,
    LatencyForm,
    MaxDropOpt,
    MaxMacsOpt,
    MaxParamsOpt,
    ModelArg,
    RemovalOpt,
    TrainDataOpt,
    flag,
    shared_options,
)
from explainfix_cli.cli.render import (
    columns_table,
    render_prune,
    render_target,
    working,
)
from explainfix_cli.cli.run import (
    Inputs,
    check_paths,
    explicit_preprocessing,
    needs_data,
    override_preprocessing,
    parse_input_size,
)
from explainfix_cli.errors import UserError, check_pct

if TYPE_CHECKING:
    from explainfix_cli.io.data import Dataset


def _check_finetune_each(epochs: int, train: Path | None, data: Path | None) -> None:
    if epochs < 0:
        raise UserError(f"--finetune-epochs must be 0 or more, not {epochs}.")
    if (epochs > 0) != (train is not None):
        raise UserError("--finetune-epochs K and --train T go together: fine-tuning each pruned model needs training data.")
    if epochs > 0 and data is None:
        raise UserError("--finetune-epochs keeps each fine-tune's best epoch by the metric on --data: pass --data D.")


def _finetune_each(o: Inputs, loaded: Any, train: Path, val: Dataset, epochs: int, *, fix: bool = True) -> Any:
    """The `adapt` of `sweep` and `prune_to_target`, as `prune` → `finetune` would do it: the spatial
    filters fixed (unless not `fix`), the rest trained `epochs` epochs on `train` with the unpruned
    model as teacher, the best epoch by the metric on `val`; returns the fine-tune's history step."""
    from explainfix_cli.training.finetune import Recipe, finetune
    from explainfix_cli.training.fixed import fix_spatial_filters

    training = o.load_data(train, loaded, every_batch=True)
    teacher = copy.deepcopy(loaded.model)  # every pruned model learns from the unpruned one

    def adapt(pruned: Any) -> dict[str, Any]:
        if fix:
            fix_spatial_filters(pruned)
        return finetune(pruned, training, val, recipe=Recipe(epochs=epochs, seed=o.seed), teacher=teacher, device=o.device)[1].history_step()

    return adapt


def _target(pct: float | None, max_drop: float | None, max_params: int | None, max_macs: int | None) -> Any:
    if max_drop is None and max_params is None and max_macs is None:
        return None  # without importing torch: a plain prune's argument checks answer at once
    if pct is not None:
        raise UserError("--pct and a target (--max-drop, --max-params, --max-macs) are alternatives; give one of them.")
    from explainfix_cli.search.target import Target

    return Target(max_drop, max_params, max_macs)


def _prune_to_target(model: Any, data: Dataset | None, target: Any, options: dict[str, Any]) -> Any:
    """A target no pct meets is a correct request that cannot be satisfied: one sentence, exit 1."""
    from explainfix_cli.search.target import TargetNotMet, prune_to_target

    try:
        return prune_to_target(model, data, target, **options)
    except TargetNotMet as e:
        print(f"explainfix: failed: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def _check_prune(pct: float | None, goal: Any, min_kernels_per_layer: int, finetune_epochs: int, train: Path | None, data: Path | None, check_fraction: float | None) -> None:
    """prune's own argument checks, before torch is imported."""
    if pct is not None:
        check_pct("pct", pct)
    if min_kernels_per_layer < 0:
        raise UserError(f"--min-kernels-per-layer must be 0 or more, not {min_kernels_per_layer}.")
    _check_finetune_each(finetune_epochs, train, data)
    if check_fraction is not None and (goal is None or goal.max_drop is None):
        raise UserError("--check-fraction keeps a part of --data to check a --max-drop target on; give --max-drop X, or drop --check-fraction.")
    if finetune_epochs > 0 and goal is None:
        raise UserError("--finetune-epochs meets a target after fine-tuning (--max-drop, --max-params, --max-macs); to fine-tune a model pruned at a --pct, run `explainfix finetune` on it.")


def _prune_or_search(model: Any, dataset: Dataset | None, pct: float | None, goal: Any, options: dict[str, Any], adapt: Callable[[], Any] | None) -> dict[str, Any]:
    """Prune at `pct` (default 50) or to the target `goal` (fine-tuning each candidate with `adapt()`'s
    function when given); prints the report's warnings, returns the JSON payload."""
    from explainfix_cli.pruning.alternatives import prune_with_alternatives
    from explainfix_cli.pruning.pipeline import PruneSettings

    advice = None
    with working("pruning"):
        if goal is None:
            _, report, advice = prune_with_alternatives(model, dataset, PruneSettings(pct=50.0 if pct is None else pct, **options))
        else:
            if adapt is not None:
                options["adapt"] = adapt()
            found = _prune_to_target(model, dataset, goal, options)
            report = found.report
    for warning in report.warnings():
        print(f"explainfix: warning: {warning}", file=sys.stderr)
    if advice is None:
        return {**found.to_json(), "alternatives": [], "recommendation": None}
    if (line := advice.line(report)) is not None:
        print(f"explainfix: note: {line}", file=sys.stderr)
    return {**report.to_json(), **advice.to_json()}


def _carve_check(goal: Any, dataset: Dataset | None, held_out: Dataset | None, fraction: float | None, seed: int) -> tuple[Dataset | None, dict[str, Any]]:
    """With --max-drop, the drop must hold on samples that chose nothing: (the calibration part, {"check": the check split})."""
    if goal is None or goal.max_drop is None or dataset is None:
        return dataset, {}
    from explainfix_cli.search.holdout import check_split

    split = check_split(dataset, held_out, fraction, seed)
    return split.calibration, {"check": split.check}


@shared_options('model', 'data', 'run')
def prune(
    model: ModelArg,
    data: DataOpt = None,
    val: Annotated[Path | None, typer.Option("--val", help="Held-out data the prune never sees: the removal's change and the metrics are measured on it too; with --max-drop, the check split the drop must also hold on.")] = None,
    pct: Annotated[float | None, typer.Option("--pct", help="Percentage of spatial kernels to zero, in [0, 100) (default 50, or chosen by a target).", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output .safetensors (default: MODEL-pruned.safetensors beside the input).")] = None,
    granularity: Annotated[Granularity, typer.Option("--granularity", help="kernel: zero kernels, remove dead channels. channel: remove the least salient channels.")] = Granularity.kernel,
    saliency_file: Annotated[Path | None, typer.Option("--saliency", help="Reuse scores written by `explainfix saliency`.")] = None,
    criterion: Annotated[CriterionOpt, typer.Option("--criterion", help="gradient (needs --data) or the data-free magnitude fallback.")] = CriterionOpt.gradient,
    fill: Annotated[FillOpt, typer.Option("--fill", help="Zeroed kernels that stay: keep zero, reset to old values, or fillzero re-initialise.")] = FillOpt.zero,
    removal: Annotated[RemovalOpt, typer.Option("--removal", help="exact: only removals that leave the output unchanged for every input. calibrated: also channels constant on --data only (check with --val). aggressive: also silent channels, unfolded, as the paper did (fine-tune afterwards).")] = RemovalOpt.exact,
    no_fix: Annotated[bool, flag("--no-fix", help="Leave spatial filters trainable in the output.")] = False,
    min_kernels_per_layer: Annotated[int, typer.Option("--min-kernels-per-layer", help="Keep the K most salient kernels of every spatial layer out of zeroing, against layer collapse (0: pure global ranking).")] = 0,
    max_drop: MaxDropOpt = None,
    max_params: MaxParamsOpt = None,
    max_macs: MaxMacsOpt = None,
    check_fraction: CheckFractionOpt = None,
    finetune_epochs: FinetuneEpochsOpt = 0,
    train: TrainDataOpt = None,
    input_size: InputSizeOpt = None,
    force: ForceOpt = False,
    o: Inputs = Inputs(),  # the shared options (shared_options)
) -> None:
    """Zero the least salient spatial kernels, remove dead channels, write a smaller fixed-filter model."""

    def body() -> None:
        from explainfix_cli.io.outputs import check_target

        goal = _target(pct, max_drop, max_params, max_macs)
        _check_prune(pct, goal, min_kernels_per_layer, finetune_epochs, train, data, check_fraction)
        if saliency_file is None:
            needs_data(criterion, data)
        target = out or model.with_name(f"{model.stem}-pruned.safetensors")
        check_target(target, force)
        check_paths(model, data, val, train)
        o.check_batches()
        explicit_preprocessing(data, o.mean, o.std)
        o.setup()
        distributed.setup(o.device)  # under torchrun the saliency pass is shared; process 0 writes
        loaded = o.load_model(model)
        dataset = o.load_data(data, loaded)
        from explainfix_cli.saliency import load_saliency

        scores, scored_by = load_saliency(str(saliency_file), loaded.model) if saliency_file else (None, criterion.value)
        held_out = o.load_data(val, loaded, every_batch=True)
        dataset, checking = _carve_check(goal, dataset, held_out, check_fraction, o.seed)
        options: dict[str, Any] = {
            "granularity": granularity.value, "criterion": scored_by, "scores": scores, "fill": fill.value, "removal": removal.value,
            "fix": not no_fix, "arch": loaded.arch, "history": loaded.history, "out": target, "force": force, "seed": o.seed,
            "device": o.device, "sample_shape": parse_input_size(input_size), "val": held_out,
            "preprocessing": override_preprocessing(loaded.preprocessing, explicit_preprocessing(data, o.mean, o.std)), "min_kernels_per_layer": min_kernels_per_layer,
            **checking,
        }  # fmt: skip
        adapt = (lambda: _finetune_each(o, loaded, train, dataset, finetune_epochs, fix=not no_fix)) if train is not None and finetune_epochs > 0 else None
        payload = _prune_or_search(loaded.model, dataset, pct, goal, options, adapt)
        o.emit(payload, lambda: render_prune(payload) if goal is None else render_target(payload))

    o.run(body)



@shared_options('model', 'data', 'run')
def sweep(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Folder for sweep.json, sweep.csv and the figure (made if missing; with --force only those files are replaced).")],
    data: DataOpt = None,
    pcts: Annotated[str, typer.Option("--pcts", help="Comma-separated percentages of spatial kernels to zero, each in [0, 100).")] = "0,50,80,90,95,99",
    granularity: Annotated[Granularity, typer.Option("--granularity", help="kernel: zero kernels, remove dead channels. channel: remove the least salient channels.")] = Granularity.kernel,
    criterion: Annotated[CriterionOpt, typer.Option("--criterion", help="gradient (docs/method.md §1) or the data-free magnitude fallback.")] = CriterionOpt.gradient,
    removal: Annotated[RemovalOpt, typer.Option("--removal", help="exact, calibrated or aggressive channel removal, as in prune.")] = RemovalOpt.exact,
    latency_repeats: Annotated[int, typer.Option("--latency-repeats", help="Timed forwards per model at batch 1 (median reported); 0 skips latency, making the files identical across runs.")] = 30,
    latency_form: Annotated[LatencyForm, typer.Option("--latency-form", help="Time the model as written (eager) or its deployment form: batch norms folded, channels-last, as bench measures it.")] = LatencyForm.eager,
    fmt: Annotated[FigureFormat, typer.Option("--format", help="Figure file format.")] = FigureFormat.png,
    finetune_epochs: FinetuneEpochsOpt = 0,
    train: TrainDataOpt = None,
    force: ForceOpt = False,
    o: Inputs = Inputs(),  # the shared options (shared_options)
) -> None:
    """The metric / parameters / MACs / latency trade-off at several pcts, from one saliency pass."""

    def body() -> None:
        from explainfix_cli.io.outputs import check_folder_target

        try:
            values = [float(p) for p in pcts.split(",")]
        except ValueError:
            raise UserError(f"--pcts must be comma-separated numbers, e.g. 0,50,90, not {pcts!r}.") from None
        if data is None:
            raise UserError("sweep measures the metric at each pct: pass --data D.")
        _check_finetune_each(finetune_epochs, train, data)
        check_folder_target(out, force)
        check_paths(model, data, train=train)
        o.check_batches()
        o.setup()
        from explainfix_cli.search.sweep import sweep as sweep_model

        loaded = o.load_model(model)
        dataset = o.load_data(data, loaded)
        adapt = None if train is None or finetune_epochs == 0 else _finetune_each(o, loaded, train, dataset, finetune_epochs)
        with working("sweeping"):
            result = sweep_model(
                loaded.model, dataset, values, out_dir=out, criterion=criterion.value, granularity=granularity.value, removal=removal.value,  # type: ignore[arg-type]
                latency_repeats=latency_repeats, latency_form=latency_form.value, fmt=fmt.value, force=force, device=o.device, adapt=adapt,  # type: ignore[arg-type]
            )

        def render() -> None:
            def num(v: float | None, spec: str) -> str:
                return "" if v is None else format(v, spec)

            rows = [
                ["unpruned" if p.pct is None else f"{p.pct:g}", f"{p.params:,}", f"{p.macs:,}", f"{p.nonzero_spatial_kernels:,}",
                 num(p.metric, ".4f"), num(p.metric_drop, "+.4f"), num(p.latency_ms, ".3f")]
                for p in [result.baseline, *result.points]
            ]  # fmt: skip
            columns_table(f"sweep → {out}", ["pct", "params", "MACs", "nonzero kernels", result.metric or "metric", "drop", "latency ms"], rows)

        o.emit(result.to_json(), render)

    o.run(body)

