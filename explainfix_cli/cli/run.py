"""Running one command body: bad input -> one sentence and exit 2, a failure -> exit 1, Ctrl-C ->
130 (the torchrun failure flag set in each case); the checks that answer before torch is imported;
loading the model and data a command names; the shared options as one `Inputs` object."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from explainfix_cli import distributed
from explainfix_cli.cli.options import in_flags
from explainfix_cli.cli.render import emit
from explainfix_cli.errors import UserError
from explainfix_cli.io.formats import is_images

if TYPE_CHECKING:
    from explainfix_cli.io.checkpoints import LoadedModel
    from explainfix_cli.io.data import Dataset
    from explainfix_cli.io.preprocessing import Preprocessing

T = TypeVar("T")
INTERRUPTED = "interrupted; nothing was written."


def run_body(debug: bool, fn: Callable[[], T]) -> T:
    """Run a command body: bad input → one sentence and exit 2; a failure → exit 1; Ctrl-C → one
    sentence and exit 130."""
    try:
        return fn()
    except UserError as e:
        distributed.mark_failed()
        if debug:
            raise
        print(f"explainfix: error: {in_flags(str(e))}", file=sys.stderr)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:  # outputs are written atomically (io/outputs), so an interrupted one leaves nothing
        distributed.mark_failed()
        if debug:
            raise
        print(f"explainfix: {INTERRUPTED}", file=sys.stderr)
        raise typer.Exit(130) from None
    except Exception as e:
        distributed.mark_failed()
        if debug:
            raise
        print(f"explainfix: failed: {type(e).__name__}: {e} (run again with --debug for the traceback)", file=sys.stderr)
        raise typer.Exit(1) from None



def setup(seed: int, device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for a GPU but none is available here; use --device cpu.")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device must be cpu or cuda, not {device!r}.")
    torch.manual_seed(seed)


def load_model(model: Path, arch: str | None, arch_kwargs: str | None, trust: bool, eager: bool = True) -> LoadedModel:
    from explainfix_cli.io.checkpoints import open_model, parse_arch
    from explainfix_cli.io.formats import model_format

    fmt = model_format(model) if eager else None
    if fmt in ("torch-export", "onnx"):
        # an exported file keeps no nn.Conv2d modules to score, cut or explain
        what = "a torch.export program" if fmt == "torch-export" else "an ONNX model"
        raise UserError(f"{model} is {what}, which only info, evaluate and bench read; pass the model's safetensors file, or its state dict with --arch, instead.")
    return open_model(model, parse_arch(arch, arch_kwargs), trust)


def load_data(
    data: Path | None,
    batch_size: int,
    batches: int | None,
    image_size: int | None,
    grayscale: bool,
    mean: str | None = None,
    std: str | None = None,
    model: LoadedModel | None = None,
    workers: int | None = None,
    augment: str = "none",
    uncertain: str = "zeros",
) -> Dataset | None:
    """The data, images normalised by --mean/--std or else by the model file's own record, read
    grey or colour as the model's first convolution takes them."""
    from explainfix_cli.io.data import input_channels, load_data

    explicit = explicit_preprocessing(data, mean, std)
    if data is None:
        return None
    recorded = model.preprocessing if model is not None else None
    channels = input_channels(model.model) if model is not None and is_images(data) else None
    return load_data(
        data, batch_size, batches, image_size, grayscale, override_preprocessing(recorded, explicit),
        channels=channels, workers=workers, augment=augment, uncertain=uncertain,  # type: ignore[arg-type]
    )


def default_augment(augment: str, data: Path) -> str:
    """finetune --augment: as given, else light for images and none for tensor files."""
    return augment or ("light" if is_images(data) else "none")


def override_preprocessing(recorded: Preprocessing | None, explicit: Preprocessing | None) -> Preprocessing | None:
    """--mean/--std replace the model's mean and std; its channel count and image size still apply."""
    from dataclasses import replace

    if recorded is None or explicit is None:
        return explicit or recorded
    return replace(recorded, mean=explicit.mean, std=explicit.std)


def folder_preprocessing(data: Path | None, mean: str | None, std: str | None, model: LoadedModel) -> dict[str, Any] | None:
    """The normalisation `load_data` applies to `data`: only an image folder gets one."""
    applied = override_preprocessing(model.preprocessing, explicit_preprocessing(data, mean, std)) if data is not None and is_images(data) else None
    return None if applied is None else applied.to_json()


def explicit_preprocessing(data: Path | None, mean: str | None, std: str | None) -> Preprocessing | None:
    """--mean/--std, checked before torch is imported: they normalise a folder of images only."""
    from explainfix_cli.io.preprocessing import parse_preprocessing

    explicit = parse_preprocessing(mean, std)
    if explicit is not None and data is not None and not is_images(data):
        raise UserError(f"--mean/--std normalise images (a folder or a list); the x of {data} is used as stored (already preprocessed), so drop them.")
    return explicit


def check_paths(model: Path | None = None, data: Path | None = None, val: Path | None = None, train: Path | None = None) -> None:
    """The checks that need no model, run before torch is imported: a typo answers at once."""
    from explainfix_cli.io.formats import model_format

    if model is not None:
        model_format(model)
    for flag, path in (("--data", data), ("--val", val), ("--train", train)):
        if path is not None and not path.exists():
            raise UserError(f"{flag} {path} does not exist.")


def check_batches(batch_size: int, batches: int | None, image_size: int | None) -> None:
    for flag, value in (("--batch-size", batch_size), ("--batches", batches), ("--image-size", image_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, not {value}.")



def needs_data(criterion: Enum, data: Path | None) -> None:
    if criterion.value == "gradient" and data is None:
        raise UserError("gradient saliency needs data: pass --data D, or --criterion magnitude (with --input-size C,H,W) for the data-free fallback.")


def parse_input_size(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise UserError(f"--input-size must be three positive integers C,H,W, e.g. 1,16,16, not {text!r}.")
    return size


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
    workers: int | None = None
    uncertain: str = "zeros"

    def load_model(self, path: Path, eager: bool = True) -> LoadedModel:
        return load_model(path, self.arch, self.arch_kwargs, self.trust_checkpoint, eager)

    def load_data(self, path: Path | None, model: LoadedModel | None = None, every_batch: bool = False, augment: str = "none") -> Dataset | None:
        """`path` as data, normalised the model's way; `every_batch` ignores --batches (held-out
        data); `augment` for training data (finetune --augment)."""
        batches = None if every_batch else self.batches
        return load_data(path, self.batch_size, batches, self.image_size, self.grayscale, self.mean, self.std, model, self.workers, augment, self.uncertain)

    def check_batches(self) -> None:
        check_batches(self.batch_size, self.batches, self.image_size)

    def setup(self) -> None:
        setup(self.seed, self.device)

    def emit(self, payload: dict[str, Any], render: Callable[[], None]) -> None:
        emit(self.as_json, payload, render)

    def run(self, fn: Callable[[], T]) -> T:
        return run_body(self.debug, fn)
