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
    pct: Annotated[float | None, typer.Option("--pct", help="Percentage of spatial kernels to zero, in [0, 100) (default 50, or chosen by a target).", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output .safetensors (default: MODEL-pruned.safetensors beside the input).")] = None,
    granularity: Annotated[Granularity, typer.Option("--granularity", help="kernel: zero kernels, remove dead channels. channel: remove the least salient channels.")] = Granularity.kernel,
    saliency_file: Annotated[Path | None, typer.Option("--saliency", help="Reuse scores written by `explainfix saliency`.")] = None,
    criterion: Annotated[CriterionOpt, typer.Option("--criterion", help="gradient (needs --data) or the data-free magnitude fallback.")] = CriterionOpt.gradient,
    fill: Annotated[FillOpt, typer.Option("--fill", help="Zeroed kernels that stay: keep zero, reset to old values, or fillzero re-initialise.")] = FillOpt.zero,
    removal: Annotated[RemovalOpt, typer.Option("--removal", help="exact: only removals that do not change the output (constants folded). aggressive: also drop silent channels unfolded, as the paper did (fine-tune afterwards).")] = RemovalOpt.exact,
    no_fix: Annotated[bool, typer.Option("--no-fix", help="Leave spatial filters trainable in the output.")] = False,
    max_drop: MaxDropOpt = None,
    max_params: MaxParamsOpt = None,
    max_macs: MaxMacsOpt = None,
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

        target = _target(pct, max_drop, max_params, max_macs)
        if pct is not None and not 0 <= pct < 100:
            raise UserError(f"--pct must be in [0, 100), not {pct}.")
        if criterion is CriterionOpt.gradient and data is None and saliency_file is None:
            raise UserError("gradient saliency needs data: pass --data D, or --criterion magnitude (with --input-size C,H,W) for the data-free fallback.")
        written = out or model.with_name(f"{model.stem}-pruned.safetensors")
        _setup(seed, device)
        loaded = _load_model(model, arch, arch_kwargs, trust_checkpoint)
        dataset = _load_data(data, batch_size, batches, image_size, grayscale)
        scores = load_saliency(str(saliency_file), loaded.model) if saliency_file else None
        options: dict[str, Any] = {
            "granularity": granularity.value, "criterion": criterion.value, "scores": scores, "fill": fill.value, "removal": removal.value,
            "fix": not no_fix, "arch": loaded.arch, "history": loaded.history, "out": written, "force": force, "seed": seed,
            "device": device, "sample_shape": _input_size(input_size),
        }  # fmt: skip
        with _working("pruning", as_json):
            if target is None:
                report = prune_model(loaded.model, dataset, pct=50.0 if pct is None else pct, **options)[1]
            else:
                report = _prune_to_target(loaded.model, dataset, target, options)
        payload = report.to_json()
        _emit(as_json, payload, lambda: _table(f"prune → {written}", _prune_rows(payload)))

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


# ---- sweep, and prune to a target (issue 12) ----------------------------------------------------
MaxDropOpt = Annotated[float | None, typer.Option("--max-drop", help="Instead of --pct: the largest pct whose metric on the data falls at most this much (e.g. 0.01).", show_default=False)]
MaxParamsOpt = Annotated[int | None, typer.Option("--max-params", help="Instead of --pct: the smallest pct whose model has at most this many parameters.", show_default=False)]
MaxMacsOpt = Annotated[int | None, typer.Option("--max-macs", help="Instead of --pct: the smallest pct whose model needs at most this many MACs per sample.", show_default=False)]


def _target(pct: float | None, max_drop: float | None, max_params: int | None, max_macs: int | None) -> Any:
    from .sweep import Target

    target = Target(max_drop, max_params, max_macs)
    if not target.given:
        return None
    if pct is not None:
        raise UserError("--pct and a target (--max-drop, --max-params, --max-macs) are alternatives; give one of them.")
    return target


def _prune_to_target(model: Any, data: Dataset | None, target: Any, options: dict[str, Any]) -> Any:
    """A target no pct meets is a correct request that cannot be satisfied: one sentence, exit 1."""
    from .sweep import TargetNotMet, prune_to_target

    try:
        return prune_to_target(model, data, target, **options)
    except TargetNotMet as e:
        print(f"explainfix: failed: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def _prune_rows(payload: dict[str, Any]) -> list[tuple[str, Any]]:
    """A prune report for a person: a target's limits in one cell, its probes counted (--json lists them)."""
    rows = []
    for key, value in payload.items():
        if key == "target":
            value = ", ".join(f"{k.replace('_', '-')} {v:,}" for k, v in value.items() if v is not None)
        elif key == "probes":
            value = f"{len(value)} pcts measured"
        rows.append((key, value))
    return rows


def _stdout_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@app.command()
def sweep(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Folder for sweep.json, sweep.csv and the figure (made if missing; other files in it are left alone).")],
    data: DataOpt = None,
    pcts: Annotated[str, typer.Option("--pcts", help="Comma-separated percentages of spatial kernels to zero, each in [0, 100).")] = "0,50,80,90,95,99",
    granularity: Annotated[Granularity, typer.Option("--granularity", help="kernel: zero kernels, remove dead channels. channel: remove the least salient channels.")] = Granularity.kernel,
    criterion: Annotated[CriterionOpt, typer.Option("--criterion", help="gradient (METHOD §1) or the data-free magnitude fallback.")] = CriterionOpt.gradient,
    removal: Annotated[RemovalOpt, typer.Option("--removal", help="exact or aggressive channel removal, as in prune.")] = RemovalOpt.exact,
    latency_repeats: Annotated[int, typer.Option("--latency-repeats", help="Timed forwards per model at batch 1 (median reported); 0 skips latency, making the files identical across runs.")] = 30,
    fmt: Annotated[FigureFormat, typer.Option("--format", help="Figure file format.")] = FigureFormat.png,
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
    """The metric / parameters / MACs / latency trade-off at several pcts, from one saliency pass."""

    def body() -> None:
        from .sweep import sweep as sweep_model

        try:
            values = [float(p) for p in pcts.split(",")]
        except ValueError:
            raise UserError(f"--pcts must be comma-separated numbers, e.g. 0,50,90, not {pcts!r}.") from None
        if data is None:
            raise UserError("sweep measures the metric at each pct: pass --data D.")
        _setup(seed, device)
        loaded = _load_model(model, arch, arch_kwargs, trust_checkpoint)
        dataset = _load_data(data, batch_size, batches, image_size, grayscale)
        with _working("sweeping", as_json):
            result = sweep_model(
                loaded.model, dataset, values, out_dir=out, criterion=criterion.value, granularity=granularity.value, removal=removal.value,  # type: ignore[arg-type]
                latency_repeats=latency_repeats, fmt=fmt.value, force=force, device=device,
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

        _emit(as_json, result.to_json(), render)

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
