"""The `explainfix` command line: options in, one library call, rich tables or JSON out.

Data goes to stdout (one JSON object with --json), talk goes to stderr. Bad input exits 2 with
one sentence, failures inside a correct request exit 1; --debug shows the traceback. torch and
friends are imported inside the commands so that --help and completion answer at once.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, get_args

import typer
from typer.core import TyperCommand, TyperGroup

from explainfix_cli import choices, distributed
from explainfix_cli.errors import UserError, check_pct, check_range
from explainfix_cli.numbers import strict

if TYPE_CHECKING:
    from explainfix_cli.io.checkpoints import LoadedModel
    from explainfix_cli.io.data import Dataset
    from explainfix_cli.io.preprocessing import Preprocessing

def _flag_help(option: Any) -> Any:
    if option is not None:
        option.metavar = ""  # a flag: shown without a value
    return option


class _Command(TyperCommand):
    def get_help_option(self, ctx: Any) -> Any:
        return _flag_help(super().get_help_option(ctx))


class _Group(TyperGroup):
    def get_help_option(self, ctx: Any) -> Any:
        return _flag_help(super().get_help_option(ctx))


app = typer.Typer(
    name="explainfix",
    cls=_Group,
    help="Prune a CNN by spatial-filter saliency, fix its spatial filters, and explain its spectra (ExplainFix).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
T = TypeVar("T")


def _flag(*names: str, help: str) -> Any:
    """An on/off option, shown in --help as a flag (no value)."""
    return typer.Option(*names, help=help, metavar="")


def _version(value: bool) -> None:
    if value:
        from explainfix_cli import __version__

        print(f"explainfix {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", help="Show the version and exit.", metavar="", callback=_version, is_eager=True)] = False) -> None:
    """Prune a CNN by spatial-filter saliency, fix its spatial filters, and explain its spectra (ExplainFix)."""


def _choice(name: str, values: Any) -> type[Enum]:
    """A Typer choice built from the library's Literal (choices.py), so the values live in one place."""
    return Enum(name, {v.replace("-", "_"): v for v in get_args(values)}, type=str)  # type: ignore[return-value]


Granularity = _choice("Granularity", choices.Granularity)
CriterionOpt = _choice("CriterionOpt", choices.Criterion)
RemovalOpt = _choice("RemovalOpt", choices.Removal)
AttributionOpt = _choice("AttributionOpt", choices.AttributionMethod)
FillOpt = _choice("FillOpt", choices.Fill)
FigureFormat = _choice("FigureFormat", choices.FigureFormat)
LatencyForm = _choice("LatencyForm", choices.LatencyForm)


# ---- options shared by the commands -------------------------------------------------------------
ModelArg = Annotated[Path, typer.Argument(help="Model: .safetensors written by explainfix, a state dict .pt/.pth (with --arch), a pickled module (with --trust-checkpoint), or a .pt2 program.", show_default=False)]
ArchOpt = Annotated[str | None, typer.Option("--arch", help="Architecture factory module.path:name (or file.py:name) for state dicts, e.g. explainfix_cli.zoo:resnet.")]
ArchKwargsOpt = Annotated[str | None, typer.Option("--arch-kwargs", help="JSON keyword arguments for --arch, e.g. '{\"num_classes\": 10}'.")]
TrustOpt = Annotated[bool, _flag("--trust-checkpoint", help="Allow loading a pickled module (this runs code from the file).")]
DataOpt = Annotated[Path | None, typer.Option("--data", help="Data: .npz/.safetensors with x (N,C,H,W) and y, or a folder with one sub-folder of images per class.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Minibatch size.")]
BatchesOpt = Annotated[int | None, typer.Option("--batches", help="Use only the first N minibatches.")]
ImageSizeOpt = Annotated[int | None, typer.Option("--image-size", help="Resize images of an image folder to this square size.")]
GrayscaleOpt = Annotated[bool, _flag("--grayscale", help="Read images of an image folder as one channel.")]
MeanOpt = Annotated[str | None, typer.Option("--mean", help="Per-channel mean to subtract from an image folder's [0, 1] pixels, e.g. 0.485,0.456,0.406 (default: the model file's own).")]
StdOpt = Annotated[str | None, typer.Option("--std", help="Per-channel std to divide an image folder's pixels by, with --mean (default: the model file's own).")]
JsonOpt = Annotated[bool, _flag("--json", help="Print exactly one JSON object on stdout.")]
ForceOpt = Annotated[bool, _flag("--force", help="Replace an existing output.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed: same inputs and seed give byte-identical outputs.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, or cuda when present.")]
DebugOpt = Annotated[bool, _flag("--debug", help="Show the traceback of errors.")]
InputSizeOpt = Annotated[str | None, typer.Option("--input-size", help="Input size C,H,W for MACs and tracing when no --data is given, e.g. 1,16,16.")]


def _stderr():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(stderr=True)


def _stdout():  # type: ignore[no-untyped-def]
    """Results a person asked for (tables) go to stdout, so `explainfix info m > info.txt` works."""
    from rich.console import Console

    return Console()


# The library names its parameters in backticks (`pct`); on the command line they are flags (--pct).
LIBRARY_PARAMETERS = {
    "arch", "arch_kwargs", "attribution_method", "attributions", "batch_size", "batches", "criterion", "data", "force",
    "image_size", "input_size", "mean", "pct", "std", "trust_checkpoint", "val",
    "granularity", "latency_form", "latency_repeats", "max_drop", "max_macs", "max_params", "pcts",  # sweep, prune to a target
    "min_metric", "max_latency_ms",  # the gates of evaluate and bench
    "epochs", "lr", "norm_lr_scale", "weight_decay", "distill_weight", "temperature", "max_minutes",  # finetune's recipe
}


def _in_flags(message: str) -> str:
    return re.sub(r"`([a-z_]+)`", lambda m: "--" + m.group(1).replace("_", "-") if m.group(1) in LIBRARY_PARAMETERS else m.group(0), message)


def _run(debug: bool, fn: Callable[[], T]) -> T:
    """Run a command body: bad input → one sentence and exit 2; a failure → exit 1."""
    try:
        return fn()
    except UserError as e:
        distributed.mark_failed()
        if debug:
            raise
        print(f"explainfix: error: {_in_flags(str(e))}", file=sys.stderr)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        distributed.mark_failed()
        raise typer.Exit(130) from None
    except Exception as e:
        distributed.mark_failed()
        if debug:
            raise
        print(f"explainfix: failed: {type(e).__name__}: {e} (run again with --debug for the traceback)", file=sys.stderr)
        raise typer.Exit(1) from None


def _emit(as_json: bool, payload: dict[str, Any], render: Callable[[], None]) -> None:
    if as_json:
        sys.stdout.write(json.dumps(strict(payload), allow_nan=False) + "\n")
    else:
        render()


class _Bars:
    """The library's stages (progress.py) as rich progress bars on stderr, one per open stage."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.bars = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=_stderr(), transient=True)
        self.open: list[Any] = []

    def start(self, stage: str, total: int | None) -> None:
        self.open.append(self.bars.add_task(stage, total=total))

    def advance(self, steps: int) -> None:
        if self.open:
            self.bars.advance(self.open[-1], steps)

    def finish(self) -> None:
        self.bars.remove_task(self.open.pop())


@contextmanager
def _working(message: str) -> Iterator[None]:
    """Progress bars on stderr, only for a person at a terminal: piped output stays clean."""
    if not sys.stderr.isatty():
        yield
        return
    from explainfix_cli import progress

    bars = _Bars()
    with bars.bars, progress.reporting(bars), progress.stage(message):
        yield


def _setup(seed: int, device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for a GPU but none is available here; use --device cpu.")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device must be cpu or cuda, not {device!r}.")
    torch.manual_seed(seed)


def _load_model(model: Path, arch: str | None, arch_kwargs: str | None, trust: bool, eager: bool = True) -> LoadedModel:
    from explainfix_cli.io.checkpoints import open_model, parse_arch
    from explainfix_cli.io.formats import model_format

    if eager and model_format(model) == "torch-export":
        # an exported program keeps no nn.Conv2d modules to score, cut or explain
        raise UserError(f"{model} is a torch.export program, which only `info` reads; pass the model's state dict with --arch instead.")
    return open_model(model, parse_arch(arch, arch_kwargs), trust)


def _load_data(
    data: Path | None,
    batch_size: int,
    batches: int | None,
    image_size: int | None,
    grayscale: bool,
    mean: str | None = None,
    std: str | None = None,
    model: LoadedModel | None = None,
) -> Dataset | None:
    """The data, an image folder normalised by --mean/--std or else by the model file's own record."""
    from explainfix_cli.io.data import load_data

    explicit = _preprocessing(data, mean, std)
    if data is None:
        return None
    recorded = model.preprocessing if model is not None else None
    return load_data(data, batch_size, batches, image_size, grayscale, _override(recorded, explicit))


def _override(recorded: Preprocessing | None, explicit: Preprocessing | None) -> Preprocessing | None:
    """--mean/--std replace the model's mean and std; its channel count and image size still apply."""
    from dataclasses import replace

    if recorded is None or explicit is None:
        return explicit or recorded
    return replace(recorded, mean=explicit.mean, std=explicit.std)


def _folder_preprocessing(data: Path | None, mean: str | None, std: str | None, model: LoadedModel) -> dict[str, Any] | None:
    """The normalisation `_load_data` applies to `data`: only an image folder gets one."""
    applied = _override(model.preprocessing, _preprocessing(data, mean, std)) if data is not None and data.is_dir() else None
    return None if applied is None else applied.to_json()


def _preprocessing(data: Path | None, mean: str | None, std: str | None) -> Preprocessing | None:
    """--mean/--std, checked before torch is imported: they normalise a folder of images only."""
    from explainfix_cli.io.preprocessing import parse_preprocessing

    explicit = parse_preprocessing(mean, std)
    if explicit is not None and data is not None and not data.is_dir():
        raise UserError(f"--mean/--std normalise a folder of images; the x of {data} is used as stored (already preprocessed), so drop them.")
    return explicit


def _check_paths(model: Path | None = None, data: Path | None = None, val: Path | None = None, train: Path | None = None) -> None:
    """The checks that need no model, run before torch is imported: a typo answers at once."""
    from explainfix_cli.io.formats import model_format

    if model is not None:
        model_format(model)
    for flag, path in (("--data", data), ("--val", val), ("--train", train)):
        if path is not None and not path.exists():
            raise UserError(f"{flag} {path} does not exist.")


def _check_batches(batch_size: int, batches: int | None, image_size: int | None) -> None:
    for flag, value in (("--batch-size", batch_size), ("--batches", batches), ("--image-size", image_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, not {value}.")


# ---- rendering for people ----------------------------------------------------------------------
BLOCKED_IN_WORDS = {
    "reaches the model output": "they reach the model's output",
    "normalisation across channels": "a LayerNorm/GroupNorm mixes their channels",
    "channel shuffle of several groups": "a channel shuffle interleaves them with other groups",
    "grouped transposed convolution": "a grouped transposed convolution reads them",
    "no layer reads it": "no layer reads them",
}
METRIC_DROP_WARNING = 0.02  # a fall larger than this in the metric gets a sentence and a way out


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _render_prune(r: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"prune → {r['out']}", title_justify="left")
    for column in ("", "before", "after", "change"):
        table.add_column(column, justify="left" if not column else "right")
    for label, key in (("parameters", "params"), ("MACs per sample", "macs"), ("spatial kernels", "spatial_kernels")):
        before, after = r[f"{key}_before"], r[f"{key}_after"]
        table.add_row(label, f"{before:,}", f"{after:,}", f"{(after - before) / before:+.1%}" if before else "")
    for label, prefix in ((r["metric"], ""), (f"{r['metric']} on --val", "val_")):
        if r["metric"] and r.get(f"{prefix}metric_before") is not None:
            before, after = r[f"{prefix}metric_before"], r[f"{prefix}metric_after"]
            change = "" if before is None or after is None else f"{after - before:+.3f}"
            table.add_row(label, _number(before), _number(after), change)
    out = _stdout()
    out.print(table)
    zeroed = f"{r['zeroed_kernels']:,} of {r['spatial_kernels_before']:,} spatial kernels zeroed ({r['pct']:g} %, {r['criterion']} saliency)"
    removed = f"{r['channels_removed']:,} channels removed ({r['channels_folded']:,} folded into biases), --removal {r['removal']}"
    out.print(f"{zeroed}; {removed}.")
    if r["max_logit_change"] is not None:
        change = f"largest output change from removal: {r['max_logit_change']:.2g} on {r['calibration_samples']:,} samples"
        if r.get("val_max_logit_change") is not None:
            change += f", {r['val_max_logit_change']:.2g} on {r['val_samples']:,} held-out samples"
        out.print(change + ".")
    for reason, count in r["blocked_groups"].items():
        out.print(f"{count:,} channel group{'s' if count != 1 else ''} kept whole: {BLOCKED_IN_WORDS.get(reason, reason)}.")
    before, after = r.get("metric_before"), r.get("metric_after")
    if before is not None and after is not None and before - after > METRIC_DROP_WARNING:
        print(
            f"explainfix: {r['metric']} fell from {before:.3f} to {after:.3f}: train the remaining parameters to recover it "
            f"(explainfix finetune {r['out']} --data TRAIN --val VAL --teacher ORIGINAL --out TUNED).",
            file=sys.stderr,
        )


def _needs_data(criterion: Enum, data: Path | None) -> None:
    if criterion.value == "gradient" and data is None:
        raise UserError("gradient saliency needs data: pass --data D, or --criterion magnitude (with --input-size C,H,W) for the data-free fallback.")


def _input_size(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise UserError(f"--input-size must be three positive integers C,H,W, e.g. 1,16,16, not {text!r}.")
    return size


def _table(title: str, rows: list[tuple[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    _stdout().print(table)


# ---- the options the commands share: one definition -------------------------------------------------
SHARED_OPTIONS: dict[str, dict[str, tuple[Any, Any]]] = {  # group → name → (annotation, default)
    "model": {"arch": (ArchOpt, None), "arch_kwargs": (ArchKwargsOpt, None), "trust_checkpoint": (TrustOpt, False)},
    "data": {
        "batch_size": (BatchSizeOpt, 64), "batches": (BatchesOpt, None), "image_size": (ImageSizeOpt, None),
        "grayscale": (GrayscaleOpt, False), "mean": (MeanOpt, None), "std": (StdOpt, None),
    },
    "run": {"as_json": (JsonOpt, False), "seed": (SeedOpt, 0), "device": (DeviceOpt, "cpu"), "debug": (DebugOpt, False)},
}  # fmt: skip


@dataclass
class Inputs:
    """The shared options of one command call, and what a command does with them."""

    arch: str | None = None
    arch_kwargs: str | None = None
    trust_checkpoint: bool = False
    batch_size: int = 64
    batches: int | None = None
    image_size: int | None = None
    grayscale: bool = False
    mean: str | None = None
    std: str | None = None
    as_json: bool = False
    seed: int = 0
    device: str = "cpu"
    debug: bool = False

    def load_model(self, path: Path, eager: bool = True) -> LoadedModel:
        return _load_model(path, self.arch, self.arch_kwargs, self.trust_checkpoint, eager)

    def load_data(self, path: Path | None, model: LoadedModel | None = None, every_batch: bool = False) -> Dataset | None:
        """`path` as data, normalised the model's way; `every_batch` ignores --batches (held-out data)."""
        return _load_data(path, self.batch_size, None if every_batch else self.batches, self.image_size, self.grayscale, self.mean, self.std, model)

    def check_batches(self) -> None:
        _check_batches(self.batch_size, self.batches, self.image_size)

    def setup(self) -> None:
        _setup(self.seed, self.device)

    def emit(self, payload: dict[str, Any], render: Callable[[], None]) -> None:
        _emit(self.as_json, payload, render)

    def run(self, fn: Callable[[], T]) -> T:
        return _run(self.debug, fn)


def shared_options(*groups: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the shared options of `groups` ("model", "data", "run"): Typer sees them as
    its own parameters (`_with_shared_options`, once every name is defined); the command receives
    them as one `o: Inputs`."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.shared_option_groups = groups  # type: ignore[attr-defined]
        return fn

    return decorate


def _with_shared_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    groups: tuple[str, ...] = getattr(fn, "shared_option_groups", ())
    if not groups:
        return fn
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "o"]
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
        for group in groups for name, (annotation, default) in SHARED_OPTIONS[group].items()
    ]  # fmt: skip
    fields = {p.name for p in extra}  # a command's own option may share a name (bench's --batch-size)

    @functools.wraps(fn)
    def command(**kwargs: Any) -> Any:
        return fn(**{k: v for k, v in kwargs.items() if k not in fields}, o=Inputs(**{k: v for k, v in kwargs.items() if k in fields}))

    command.__signature__ = inspect.Signature([*own, *extra])  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in [*own, *extra]}
    return command


# ---- commands -----------------------------------------------------------------------------------
@app.command()
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
        _check_paths(model)
        from explainfix_cli.evaluation.info import describe

        result = describe(o.load_model(model, eager=False), _input_size(input_size))

        def render() -> None:
            from rich.table import Table

            table = Table(title=f"{result.path}")
            for col in ("layer", "type", "weight", "params", "zero kernels", "fixed"):
                table.add_column(col)
            for layer in result.layers:
                zero = "" if layer.zero_kernels is None else f"{layer.zero_kernels}"
                table.add_row(layer.name, layer.type, "x".join(map(str, layer.weight_shape)), f"{layer.params:,}", zero, "yes" if layer.fixed else "")
            _stdout().print(table)
            _table("summary", [
                ("architecture", result.arch), ("parameters", result.params), ("trainable", result.trainable_params),
                ("spatial layers", result.spatial_layers), ("spatial kernels", result.spatial_kernels),
                ("all-zero kernels", result.zero_kernels), ("fixed tensors", len(result.fixed_tensors)),
                ("MACs per sample", "pass --input-size C,H,W" if result.macs is None else f"{result.macs:,} at {result.input_size}"),
                ("history", ", ".join(h.get("step", "?") for h in result.history) or "none"),
                ("input preprocessing", "none recorded" if result.preprocessing is None else f"mean {result.preprocessing['mean']}, std {result.preprocessing['std']}"),
            ])

        _emit(as_json, result.to_json(), render)

    _run(debug, body)


@app.command()
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
        _needs_data(criterion, data)
        _check_paths(model, data)
        o.check_batches()
        _preprocessing(data, o.mean, o.std)
        o.setup()
        from explainfix_cli.saliency import save_saliency, spatial_saliency

        rank = distributed.setup(o.device)  # under torchrun every process scores a share of the minibatches
        loaded = o.load_model(model)
        dataset = o.load_data(data, loaded)
        with _working("computing saliency"):
            scores = spatial_saliency(loaded.model.to(o.device), dataset, criterion.value, o.device)
        if rank == 0:
            save_saliency(scores, str(out), force, criterion.value)
        layers = {name: {"shape": list(s.shape), "total": float(s.sum()), "max": float(s.max())} for name, s in scores.items()}
        payload = {"out": str(out), "criterion": criterion.value, "layers": layers}
        o.emit(payload, lambda: _table(f"saliency → {out}", [(k, f"{v['shape']}  sum {v['total']:.4g}") for k, v in layers.items()]))

    o.run(body)


@app.command()
@shared_options('model', 'data', 'run')
def prune(
    model: ModelArg,
    data: DataOpt = None,
    val: Annotated[Path | None, typer.Option("--val", help="Held-out data the prune never sees: the removal's change and the metrics are measured on it too.")] = None,
    pct: Annotated[float | None, typer.Option("--pct", help="Percentage of spatial kernels to zero, in [0, 100) (default 50, or chosen by a target).", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output .safetensors (default: MODEL-pruned.safetensors beside the input).")] = None,
    granularity: Annotated[Granularity, typer.Option("--granularity", help="kernel: zero kernels, remove dead channels. channel: remove the least salient channels.")] = Granularity.kernel,
    saliency_file: Annotated[Path | None, typer.Option("--saliency", help="Reuse scores written by `explainfix saliency`.")] = None,
    criterion: Annotated[CriterionOpt, typer.Option("--criterion", help="gradient (needs --data) or the data-free magnitude fallback.")] = CriterionOpt.gradient,
    fill: Annotated[FillOpt, typer.Option("--fill", help="Zeroed kernels that stay: keep zero, reset to old values, or fillzero re-initialise.")] = FillOpt.zero,
    removal: Annotated[RemovalOpt, typer.Option("--removal", help="exact: only removals that leave the output unchanged for every input. calibrated: also channels constant on --data only (check with --val). aggressive: also silent channels, unfolded, as the paper did (fine-tune afterwards).")] = RemovalOpt.exact,
    no_fix: Annotated[bool, _flag("--no-fix", help="Leave spatial filters trainable in the output.")] = False,
    min_kernels_per_layer: Annotated[int, typer.Option("--min-kernels-per-layer", help="Keep the K most salient kernels of every spatial layer out of zeroing, against layer collapse (0: pure global ranking).")] = 0,
    max_drop: MaxDropOpt = None,
    max_params: MaxParamsOpt = None,
    max_macs: MaxMacsOpt = None,
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
        if pct is not None:
            check_pct("pct", pct)
        if min_kernels_per_layer < 0:
            raise UserError(f"--min-kernels-per-layer must be 0 or more, not {min_kernels_per_layer}.")
        _check_finetune_each(finetune_epochs, train, data)
        if finetune_epochs > 0 and goal is None:
            raise UserError("--finetune-epochs meets a target after fine-tuning (--max-drop, --max-params, --max-macs); to fine-tune a model pruned at a --pct, run `explainfix finetune` on it.")
        if saliency_file is None:
            _needs_data(criterion, data)
        target = out or model.with_name(f"{model.stem}-pruned.safetensors")
        check_target(target, force)
        _check_paths(model, data, val, train)
        o.check_batches()
        _preprocessing(data, o.mean, o.std)
        o.setup()
        distributed.setup(o.device)  # under torchrun the saliency pass is shared; process 0 writes
        loaded = o.load_model(model)
        dataset = o.load_data(data, loaded)
        from explainfix_cli.pruning.pipeline import prune as prune_model
        from explainfix_cli.saliency import load_saliency

        scores, scored_by = load_saliency(str(saliency_file), loaded.model) if saliency_file else (None, criterion.value)
        options: dict[str, Any] = {
            "granularity": granularity.value, "criterion": scored_by, "scores": scores, "fill": fill.value, "removal": removal.value,
            "fix": not no_fix, "arch": loaded.arch, "history": loaded.history, "out": target, "force": force, "seed": o.seed,
            "device": o.device, "sample_shape": _input_size(input_size), "val": o.load_data(val, loaded, every_batch=True),
            "preprocessing": _override(loaded.preprocessing, _preprocessing(data, o.mean, o.std)), "min_kernels_per_layer": min_kernels_per_layer,
        }  # fmt: skip
        with _working("pruning"):
            if goal is None:
                _, report = prune_model(loaded.model, dataset, pct=50.0 if pct is None else pct, **options)
            else:
                if train is not None and finetune_epochs > 0:
                    options["adapt"] = _finetune_each(o, loaded, train, dataset, finetune_epochs, fix=not no_fix)
                found = _prune_to_target(loaded.model, dataset, goal, options)
                report = found.report
        for warning in report.warnings():
            print(f"explainfix: warning: {warning}", file=sys.stderr)
        payload = report.to_json() if goal is None else found.to_json()
        o.emit(payload, lambda: _render_prune(payload) if goal is None else _render_target(payload))

    o.run(body)


@app.command()
@shared_options('model', 'data', 'run')
def explain(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Folder to write the figures, spectra.json and index.html to.")],
    data: DataOpt = None,
    fmt: Annotated[FigureFormat, typer.Option("--format", help="Figure file format.")] = FigureFormat.png,
    attributions: Annotated[int, typer.Option("--attributions", help="Inputs to show attribution maps for (needs --data; 0 for none).")] = 4,
    attribution_method: Annotated[AttributionOpt, typer.Option("--attribution-method", help="saliency (input gradient, one backward pass) or integrated-gradients (more faithful, 32 passes per input).")] = AttributionOpt.saliency,
    log_scale: Annotated[bool, _flag("--log-scale", help="Logarithmic colour scale in the spectra heatmaps (the kernel-saliency figure always has one).")] = False,
    pct: Annotated[float, typer.Option("--pct", help="Mark in the kernel-saliency figure the kernels `explainfix prune --pct P` would zero.")] = 50.0,
    with_figures: Annotated[bool, _flag("--figures/--no-figures", help="Draw the figures and attributions; --no-figures writes spectra.json and index.html only (fast, for CI).")] = True,
    force: ForceOpt = False,
    o: Inputs = Inputs(),  # the shared options (shared_options)
) -> None:
    """Which spatial frequencies each layer uses (ExplainSteer, docs/method.md §5): figures, spectra and attributions."""

    def body() -> None:
        from explainfix_cli.io.outputs import check_folder_target

        check_folder_target(out, force)
        _check_paths(model, data)
        o.check_batches()
        _preprocessing(data, o.mean, o.std)
        check_pct("pct", pct)
        o.setup()
        from explainfix_cli.explanation import ReportSource
        from explainfix_cli.explanation import explain as explain_model

        loaded = o.load_model(model)
        dataset = o.load_data(data, loaded)
        with _working("explaining"):
            result = explain_model(
                loaded.model.to(o.device), dataset, out, fmt=fmt.value, attributions=attributions, attribution_method=attribution_method.value, force=force,
                log_scale=log_scale, with_figures=with_figures, device=o.device, pct=pct, source=ReportSource(
                    model=str(model), arch=loaded.arch.to_json() if loaded.arch else None, data=None if data is None else str(data), history=loaded.history,
                    preprocessing=_folder_preprocessing(data, o.mean, o.std, loaded),
                ),
            )
        for note in result.notes:
            print(f"explainfix: note: {note}", file=sys.stderr)
        shares = [(s.name, f"{'x'.join(map(str, s.kernel_shape))}  low-frequency share {s.low_frequency_share:.2f}") for s in result.layers]
        o.emit(result.to_json(), lambda: _table(f"explain → {out / 'index.html'}", shares))

    o.run(body)


# ---- evaluate and bench: measurements with CI gates (a gate not met: one sentence, exit 1) ---------
VsOpt = Annotated[Path | None, typer.Option("--vs", help="Another model to compare with, side by side (loaded with the same --arch options).")]


def _gate_verdict(gates: list[Any]) -> None:
    """Exit 1 with one sentence when a gate failed (after the results were printed)."""
    failures = [g.sentence.rstrip(".") for g in gates if not g.passed]
    if failures:
        print(f"explainfix: gate failed: {'; '.join(failures)}.", file=sys.stderr)
        raise typer.Exit(1)


def _side_by_side(title: str, names: list[str], rows: list[tuple[str, list[Any]]]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in ["", *names]:
        table.add_column(col, justify="right" if col else "left")
    for label, values in rows:
        table.add_row(label, *("-" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.4g}" if isinstance(v, float) else str(v) for v in values))
    _stdout().print(table)


@app.command()
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
        _preprocessing(data, o.mean, o.std)
        o.setup()
        loaded = o.load_model(model)
        other = o.load_model(vs).model.to(o.device) if vs else None
        dataset = o.load_data(data, loaded)
        with _working("evaluating"):
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
            _side_by_side(f"evaluate on {data}", [r.model for r in runs], rows)
            for r in runs:
                if r.confusion_matrix is not None:
                    _side_by_side(f"confusion matrix of {r.model} (rows: true class, columns: predicted)", [str(k) for k in range(len(r.confusion_matrix))], [(str(k), list(row)) for k, row in enumerate(r.confusion_matrix)])
            for g in report.gates:
                _stderr().print(f"gate {g.name}: {'passed' if g.passed else 'FAILED'}: {g.sentence}")

        o.emit(report.to_json(), render)
        return report

    _gate_verdict(o.run(body).gates)


@app.command()
@shared_options('model', 'run')
def bench(
    model: ModelArg,
    vs: VsOpt = None,
    input_size: Annotated[str | None, typer.Option("--input-size", help="Input size C,H,W; needed when the file does not remember one (a pruned file does).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="The larger batch N that latency is also measured at (besides batch 1).")] = 16,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs per model, form and batch; the median is reported.")] = 30,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs before the timed ones.")] = 3,
    threads: Annotated[int | None, typer.Option("--threads", help="Intra-op CPU threads (default: torch's); the count used is reported.")] = None,
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
        loaded = o.load_model(model)
        other = o.load_model(vs) if vs else None
        size = _input_size(input_size) or loaded.input_size or (other.input_size if other else None)
        if size is None:
            raise UserError(f"{model} does not record its input size; pass --input-size C,H,W.")
        with _working("benchmarking"):
            report = bench_model(
                loaded.model, size, name=str(model), path=model, vs=other.model if other else None, vs_name=str(vs), vs_path=vs,
                batch_size=batch_size, repeats=repeats, warmup=warmup, threads=threads, seed=o.seed,
                max_latency_ms=max_latency_ms, max_params=max_params, max_macs=max_macs,
            )

        def render() -> None:
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
            _side_by_side(f"bench at {'x'.join(map(str, report.input_size))}, {report.threads} threads{load}, median of {report.repeats}", names, rows)
            for r in runs:
                if r.deployment_note:
                    _stderr().print(f"{r.model}: {r.deployment_note}")
            for g in report.gates:
                _stderr().print(f"gate {g.name}: {'passed' if g.passed else 'FAILED'}: {g.sentence}")

        o.emit(report.to_json(), render)
        return report

    _gate_verdict(o.run(body).gates)
# ---- fix and finetune (docs/method.md §4; training under torchrun) ------------------------------------
InitOpt = _choice("InitOpt", choices.Init)
TrainOpt = _choice("TrainOpt", choices.Trainable)
BatchNormOpt = _choice("BatchNormOpt", choices.BatchNormMode)
OptimizerOpt = _choice("OptimizerOpt", choices.OptimizerName)


OutModelOpt = Annotated[Path, typer.Option("--out", help="Output .safetensors.")]


@app.command()
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
        _, report = fix_model(loaded.model, init.value, seed=o.seed, sample_shape=_input_size(input_size))
        save_model(loaded.model, target, arch=loaded.arch, history=[*loaded.history, report.history_step()], report=report.history_step(), preprocessing=loaded.preprocessing, force=force)
        report.out = str(target)
        o.emit(report.to_json(), lambda: _table(f"fix → {target}", list(report.to_json().items())))

    o.run(body)


@app.command()
@shared_options('model', 'data', 'run')
def finetune(
    model: ModelArg,
    data: Annotated[Path, typer.Option("--data", help="Training data (same formats as --data elsewhere).")],
    val: Annotated[Path, typer.Option("--val", help="Validation data: the best epoch by its metric is kept.")],
    out: OutModelOpt,
    train: Annotated[TrainOpt, typer.Option("--train", help="unfixed: train only what is not fixed; all: unfreeze the spatial filters too.")] = TrainOpt.unfixed,
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
    class_gates: Annotated[bool, _flag("--class-gates", help="Class-specific gate training (docs/method.md §6): a channel-by-class gate on the classifier's input, one standard epoch then two gated; the written model keeps its architecture.")] = False,
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
            class_gates=class_gates,
        )
        _preprocessing(data, o.mean, o.std)
        o.setup()
        rank = distributed.setup(o.device)
        loaded = o.load_model(model)
        teacher_model = o.load_model(teacher).model if teacher else None
        train_data = o.load_data(data, loaded)
        val_data = o.load_data(val, loaded, every_batch=True)
        progress = None
        if not o.as_json and rank == 0 and sys.stderr.isatty():
            def progress(r: Any) -> None:
                print(f"epoch {r.epoch}: loss {r.loss:.4f}, {val_data.metric_name} {r.metric}, {r.seconds:.1f} s", file=sys.stderr)
        report = finetune_file(
            loaded, train_data, val_data, out, recipe=recipe, teacher=teacher_model, device=o.device, on_epoch=progress, force=force,
        )
        payload = report.to_json()
        rows = [(k, str(v) if isinstance(v, bool) else v) for k, v in payload.items() if k not in ("history", "recipe")]
        o.emit(payload, lambda: _table(f"finetune → {out}", rows))

    o.run(body)


# ---- class-specific filters (docs/method.md §6): classes, extract --------------------------------------
def _require_data(data: Path | None, o: Inputs, model: LoadedModel) -> Dataset:
    dataset = o.load_data(data, model)
    if dataset is None:
        raise UserError("this command needs data with class labels: pass --data D.")
    return dataset


@app.command()
@shared_options('model', 'data', 'run')
def classes(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Folder to write classes.json and the figures into (a non-empty folder needs --force; only these files are replaced).")],
    data: DataOpt = None,
    share: Annotated[float, typer.Option("--share", help="Share of a class's positive importance its needed channels must reach.")] = 0.9,
    bins: Annotated[int, typer.Option("--bins", help="Quantile bins of each channel's pooled activation for the mutual information.")] = 8,
    with_figures: Annotated[bool, _flag("--figures/--no-figures", help="Draw the heatmap and the channels-needed figure.")] = True,
    force: ForceOpt = False,
    o: Inputs = Inputs(),  # the shared options (shared_options)
) -> None:
    """Which channels serve which class (docs/method.md §6): importance, channels needed, MI specificity."""

    def body() -> None:
        _check_paths(model, data)
        o.check_batches()
        o.setup()
        from explainfix_cli.classes.analysis import classes as analyse

        loaded = o.load_model(model)
        dataset = _require_data(data, o, loaded)
        with _working("analysing classes"):
            result = analyse(loaded.model.to(o.device), dataset, out, share=share, bins=bins, with_figures=with_figures, force=force, device=o.device)

        def render() -> None:
            from rich.table import Table

            table = Table(title=f"classes → {out}")
            for col in ("layer", "channels", "specificity (bits)", f"channels needed for {share:.0%} per class"):
                table.add_column(col)
            for layer in result.layers:
                table.add_row(layer.name, str(layer.channels), f"{layer.specificity:.3f}", " ".join(map(str, layer.channels_needed)))
            _stdout().print(table)
            d = result.decomposition
            if d is not None:
                _stdout().print(f"decomposed classifier ({d.classifier}, needed inputs only): {d.metric} {d.metric_decomposed}, full model {d.metric_full}")
            _stdout().print(f"specificity score ({result.specificity_layer}): {result.specificity:.4f} bits")

        o.emit(result.to_json(), render)

    o.run(body)


@app.command()
@shared_options('model', 'data', 'run')
def extract(
    model: ModelArg,
    target: Annotated[int, typer.Option("--class", help="The class to keep (its index in the model's outputs).")],
    data: DataOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output .safetensors (default: MODEL-classK.safetensors beside the input).")] = None,
    keep: Annotated[float | None, typer.Option("--keep", help="Share of the one-vs-rest importance kept in every coupled channel group, in [0, 1].")] = None,
    max_drop: Annotated[float | None, typer.Option("--max-drop", help="Instead of --keep: the largest one-vs-rest AUC drop allowed on --data (greedy cut, re-scored after each step).")] = None,
    val: Annotated[Path | None, typer.Option("--val", help="Held-out data to report the sub-model's AUC and accuracy on.")] = None,
    force: ForceOpt = False,
    o: Inputs = Inputs(),  # the shared options (shared_options)
) -> None:
    """A one-vs-rest sub-model for one class, without the channels it does not need (docs/method.md §6)."""

    def body() -> None:
        if keep is None and max_drop is None:
            raise UserError("pass --keep F (share of the class's importance to keep) or --max-drop X (largest AUC drop).")
        if keep is not None and max_drop is not None:
            raise UserError("pass --keep or --max-drop, not both.")
        target_path = out or model.with_name(f"{model.stem}-class{target}.safetensors")
        _check_paths(model, data, val)
        o.check_batches()
        o.setup()
        from explainfix_cli.classes.extract import extract as extract_class

        loaded = o.load_model(model)
        dataset = _require_data(data, o, loaded)
        held_out = o.load_data(val, loaded, every_batch=True)
        with _working(f"extracting class {target}"):
            _, report = extract_class(
                loaded.model.to(o.device), dataset, target, keep=keep, max_drop=max_drop, val=held_out, arch=loaded.arch,
                history=loaded.history, out=target_path, force=force, device=o.device,
            )

        def render() -> None:
            from rich.table import Table

            table = Table(title=f"extract class {target} → {target_path}  (keep {report.keep:.4g})")
            for col in ("", "params", "MACs", "AUC", "acc.", "val AUC", "val acc."):
                table.add_column(col, justify="right")

            def number(value: float | None) -> str:
                return "" if value is None else f"{value:.4f}"

            for which, params, macs in (("full", report.params_before, report.macs_before), ("extracted", report.params_after, report.macs_after)):
                d, v = report.data[which], (report.val or {}).get(which)
                table.add_row(which, f"{params:,}", f"{macs:,}", number(d.auc), number(d.accuracy), number(v and v.auc), number(v and v.accuracy))
            _stdout().print(table)

        o.emit(report.to_json(), render)

    o.run(body)


# ---- sweep, and prune to a target (issue 12) ----------------------------------------------------
MaxDropOpt = Annotated[float | None, typer.Option("--max-drop", help="Instead of --pct: the largest pct whose metric on the data falls at most this much (e.g. 0.01).", show_default=False)]
MaxParamsOpt = Annotated[int | None, typer.Option("--max-params", help="Instead of --pct: the smallest pct whose model has at most this many parameters.", show_default=False)]
MaxMacsOpt = Annotated[int | None, typer.Option("--max-macs", help="Instead of --pct: the smallest pct whose model needs at most this many MACs per sample.", show_default=False)]
FinetuneEpochsOpt = Annotated[int, typer.Option("--finetune-epochs", help="Fine-tune every pruned model this many epochs on --train before measuring it on --data (spatial filters fixed, the unpruned model as teacher); 0: none.")]
TrainDataOpt = Annotated[Path | None, typer.Option("--train", help="Training data for --finetune-epochs (the metric is still measured on --data).")]


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
    from explainfix_cli.search.sweep import Target

    return Target(max_drop, max_params, max_macs)


def _prune_to_target(model: Any, data: Dataset | None, target: Any, options: dict[str, Any]) -> Any:
    """A target no pct meets is a correct request that cannot be satisfied: one sentence, exit 1."""
    from explainfix_cli.search.sweep import TargetNotMet, prune_to_target

    try:
        return prune_to_target(model, data, target, **options)
    except TargetNotMet as e:
        print(f"explainfix: failed: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def _render_target(payload: dict[str, Any]) -> None:
    """The prune summary, then which pct the target chose and how it was found (--json lists every probe)."""
    _render_prune(payload)
    limits = ", ".join(f"--{k.replace('_', '-')} {v:,}" for k, v in payload["target"].items() if v is not None)
    kinds = [p["model"] for p in payload["probes"]]
    found = f"{kinds.count('zeroed')} pcts scanned on the zeroed model, {kinds.count('pruned')} pruned"
    if payload["finetune"] is not None:
        tuned = payload["finetune"]
        found += (
            f", {kinds.count('adapted')} pruned and fine-tuned; the written model was fine-tuned {tuned['epochs']} epochs "
            f"({payload['metric']} on the data {tuned['metric_before']:.4f} → {tuned['metric_after']:.4f})"
        )
    _stdout().print(f"pct {payload['pct_chosen']:g} meets {limits}{' after fine-tuning' if payload['finetune'] else ''}: {found}.")


def _stdout_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*row)
    _stdout().print(table)


@app.command()
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
        _check_paths(model, data, train=train)
        o.check_batches()
        o.setup()
        from explainfix_cli.search.sweep import sweep as sweep_model

        loaded = o.load_model(model)
        dataset = o.load_data(data, loaded)
        adapt = None if train is None or finetune_epochs == 0 else _finetune_each(o, loaded, train, dataset, finetune_epochs)
        with _working("sweeping"):
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
            _stdout_table(f"sweep → {out}", ["pct", "params", "MACs", "nonzero kernels", result.metric or "metric", "drop", "latency ms"], rows)

        o.emit(result.to_json(), render)

    o.run(body)


for _info in app.registered_commands:  # every command, whoever added it, shows flags as flags
    if _info.cls in (None, TyperCommand):
        _info.cls = _Command
    _info.callback = _with_shared_options(_info.callback) if _info.callback else None


def main() -> None:
    """The console script: click's own usage errors also become one sentence and exit code 2."""
    command = typer.main.get_command(app)
    try:
        code = command.main(standalone_mode=False)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # a usage error of whichever click typer runs on
        message = getattr(e, "format_message", None)
        if message is None:
            raise
        if message():  # empty when the help was shown for a bare `explainfix`
            ctx = getattr(e, "ctx", None)
            where = ctx.command_path if ctx is not None and ctx.command_path != "explainfix" else "explainfix COMMAND"
            print(f"explainfix: error: {message()} (see {where} --help)", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)
