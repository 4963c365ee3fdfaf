"""`info` and `saliency`: what a model file holds, and its kernel saliency (docs/method.md §1)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from explainfix_cli import distributed
from explainfix_cli.cli.options import (
    CriterionOpt,
    DataOpt,
    DebugOpt,
    ForceOpt,
    InputSizeOpt,
    JsonOpt,
    ModelArg,
    shared_options,
)
from explainfix_cli.cli.render import (
    emit,
    key_value_table,
    stdout_console,
    working,
)
from explainfix_cli.cli.run import (
    Inputs,
    check_paths,
    explicit_preprocessing,
    needs_data,
    parse_input_size,
    run_body,
)

if TYPE_CHECKING:
    pass


@shared_options('model')
def info(
    model: ModelArg,
    input_size: InputSizeOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
    o: Inputs = Inputs(),  # the shared options (shared_options)
) -> None:
    """Layers, parameters, spatial kernels, fixed tensors, MACs and the file's metadata."""

    def body() -> None:
        check_paths(model)
        from explainfix_cli.evaluation.info import describe

        result = describe(o.load_model(model, eager=False), parse_input_size(input_size))

        def render() -> None:
            from rich.table import Table

            table = Table(title=f"{result.path}")
            for col in ("layer", "type", "weight", "params", "zero kernels", "fixed"):
                table.add_column(col)
            for layer in result.layers:
                zero = "" if layer.zero_kernels is None else f"{layer.zero_kernels}"
                table.add_row(layer.name, layer.type, "x".join(map(str, layer.weight_shape)), f"{layer.params:,}", zero, "yes" if layer.fixed else "")
            stdout_console().print(table)
            key_value_table("summary", [
                ("architecture", result.arch), ("parameters", result.params), ("trainable", result.trainable_params),
                ("spatial layers", result.spatial_layers), ("spatial kernels", result.spatial_kernels),
                ("all-zero kernels", result.zero_kernels), ("fixed tensors", len(result.fixed_tensors)),
                ("MACs per sample", "pass --input-size C,H,W" if result.macs is None else f"{result.macs:,} at {result.input_size}"),
                ("history", ", ".join(h.get("step", "?") for h in result.history) or "none"),
                ("input preprocessing", "none recorded" if result.preprocessing is None else f"mean {result.preprocessing['mean']}, std {result.preprocessing['std']}"),
            ])

        emit(as_json, result.to_json(), render)

    run_body(debug, body)


@shared_options('model', 'data', 'run')
def saliency(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Where to write the score matrices (.safetensors).")],
    data: DataOpt = None,
    criterion: Annotated[CriterionOpt, typer.Option("--criterion", help="gradient (docs/method.md §1, needs --data) or the data-free magnitude fallback.")] = CriterionOpt.gradient,
    force: ForceOpt = False,
    o: Inputs = Inputs(),  # the shared options (shared_options)
) -> None:
    """Per spatial layer, the (O, I/groups) kernel saliency matrix, keyed by the conv's name."""

    def body() -> None:
        from explainfix_cli.io.outputs import check_target

        check_target(out, force)
        needs_data(criterion, data)
        check_paths(model, data)
        o.check_batches()
        explicit_preprocessing(data, o.mean, o.std)
        o.setup()
        from explainfix_cli.saliency import save_saliency, spatial_saliency

        rank = distributed.setup(o.device)  # under torchrun every process scores a share of the minibatches
        loaded = o.load_model(model)
        dataset = o.load_data(data, loaded)
        with working("computing saliency"):
            scores = spatial_saliency(loaded.model.to(o.device), dataset, criterion.value, o.device)
        if rank == 0:
            save_saliency(scores, str(out), force, criterion.value)
        layers = {name: {"shape": list(s.shape), "total": float(s.sum()), "max": float(s.max())} for name, s in scores.items()}
        payload = {"out": str(out), "criterion": criterion.value, "layers": layers}
        o.emit(payload, lambda: key_value_table(f"saliency → {out}", [(k, f"{v['shape']}  sum {v['total']:.4g}") for k, v in layers.items()]))

    o.run(body)

