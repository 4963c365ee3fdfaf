"""`fix` and `finetune` (docs/method.md §4): fix the spatial filters, train the rest (under torchrun too)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from explainfix_cli import distributed
from explainfix_cli.cli.options import (
    AugmentOpt,
    BatchNormOpt,
    ForceOpt,
    InitOpt,
    InputSizeOpt,
    MemoryFormatOpt,
    ModelArg,
    OptimizerOpt,
    OutModelOpt,
    TrainOpt,
    flag,
    shared_options,
)
from explainfix_cli.cli.render import (
    key_value_table,
    number,
)
from explainfix_cli.cli.run import (
    Inputs,
    default_augment,
    explicit_preprocessing,
    parse_input_size,
)
from explainfix_cli.errors import UserError, check_range

if TYPE_CHECKING:
    pass


@shared_options('model', 'run')
def fix(
    model: Annotated[Path | None, typer.Argument(help="Model to fix (any format of MODEL); leave out with --arch for a fresh network.", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output .safetensors (default: MODEL-fixed.safetensors beside the input).")] = None,
    init: Annotated[InitOpt, typer.Option("--init", help="keep the filters, or re-initialise them: dct2 / ghaar (steered), random (Kaiming, the negative control).")] = InitOpt.keep,
    input_size: InputSizeOpt = None,
    force: ForceOpt = False,
    o: Inputs = Inputs(),  # the shared options (shared_options)
) -> None:
    """Fix every spatial filter (docs/method.md §4), optionally with steered filters; --arch without MODEL builds a fresh network."""

    def body() -> None:
        from explainfix_cli.io.checkpoints import LoadedModel, parse_arch, save_model
        from explainfix_cli.io.outputs import check_target
        from explainfix_cli.training.fixed import fix as fix_model

        spec = parse_arch(o.arch, o.arch_kwargs)
        if model is None and spec is None:
            raise UserError("give a MODEL to fix, or --arch module.path:factory (with --input-size C,H,W) for a fresh network.")
        if model is None and out is None:
            raise UserError("a fresh network has no file to name the output after; pass --out OUT.safetensors.")
        target = out or model.with_name(f"{model.stem}-fixed.safetensors")  # type: ignore[union-attr]
        check_target(target, force)
        o.setup()
        loaded = o.load_model(model) if model else LoadedModel(spec.build(), spec, Path("-"))  # type: ignore[union-attr]
        _, report = fix_model(loaded.model, init.value, seed=o.seed, sample_shape=parse_input_size(input_size))
        save_model(loaded.model, target, arch=loaded.arch, history=[*loaded.history, report.history_step()], report=report.history_step(), preprocessing=loaded.preprocessing, force=force)
        report.out = str(target)
        o.emit(report.to_json(), lambda: key_value_table(f"fix → {target}", list(report.to_json().items())))

    o.run(body)


@shared_options('model', 'data', 'run')
def finetune(
    model: ModelArg,
    data: Annotated[Path, typer.Option("--data", help="Training data (same formats as --data elsewhere).")],
    val: Annotated[Path, typer.Option("--val", help="Validation data: the best epoch by its metric is kept.")],
    out: OutModelOpt,
    train: Annotated[TrainOpt, typer.Option("--train", help="auto: unfixed, or masked when the model is pruned and fixing leaves under 60 %% of its live parameters to learn (docs/method.md §4); unfixed: train only what is not fixed; masked: the surviving spatial kernels too, the pruned ones held at zero; all: unfreeze every parameter.")] = TrainOpt.auto,
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs to train.")] = 20,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (cosine schedule to zero).")] = 1e-2,
    norm_lr_scale: Annotated[float, typer.Option("--norm-lr-scale", help="Normalisation layers' scales and shifts learn at this multiple of --lr; 10 helps a model left with little but batch norms to learn (README).")] = 1.0,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="Weight decay.")] = 0.0,
    optimizer: Annotated[OptimizerOpt, typer.Option("--optimizer", help="adam, adamw or sgd (Nesterov momentum 0.9).")] = OptimizerOpt.adam,
    batch_norm: Annotated[BatchNormOpt, typer.Option("--batch-norm", help="train: batch statistics, running ones re-estimated; frozen: running statistics kept.")] = BatchNormOpt.train,
    teacher: Annotated[Path | None, typer.Option("--teacher", help="Distil from this model's softened outputs (e.g. the unpruned one); read with --arch too.")] = None,
    distill_weight: Annotated[float, typer.Option("--distill-weight", help="Share of the distillation loss with --teacher, in [0, 1].")] = 0.5,
    temperature: Annotated[float, typer.Option("--temperature", help="Softening temperature of the distillation.")] = 4.0,
    max_minutes: Annotated[float | None, typer.Option("--max-minutes", help="Stop before an epoch that would end past this many minutes.")] = None,
    augment: AugmentOpt = "",
    amp: Annotated[bool, flag("--amp", help="Mixed precision: float16 with loss scaling on CUDA, bfloat16 on the CPU (weights and validation stay float32).")] = False,
    memory_format: Annotated[MemoryFormatOpt, typer.Option("--memory-format", help="The layout training runs in: auto (channels-last on the CPU, measured 0.5-0.6x the step time; NCHW on CUDA), channels-last or contiguous.")] = MemoryFormatOpt.auto,
    class_gates: Annotated[bool, flag("--class-gates", help="Class-specific gate training (docs/method.md §6): a channel-by-class gate on the classifier's input, one standard epoch then two gated; the written model keeps its architecture.")] = False,
    force: ForceOpt = False,
    o: Inputs = Inputs(),  # the shared options (shared_options)
) -> None:
    """Train what is not fixed (a pruned or fixed model), keep the best epoch; runs under torchrun."""

    def body() -> None:
        from explainfix_cli.io.outputs import check_target
        from explainfix_cli.training.finetune import Recipe, finetune_file

        check_target(out, force)
        check_range("distill_weight", distill_weight, 0, 1)  # the recipe holds 0 without a teacher
        recipe = Recipe(  # checks every number before anything is loaded
            epochs=epochs, lr=lr, norm_lr_scale=norm_lr_scale, weight_decay=weight_decay, optimizer=optimizer.value, train=train.value, batch_norm=batch_norm.value,
            distill_weight=distill_weight if teacher else 0.0, temperature=temperature, max_minutes=max_minutes, seed=o.seed,
            class_gates=class_gates, amp=amp, memory_format=memory_format.value,
        )
        explicit_preprocessing(data, o.mean, o.std)
        o.setup()
        rank = distributed.setup(o.device)
        loaded = o.load_model(model)
        teacher_model = o.load_model(teacher).model if teacher else None
        train_data = o.load_data(data, loaded, augment=default_augment(augment, data))
        val_data = o.load_data(val, loaded, every_batch=True)
        progress = None
        if not o.as_json and rank == 0 and sys.stderr.isatty():
            def progress(r: Any) -> None:
                print(f"epoch {r.epoch}: loss {r.loss:.4f}, {val_data.metric_name} {number(r.metric)}, {r.seconds:.1f} s", file=sys.stderr)
        report = finetune_file(
            loaded, train_data, val_data, out, recipe=recipe, teacher=teacher_model, teacher_file=None if teacher is None else str(teacher), device=o.device, on_epoch=progress, force=force,
        )
        if rank == 0 and train.value == "auto" and report.trainable in ("masked", "all"):
            print(f"explainfix: {report.trainable_reason}.", file=sys.stderr)
        payload = report.to_json()
        rows = [(k, str(v) if isinstance(v, bool) else v) for k, v in payload.items() if k not in ("history", "recipe")]
        o.emit(payload, lambda: key_value_table(f"finetune → {out}", rows))

    o.run(body)

