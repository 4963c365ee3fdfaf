"""The command line's options, each declared once (docs/cli.md): the Typer option types, the choices
built from the library's Literals (choices.py), the groups of options every command shares, and the
mapping of the library's parameter names (`pct`) to flags (--pct) in error messages."""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, get_args

import typer

from explainfix_cli import choices


def flag(*names: str, help: str) -> Any:
    """An on/off option, shown in --help as a flag (no value)."""
    return typer.Option(*names, help=help, metavar="")



def choice(name: str, values: Any) -> type[Enum]:
    """A Typer choice built from the library's Literal (choices.py), so the values live in one place."""
    return Enum(name, {v.replace("-", "_"): v for v in get_args(values)}, type=str)  # type: ignore[return-value]


Granularity = choice("Granularity", choices.Granularity)
CriterionOpt = choice("CriterionOpt", choices.Criterion)
RemovalOpt = choice("RemovalOpt", choices.Removal)
AttributionOpt = choice("AttributionOpt", choices.AttributionMethod)
FillOpt = choice("FillOpt", choices.Fill)
FigureFormat = choice("FigureFormat", choices.FigureFormat)
LatencyForm = choice("LatencyForm", choices.LatencyForm)


# ---- options shared by the commands -------------------------------------------------------------
ModelArg = Annotated[Path, typer.Argument(help="Model: .safetensors written by explainfix, a state dict .pt/.pth (with --arch), a pickled module (with --trust-checkpoint), or a .pt2 program.", show_default=False)]
ArchOpt = Annotated[str | None, typer.Option("--arch", help="Architecture factory module.path:name (or file.py:name) for state dicts, e.g. explainfix_cli.zoo:resnet.")]
ArchKwargsOpt = Annotated[str | None, typer.Option("--arch-kwargs", help="JSON keyword arguments for --arch, e.g. '{\"num_classes\": 10}'.")]
TrustOpt = Annotated[bool, flag("--trust-checkpoint", help="Allow loading a pickled module (this runs code from the file).")]
DataOpt = Annotated[Path | None, typer.Option("--data", help="Data: .npz/.safetensors with x (N,C,H,W) and y; a folder with one sub-folder of images per class; a .csv/.jsonl list of image paths with a label column or 0/1 label columns; or a folder with images/ and masks/.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Minibatch size.")]
BatchesOpt = Annotated[int | None, typer.Option("--batches", help="Use only the first N minibatches.")]
ImageSizeOpt = Annotated[int | None, typer.Option("--image-size", help="Resize images of an image folder to this square size.")]
GrayscaleOpt = Annotated[bool, flag("--grayscale", help="Read images as one channel (default: as the model's first convolution takes them).")]
UncertainOpt = Annotated[str, typer.Option("--uncertain", help="A list's uncertain labels (-1): zeros (U-Zeros) or ones (U-Ones); empty ones count as 0.")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", help="DataLoader processes decoding images (default: the cores less one, at most 8; 0: in this process).", show_default=False)]
AugmentOpt = Annotated[str, typer.Option("--augment", help="Training augmentation: none, light (random resized crop of 75-100 % of the area + horizontal flip) or standard (8-100 %); masks take their image's crop. Default: light for images, none for tensor files.", show_default=False)]
MeanOpt = Annotated[str | None, typer.Option("--mean", help="Per-channel mean to subtract from an image folder's [0, 1] pixels, e.g. 0.485,0.456,0.406 (default: the model file's own).")]
StdOpt = Annotated[str | None, typer.Option("--std", help="Per-channel std to divide an image folder's pixels by, with --mean (default: the model file's own).")]
JsonOpt = Annotated[bool, flag("--json", help="Print exactly one JSON object on stdout.")]
ForceOpt = Annotated[bool, flag("--force", help="Replace an existing output.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed: same inputs and seed give byte-identical outputs.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, or cuda when present.")]
DebugOpt = Annotated[bool, flag("--debug", help="Show the traceback of errors.")]
InputSizeOpt = Annotated[str | None, typer.Option("--input-size", help="Input size C,H,W for MACs and tracing when no --data is given, e.g. 1,16,16.")]


# The library names its parameters in backticks (`pct`); on the command line they are flags (--pct).
LIBRARY_PARAMETERS = {
    "arch", "arch_kwargs", "attribution_method", "attributions", "batch_size", "batches", "criterion", "data", "force",
    "image_size", "input_size", "mean", "pct", "std", "trust_checkpoint", "val", "workers", "augment", "uncertain",
    "granularity", "latency_form", "latency_repeats", "max_drop", "max_macs", "max_params", "pcts",  # sweep, prune to a target
    "check_fraction", "drop_margin",  # the check split of a --max-drop target, extract's margin
    "amp", "class_gates", "memory_format",  # finetune's precision, gate training and layout
    "min_metric", "max_latency_ms",  # the gates of evaluate and bench
    "epochs", "lr", "norm_lr_scale", "weight_decay", "distill_weight", "temperature", "max_minutes",  # finetune's recipe
}


def in_flags(message: str) -> str:
    return re.sub(r"`([a-z_]+)`", lambda m: "--" + m.group(1).replace("_", "-") if m.group(1) in LIBRARY_PARAMETERS else m.group(0), message)



# ---- the options the commands share: one definition -------------------------------------------------
SHARED_OPTIONS: dict[str, dict[str, tuple[Any, Any]]] = {  # group → name → (annotation, default)
    "model": {"arch": (ArchOpt, None), "arch_kwargs": (ArchKwargsOpt, None), "trust_checkpoint": (TrustOpt, False)},
    "data": {
        "batch_size": (BatchSizeOpt, 64), "batches": (BatchesOpt, None), "image_size": (ImageSizeOpt, None),
        "grayscale": (GrayscaleOpt, False), "mean": (MeanOpt, None), "std": (StdOpt, None), "workers": (WorkersOpt, None),
        "uncertain": (UncertainOpt, "zeros"),
    },
    "run": {"as_json": (JsonOpt, False), "seed": (SeedOpt, 0), "device": (DeviceOpt, "cpu"), "debug": (DebugOpt, False)},
}  # fmt: skip



def shared_options(*groups: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the shared options of `groups` ("model", "data", "run"): Typer sees them as
    its own parameters (`with_shared_options`, once every name is defined); the command receives
    them as one `o: Inputs`."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.shared_option_groups = groups  # type: ignore[attr-defined]
        return fn

    return decorate



VsOpt = Annotated[Path | None, typer.Option("--vs", help="Another model to compare with, side by side (loaded with the same --arch options).")]
InitOpt = choice("InitOpt", choices.Init)
TrainOpt = choice("TrainOpt", choices.Trainable)
BatchNormOpt = choice("BatchNormOpt", choices.BatchNormMode)
OptimizerOpt = choice("OptimizerOpt", choices.OptimizerName)
MemoryFormatOpt = choice("MemoryFormatOpt", choices.MemoryFormat)


OutModelOpt = Annotated[Path, typer.Option("--out", help="Output .safetensors.")]
# ---- sweep, and prune to a target (issue 12) ----------------------------------------------------
MaxDropOpt = Annotated[float | None, typer.Option("--max-drop", help="Instead of --pct: the largest pct whose metric on the data falls at most this much (e.g. 0.01).", show_default=False)]
MaxParamsOpt = Annotated[int | None, typer.Option("--max-params", help="Instead of --pct: the smallest pct whose model has at most this many parameters.", show_default=False)]
MaxMacsOpt = Annotated[int | None, typer.Option("--max-macs", help="Instead of --pct: the smallest pct whose model needs at most this many MACs per sample.", show_default=False)]
FinetuneEpochsOpt = Annotated[int, typer.Option("--finetune-epochs", help="Fine-tune every pruned model this many epochs on --train before measuring it on --data (spatial filters fixed, the unpruned model as teacher); 0: none.")]
TrainDataOpt = Annotated[Path | None, typer.Option("--train", help="Training data for --finetune-epochs (the metric is still measured on --data).")]
CheckFractionOpt = Annotated[float | None, typer.Option("--check-fraction", help="With --max-drop and no --val: the share of --data kept out of scoring and choosing, on which the drop must hold too (default 0.25, stratified by class, drawn with --seed; 0: off, also with --val, and all of --data chooses). With --val, --val is the check split.", show_default=False)]
