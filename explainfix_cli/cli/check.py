"""`evaluate` and `bench`: measurements with CI gates (a gate not met: one sentence, exit 1)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from explainfix_cli.cli.options import (
    DataOpt,
    ModelArg,
    VsOpt,
    shared_options,
)
from explainfix_cli.cli.render import (
    gate_verdict,
    side_by_side,
    stderr_console,
    working,
)
from explainfix_cli.cli.run import (
    Inputs,
    explicit_preprocessing,
    parse_input_size,
)
from explainfix_cli.errors import UserError

if TYPE_CHECKING:
    pass


@shared_options('model', 'data', 'run')
def evaluate(
    model: ModelArg,
    data: DataOpt = None,
    vs: VsOpt = None,
    min_metric: Annotated[float | None, typer.Option("--min-metric", help="Gate: exit 1 unless the model's metric is at least this.")] = None,
    max_drop: Annotated[float | None, typer.Option("--max-drop", help="Gate (with --vs): exit 1 if the model's metric is more than this below OTHER's.")] = None,
    o: Inputs = Inputs(),  # the shared options (shared_options)
) -> None:
    """The target's metric (accuracy, AUC, dice) and loss on the data, optionally against --vs; CI gates exit 1."""

    def body() -> Any:
        from explainfix_cli.evaluation.scores import check_gate_limits
        from explainfix_cli.evaluation.scores import evaluate as evaluate_model

        if data is None:
            raise UserError("evaluate needs data: pass --data D.")
        if max_drop is not None and vs is None:
            raise UserError("--max-drop compares with another model; pass it with --vs OTHER.")
        check_gate_limits(min_metric, max_drop)  # before any model is loaded
        explicit_preprocessing(data, o.mean, o.std)
        o.setup()
        loaded = o.load_model(model, eager=False)  # an exported .onnx / .pt2 runs as it ships (docs/export.md)
        other = o.load_model(vs, eager=False).model.to(o.device) if vs else None
        dataset = o.load_data(data, loaded)
        with working("evaluating"):
            report = evaluate_model(loaded.model.to(o.device), dataset, name=str(model), vs=other, vs_name=str(vs), min_metric=min_metric, max_drop=max_drop, device=o.device)

        def render() -> None:
            runs = [report.model] if report.vs is None else [report.model, report.vs]
            r0 = runs[0]
            rows: list[tuple[str, list[Any]]] = [("samples", [r.samples for r in runs]), (r0.metric, [r.value for r in runs]), (f"loss ({r0.loss_name})", [r.loss for r in runs])]
            if r0.target == "labels":
                names = r0.classes or [str(k) for k in range(len(r0.per_class_accuracy or []))]
                rows += [(f"accuracy of class {c}", [(r.per_class_accuracy or [])[k] for r in runs]) for k, c in enumerate(names)]
            elif r0.target == "multilabel":
                rows += [(f"AUC of label {k}", [(r.auc_per_label or [])[k] for r in runs]) for k in range(len(r0.auc_per_label or []))]
            else:
                rows += [("IoU", [r.iou for r in runs])]
            if report.drop is not None:
                rows.append((f"{r0.metric} drop against --vs", [report.drop] + [None] * (len(runs) - 1)))
            side_by_side(f"evaluate on {data}", [r.model for r in runs], rows)
            for r in runs:
                if r.confusion_matrix is not None:
                    side_by_side(f"confusion matrix of {r.model} (rows: true class, columns: predicted)", [str(k) for k in range(len(r.confusion_matrix))], [(str(k), list(row)) for k, row in enumerate(r.confusion_matrix)])

        o.emit(report.to_json(), render)
        return report

    gate_verdict(o.run(body).gates)


def _render_bench(report: Any) -> None:
    """bench's table: each model, form and batch side by side (with their ratio against --vs), then notes and gates."""
    runs = [report.model] if report.vs is None else [report.model, report.vs]
    labels = {"params": "parameters", "macs": "MACs per sample", "file_bytes": "file bytes", "peak_memory_bytes": "peak memory bytes"}
    keys = [*labels, *(f"latency_{k}" for k in report.model.latency_ms)]

    def label(key: str) -> str:
        return labels.get(key) or "latency ms, " + key.removeprefix("latency_").replace("_", " ").replace("batch n", f"batch {report.batch_size}")

    def value(r: Any, key: str) -> Any:
        return r.latency_ms[key.removeprefix("latency_")] if key.startswith("latency_") else getattr(r, key)

    ratio = (lambda key: [report.ratios.get(key)]) if report.ratios else (lambda key: [])
    rows = [(label(k), [value(r, k) for r in runs] + ratio(k)) for k in keys]
    rows.append(("batch norms folded", [r.folded_batch_norms for r in runs] + ratio("")))
    names = [r.model for r in runs] + (["ratio"] if report.ratios else [])
    load = "" if report.load_average is None else f", load {report.load_average:.1f}"
    side_by_side(f"bench at {'x'.join(map(str, report.input_size))}, {report.threads} threads{load}, median of {report.repeats}", names, rows)
    for r in runs:
        if r.deployment_note:
            stderr_console().print(f"{r.model}: {r.deployment_note}")


@shared_options('model', 'run')
def bench(
    model: ModelArg,
    vs: VsOpt = None,
    input_size: Annotated[str | None, typer.Option("--input-size", help="Input size C,H,W; needed when the file does not remember one (a pruned file does).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="The larger batch N that latency is also measured at (besides batch 1).")] = 16,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs per model, form and batch; the median is reported.")] = 30,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs before the timed ones.")] = 3,
    threads: Annotated[int | None, typer.Option("--threads", help="Intra-op CPU threads (default: the cores the machine's load leaves free, 1 to 4); the count used is reported.")] = None,
    max_latency_ms: Annotated[float | None, typer.Option("--max-latency-ms", help="Gate: exit 1 if the median latency at batch 1, as written, is above this.")] = None,
    max_params: Annotated[int | None, typer.Option("--max-params", help="Gate: exit 1 if the model has more parameters.")] = None,
    max_macs: Annotated[int | None, typer.Option("--max-macs", help="Gate: exit 1 if the model needs more MACs per sample.")] = None,
    o: Inputs = Inputs(),  # the shared options (shared_options)
) -> None:
    """Parameters, MACs, file size, peak memory and latency, as written and in deployment form; CI gates exit 1."""

    def body() -> Any:
        from explainfix_cli.evaluation.bench import bench as bench_model
        from explainfix_cli.evaluation.bench import check_gate_limits

        for flag, value in (("--batch-size", batch_size), ("--repeats", repeats), ("--threads", threads or 1)):
            if value < 1:
                raise UserError(f"{flag} must be at least 1, not {value}.")
        if warmup < 0:
            raise UserError(f"--warmup must be 0 or more, not {warmup}.")
        if o.device != "cpu":
            raise UserError("bench measures CPU latency; run it with --device cpu.")
        check_gate_limits(max_latency_ms, max_params, max_macs)  # before any model is loaded
        o.setup()
        loaded = o.load_model(model, eager=False)  # an exported .onnx / .pt2 runs as it ships (docs/export.md)
        other = o.load_model(vs, eager=False) if vs else None
        size = parse_input_size(input_size) or loaded.input_size or (other.input_size if other else None)
        if size is None:
            raise UserError(f"{model} does not record its input size; pass --input-size C,H,W.")
        with working("benchmarking"):
            report = bench_model(
                loaded.model, size, name=str(model), path=model, vs=other.model if other else None, vs_name=str(vs), vs_path=vs,
                batch_size=batch_size, repeats=repeats, warmup=warmup, threads=threads, seed=o.seed,
                max_latency_ms=max_latency_ms, max_params=max_params, max_macs=max_macs,
            )

        for note in report.notes:  # e.g. a busy machine: with --json too
            print(f"explainfix: note: {note}", file=sys.stderr)
        o.emit(report.to_json(), lambda: _render_bench(report))
        return report

    gate_verdict(o.run(body).gates)
