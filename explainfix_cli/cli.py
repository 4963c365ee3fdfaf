"""The `explainfix` command line: options in, one library call, rich tables or JSON out.

Data goes to stdout (one JSON object with --json), talk goes to stderr. Bad input exits 2 with
one sentence, failures inside a correct request exit 1; --debug shows the traceback. torch and
friends are imported inside the commands so that --help and completion answer at once.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from .errors import UserError

if TYPE_CHECKING:
    from .checkpoints import LoadedModel
    from .data import Dataset

app = typer.Typer(
    name="explainfix",
    help="Prune a CNN by spatial-filter saliency, fix its spatial filters, and explain its spectra (ExplainFix).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
T = TypeVar("T")


class Granularity(str, Enum):
    kernel = "kernel"
    channel = "channel"


class CriterionOpt(str, Enum):
    gradient = "gradient"
    magnitude = "magnitude"


class RemovalOpt(str, Enum):
    exact = "exact"
    aggressive = "aggressive"


class AttributionOpt(str, Enum):
    saliency = "saliency"
    integrated_gradients = "integrated-gradients"


class FillOpt(str, Enum):
    zero = "zero"
    reset = "reset"
    fillzero = "fillzero"


# ---- options shared by the commands -------------------------------------------------------------
ModelArg = Annotated[Path, typer.Argument(help="Model: .safetensors written by explainfix, a state dict .pt/.pth (with --arch), a pickled module (with --trust-checkpoint), or a .pt2 program.", show_default=False)]
ArchOpt = Annotated[str | None, typer.Option("--arch", help="Architecture factory module.path:name (or file.py:name) for state dicts, e.g. explainfix_cli.zoo:resnet.")]
ArchKwargsOpt = Annotated[str | None, typer.Option("--arch-kwargs", help="JSON keyword arguments for --arch, e.g. '{\"num_classes\": 10}'.")]
TrustOpt = Annotated[bool, typer.Option("--trust-checkpoint", help="Allow loading a pickled module (this runs code from the file).")]
DataOpt = Annotated[Path | None, typer.Option("--data", help="Data: .npz/.safetensors with x (N,C,H,W) and y, or a folder with one sub-folder of images per class.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Minibatch size.")]
BatchesOpt = Annotated[int | None, typer.Option("--batches", help="Use only the first N minibatches.")]
ImageSizeOpt = Annotated[int | None, typer.Option("--image-size", help="Resize images of an image folder to this square size.")]
GrayscaleOpt = Annotated[bool, typer.Option("--grayscale", help="Read images of an image folder as one channel.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed: same inputs and seed give byte-identical outputs.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, or cuda when present.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the traceback of errors.")]
InputSizeOpt = Annotated[str | None, typer.Option("--input-size", help="Input size C,H,W for MACs and tracing when no --data is given, e.g. 1,16,16.")]


def _stderr():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(stderr=True)


def _run(debug: bool, fn: Callable[[], T]) -> T:
    """Run a command body: bad input → one sentence and exit 2; a failure → exit 1."""
    try:
        return fn()
    except UserError as e:
        if debug:
            raise
        print(f"explainfix: error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as e:
        if debug:
            raise
        print(f"explainfix: failed: {type(e).__name__}: {e} (run again with --debug for the traceback)", file=sys.stderr)
        raise typer.Exit(1) from None


def _emit(as_json: bool, payload: dict[str, Any], render: Callable[[], None]) -> None:
    if as_json:
        sys.stdout.write(json.dumps(payload, allow_nan=True) + "\n")
    else:
        render()


@contextmanager
def _working(message: str, quiet: bool) -> Iterator[None]:
    """A spinner on stderr, only for a person at a terminal."""
    if quiet or not sys.stderr.isatty():
        yield
        return
    with _stderr().status(message):
        yield


def _setup(seed: int, device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for a GPU but none is available here; use --device cpu.")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device must be cpu or cuda, not {device!r}.")
    torch.manual_seed(seed)


def _load_model(model: Path, arch: str | None, arch_kwargs: str | None, trust: bool, eager: bool = True) -> LoadedModel:
    from .checkpoints import open_model, parse_arch

    if eager and model.suffix == ".pt2":
        # an exported program keeps no nn.Conv2d modules to score, cut or explain
        raise UserError(f"{model} is a torch.export program, which only `info` reads; pass the model's state dict with --arch instead.")
    return open_model(model, parse_arch(arch, arch_kwargs), trust)


def _load_data(data: Path | None, batch_size: int, batches: int | None, image_size: int | None, grayscale: bool) -> Dataset | None:
    from .data import load_data

    return None if data is None else load_data(data, batch_size, batches, image_size, grayscale)


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
    _stderr().print(table)


# ---- commands -----------------------------------------------------------------------------------
@app.command()
def info(
    model: ModelArg,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_checkpoint: TrustOpt = False,
    input_size: InputSizeOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Layers, parameters, spatial kernels, fixed tensors, MACs and the file's metadata."""

    def body() -> None:
        from .info import describe

        result = describe(_load_model(model, arch, arch_kwargs, trust_checkpoint, eager=False), _input_size(input_size))

        def render() -> None:
            from rich.table import Table

            table = Table(title=f"{result.path}")
            for col in ("layer", "type", "weight", "params", "zero kernels", "fixed"):
                table.add_column(col)
            for layer in result.layers:
                zero = "" if layer.zero_kernels is None else f"{layer.zero_kernels}"
                table.add_row(layer.name, layer.type, "x".join(map(str, layer.weight_shape)), f"{layer.params:,}", zero, "yes" if layer.fixed else "")
            _stderr().print(table)
            _table("summary", [
                ("architecture", result.arch), ("parameters", result.params), ("trainable", result.trainable_params),
                ("spatial layers", result.spatial_layers), ("spatial kernels", result.spatial_kernels),
                ("all-zero kernels", result.zero_kernels), ("fixed tensors", len(result.fixed_tensors)),
                ("MACs per sample", "pass --input-size C,H,W" if result.macs is None else f"{result.macs:,} at {result.input_size}"),
                ("history", ", ".join(h.get("step", "?") for h in result.history) or "none"),
            ])

        _emit(as_json, result.to_json(), render)

    _run(debug, body)


@app.command()
def saliency(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Where to write the score matrices (.safetensors).")],
    data: DataOpt = None,
    criterion: Annotated[CriterionOpt, typer.Option("--criterion", help="gradient (METHOD §1, needs --data) or the data-free magnitude fallback.")] = CriterionOpt.gradient,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_checkpoint: TrustOpt = False,
    batch_size: BatchSizeOpt = 64,
    batches: BatchesOpt = None,
    image_size: ImageSizeOpt = None,
    grayscale: GrayscaleOpt = False,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    debug: DebugOpt = False,
) -> None:
    """Per spatial layer, the (O, I/groups) kernel saliency matrix, keyed by the conv's name."""

    def body() -> None:
        from .outputs import check_target
        from .saliency import save_saliency, spatial_saliency

        check_target(out, force)
        _setup(seed, device)
        loaded = _load_model(model, arch, arch_kwargs, trust_checkpoint)
        dataset = _load_data(data, batch_size, batches, image_size, grayscale)
        with _working("computing saliency", as_json):
            scores = spatial_saliency(loaded.model.to(device), dataset, criterion.value, device)
        save_saliency(scores, str(out), force, criterion.value)
        layers = {name: {"shape": list(s.shape), "total": float(s.sum()), "max": float(s.max())} for name, s in scores.items()}
        payload = {"out": str(out), "criterion": criterion.value, "layers": layers}
        _emit(as_json, payload, lambda: _table(f"saliency → {out}", [(k, f"{v['shape']}  sum {v['total']:.4g}") for k, v in layers.items()]))

    _run(debug, body)


@app.command()
def prune(
    model: ModelArg,
    data: DataOpt = None,
    pct: Annotated[float, typer.Option("--pct", help="Percentage of spatial kernels to zero, in [0, 100).")] = 50.0,
    out: Annotated[Path | None, typer.Option("--out", help="Output .safetensors (default: MODEL-pruned.safetensors beside the input).")] = None,
    granularity: Annotated[Granularity, typer.Option("--granularity", help="kernel: zero kernels, remove dead channels. channel: remove the least salient channels.")] = Granularity.kernel,
    saliency_file: Annotated[Path | None, typer.Option("--saliency", help="Reuse scores written by `explainfix saliency`.")] = None,
    criterion: Annotated[CriterionOpt, typer.Option("--criterion", help="gradient (needs --data) or the data-free magnitude fallback.")] = CriterionOpt.gradient,
    fill: Annotated[FillOpt, typer.Option("--fill", help="Zeroed kernels that stay: keep zero, reset to old values, or fillzero re-initialise.")] = FillOpt.zero,
    removal: Annotated[RemovalOpt, typer.Option("--removal", help="exact: only removals that do not change the output (constants folded). aggressive: also drop silent channels unfolded, as the paper did (fine-tune afterwards).")] = RemovalOpt.exact,
    no_fix: Annotated[bool, typer.Option("--no-fix", help="Leave spatial filters trainable in the output.")] = False,
    input_size: InputSizeOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_checkpoint: TrustOpt = False,
    batch_size: BatchSizeOpt = 64,
    batches: BatchesOpt = None,
    image_size: ImageSizeOpt = None,
    grayscale: GrayscaleOpt = False,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    debug: DebugOpt = False,
) -> None:
    """Zero the least salient spatial kernels, remove dead channels, write a smaller fixed-filter model."""

    def body() -> None:
        from .pruning import prune as prune_model
        from .saliency import load_saliency

        if not 0 <= pct < 100:
            raise UserError(f"--pct must be in [0, 100), not {pct}.")
        if criterion is CriterionOpt.gradient and data is None and saliency_file is None:
            raise UserError("gradient saliency needs data: pass --data D, or --criterion magnitude (with --input-size C,H,W) for the data-free fallback.")
        target = out or model.with_name(f"{model.stem}-pruned.safetensors")
        _setup(seed, device)
        loaded = _load_model(model, arch, arch_kwargs, trust_checkpoint)
        dataset = _load_data(data, batch_size, batches, image_size, grayscale)
        scores = load_saliency(str(saliency_file), loaded.model) if saliency_file else None
        with _working("pruning", as_json):
            _, report = prune_model(
                loaded.model, dataset, pct=pct, granularity=granularity.value, criterion=criterion.value, scores=scores, fill=fill.value, removal=removal.value,
                fix=not no_fix, arch=loaded.arch, history=loaded.history, out=target, force=force, seed=seed,
                device=device, sample_shape=_input_size(input_size),
            )
        payload = report.to_json()
        _emit(as_json, payload, lambda: _table(f"prune → {target}", [(k, v) for k, v in payload.items()]))

    _run(debug, body)


class FigureFormat(str, Enum):
    png = "png"
    svg = "svg"
    pdf = "pdf"


@app.command()
def explain(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Folder to write the figures, spectra.json and index.html to.")],
    data: DataOpt = None,
    fmt: Annotated[FigureFormat, typer.Option("--format", help="Figure file format.")] = FigureFormat.png,
    attributions: Annotated[int, typer.Option("--attributions", help="Inputs to show attribution maps for (needs --data; 0 for none).")] = 4,
    attribution_method: Annotated[AttributionOpt, typer.Option("--attribution-method", help="saliency (input gradient, one backward pass) or integrated-gradients (more faithful, 32 passes per input).")] = AttributionOpt.saliency,
    log_scale: Annotated[bool, typer.Option("--log-scale", help="Logarithmic colour scale in the spectra heatmaps and the kernel saliency grid.")] = False,
    with_figures: Annotated[bool, typer.Option("--figures/--no-figures", help="Draw the figures and attributions; --no-figures writes spectra.json and index.html only (fast, for CI).")] = True,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_checkpoint: TrustOpt = False,
    batch_size: BatchSizeOpt = 64,
    batches: BatchesOpt = None,
    image_size: ImageSizeOpt = None,
    grayscale: GrayscaleOpt = False,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    debug: DebugOpt = False,
) -> None:
    """Which spatial frequencies each layer uses (ExplainSteer, METHOD §5): figures, spectra and attributions."""

    def body() -> None:
        from .explain import explain as explain_model
        from .outputs import check_target

        check_target(out, force)
        _setup(seed, device)
        loaded = _load_model(model, arch, arch_kwargs, trust_checkpoint)
        dataset = _load_data(data, batch_size, batches, image_size, grayscale)
        with _working("explaining", as_json):
            result = explain_model(
                loaded.model.to(device), dataset, out, fmt=fmt.value, attributions=attributions, attribution_method=attribution_method.value, force=force,
                log_scale=log_scale, with_figures=with_figures, device=device,
            )
        shares = [(s.name, f"{'x'.join(map(str, s.kernel_shape))}  low-frequency share {s.low_frequency_share:.2f}") for s in result.layers]
        _emit(as_json, result.to_json(), lambda: _table(f"explain → {out / 'index.html'}", shares))

    _run(debug, body)


# ---- class-specific filters (METHOD §6): classes, extract --------------------------------------
def _stdout():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console()


def _require_data(data: Path | None, batch_size: int, batches: int | None, image_size: int | None, grayscale: bool) -> Dataset:
    dataset = _load_data(data, batch_size, batches, image_size, grayscale)
    if dataset is None:
        raise UserError("this command needs data with class labels: pass --data D.")
    return dataset


@app.command()
def classes(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Folder to write classes.json and the figures into (made if missing; other files in it are left alone).")],
    data: DataOpt = None,
    share: Annotated[float, typer.Option("--share", help="Share of a class's positive importance its needed channels must reach.")] = 0.9,
    bins: Annotated[int, typer.Option("--bins", help="Quantile bins of each channel's pooled activation for the mutual information.")] = 8,
    with_figures: Annotated[bool, typer.Option("--figures/--no-figures", help="Draw the heatmap and the channels-needed figure.")] = True,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_checkpoint: TrustOpt = False,
    batch_size: BatchSizeOpt = 64,
    batches: BatchesOpt = None,
    image_size: ImageSizeOpt = None,
    grayscale: GrayscaleOpt = False,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    debug: DebugOpt = False,
) -> None:
    """Which channels serve which class (METHOD §6): importance, channels needed, MI specificity."""

    def body() -> None:
        from .classes import classes as analyse

        _setup(seed, device)
        loaded = _load_model(model, arch, arch_kwargs, trust_checkpoint)
        dataset = _require_data(data, batch_size, batches, image_size, grayscale)
        with _working("analysing classes", as_json):
            result = analyse(loaded.model.to(device), dataset, out, share=share, bins=bins, with_figures=with_figures, force=force, device=device)

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

        _emit(as_json, result.to_json(), render)

    _run(debug, body)


@app.command()
def extract(
    model: ModelArg,
    target: Annotated[int, typer.Option("--class", help="The class to keep (its index in the model's outputs).")],
    data: DataOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output .safetensors (default: MODEL-classK.safetensors beside the input).")] = None,
    keep: Annotated[float | None, typer.Option("--keep", help="Share of the class's importance kept in every coupled channel group, in [0, 1].")] = None,
    max_drop: Annotated[float | None, typer.Option("--max-drop", help="Instead of --keep: the largest one-vs-rest AUC drop allowed on --data (bisection on the share).")] = None,
    val: Annotated[Path | None, typer.Option("--val", help="Held-out data to report the sub-model's AUC and accuracy on.")] = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_checkpoint: TrustOpt = False,
    batch_size: BatchSizeOpt = 64,
    batches: BatchesOpt = None,
    image_size: ImageSizeOpt = None,
    grayscale: GrayscaleOpt = False,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    debug: DebugOpt = False,
) -> None:
    """A one-vs-rest sub-model for one class, without the channels it does not need (METHOD §6)."""

    def body() -> None:
        from .classes import extract as extract_class

        if keep is None and max_drop is None:
            raise UserError("pass --keep F (share of the class's importance to keep) or --max-drop X (largest AUC drop).")
        if keep is not None and max_drop is not None:
            raise UserError("pass --keep or --max-drop, not both.")
        target_path = out or model.with_name(f"{model.stem}-class{target}.safetensors")
        _setup(seed, device)
        loaded = _load_model(model, arch, arch_kwargs, trust_checkpoint)
        dataset = _require_data(data, batch_size, batches, image_size, grayscale)
        held_out = _load_data(val, batch_size, None, image_size, grayscale)
        with _working(f"extracting class {target}", as_json):
            _, report = extract_class(
                loaded.model.to(device), dataset, target, keep=keep, max_drop=max_drop, val=held_out, arch=loaded.arch,
                history=loaded.history, out=target_path, force=force, device=device,
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

        _emit(as_json, report.to_json(), render)

    _run(debug, body)


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
            print(f"explainfix: error: {message()} (see explainfix COMMAND --help)", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)
