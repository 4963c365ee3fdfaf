"""`export`: a deployable ONNX file or torch.export program, checked against the model before it is written (docs/export.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from explainfix_cli import choices
from explainfix_cli.cli.options import DataOpt, ForceOpt, InputSizeOpt, ModelArg, choice, flag, shared_options
from explainfix_cli.cli.render import key_value_table, stderr_console, working
from explainfix_cli.cli.run import Inputs, check_paths, explicit_preprocessing, parse_input_size
from explainfix_cli.errors import UserError

ExportFormatOpt = choice("ExportFormatOpt", choices.ExportFormat)
QuantizeOpt = choice("QuantizeOpt", choices.Quantization)


@shared_options('model', 'data', 'run')
def export(
    model: ModelArg,
    format: Annotated[ExportFormatOpt, typer.Option("--format", help="onnx (run by onnxruntime; needs pip install explainfix\\[export]) or pt2 (a torch.export program, torch.export.load reads it).", show_default=False)],  # type: ignore[valid-type]
    out: Annotated[Path, typer.Option("--out", help="The file to write (.onnx or .pt2); written only once it matches the model.", show_default=False)],
    input_size: InputSizeOpt = None,
    deployment_form: Annotated[bool, typer.Option("--deployment-form/--no-deployment-form", help="Fold batch norms into the convolutions before exporting, as bench's deployment form does.")] = True,
    quantize: Annotated[QuantizeOpt | None, typer.Option("--quantize", help="int8: post-training static quantisation (ONNX, QDQ), calibrated on --data.", show_default=False)] = None,  # type: ignore[valid-type]
    per_channel: Annotated[bool, flag("--per-channel", help="With --quantize: one int8 weight scale per output channel instead of per tensor.")] = False,
    val: Annotated[Path | None, typer.Option("--val", help="Held-out data: the metric of the model and of the written file, before and after.")] = None,
    data: DataOpt = None,
    force: ForceOpt = False,
    o: Inputs = Inputs(),  # the shared options (shared_options)
) -> None:
    """A deployable file (ONNX or torch.export), run and checked against the model before it is written; --quantize int8 with --data."""

    def body() -> Any:
        check_paths(model, data=data, val=val)
        if quantize is not None and data is None:
            raise UserError("--quantize int8 calibrates on the model's inputs; pass them with --data CALIB.")
        if data is not None and quantize is None:
            raise UserError("--data is the calibration data of --quantize int8; pass --quantize int8 too, or --val to measure the metric.")
        explicit_preprocessing(data, o.mean, o.std)
        from explainfix_cli.export.pipeline import export as export_model
        from explainfix_cli.io.outputs import check_target

        check_target(out, force)  # before any work
        o.setup()
        loaded = o.load_model(model)
        size = parse_input_size(input_size) or loaded.input_size
        if size is None:
            raise UserError(f"{model} does not record its input size; pass --input-size C,H,W.")
        calib, held_out = o.load_data(data, loaded), o.load_data(val, loaded, every_batch=True)
        with working(f"exporting to {format.value}"):
            report = export_model(
                loaded.model, format.value, out, input_shape=size, deployment_form=deployment_form,
                quantize=quantize.value if quantize else None, calib=calib, val=held_out, seed=o.seed, force=force,
                per_channel=per_channel, history=loaded.history, preprocessing=loaded.preprocessing,
            )

        def render() -> None:
            r = report
            check = f"{r.max_abs_diff:.3g} (tolerance {r.tolerance:.3g})" if r.tolerance is not None else f"{r.max_abs_diff:.3g} (int8: judged by the metric on --val)"
            rows: list[tuple[str, Any]] = [("format", r.format + (f", opset {r.opset}" if r.opset else "")), ("input", "Nx" + "x".join(map(str, r.input_size)) + " (N dynamic)"),
                                           ("batch norms folded", r.folded_batch_norms), ("max |difference| at batch 1 and 3", check), ("file bytes", r.file_bytes)]
            if r.float_file_bytes:
                rows.append(("float ONNX file bytes", r.float_file_bytes))
            if r.metric:
                rows += [(f"{r.metric} of the model on --val", r.metric_before), (f"{r.metric} of the file on --val", r.metric_after)]
            key_value_table(f"exported {model} to {r.out}", rows)
            for note in r.notes:
                stderr_console().print(note)

        o.emit(report.to_json(), render)
        return report

    o.run(body)
