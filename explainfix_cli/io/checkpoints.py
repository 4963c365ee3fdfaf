"""Models in (safetensors, state dict + architecture, trusted pickle, torch.export) and out.

The output format is one `.safetensors` file: every tensor of the model plus one metadata string,
`explainfix`, a JSON object with the format version, the architecture factory and kwargs, the
shape attributes of every layer (so a pruned model can be rebuilt), which tensors are fixed, the
history and the report. Reading it never unpickles anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import pickle
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from explainfix_cli.errors import UserError
from explainfix_cli.io.formats import ModelFormat, model_format
from explainfix_cli.io.outputs import atomic_file
from explainfix_cli.io.preprocessing import Preprocessing

FORMAT = "explainfix"
FORMAT_VERSION = "1"

# The attributes that define a layer's tensor shapes; a pruned layer differs from the factory's
# only in these, so recording them is enough to rebuild any pruned model from its factory.
SHAPE_ATTRIBUTES: dict[type[nn.Module], tuple[str, ...]] = {
    nn.modules.conv._ConvNd: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.modules.batchnorm._NormBase: ("num_features",),
    nn.GroupNorm: ("num_groups", "num_channels"),
    nn.LayerNorm: ("normalized_shape",),
    nn.PReLU: ("num_parameters",),
}
STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict", "model", "net", "weights")


@dataclass(frozen=True)
class ArchSpec:
    """An architecture: an importable factory (`module.path:name` or `file.py:name`) and kwargs."""

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        fn = resolve_factory(self.factory)
        try:
            model = fn(**self.kwargs)
        except TypeError as e:
            raise UserError(f"`arch` {self.factory} does not accept `arch_kwargs` {self.kwargs}: {e}.") from None
        if not isinstance(model, nn.Module):
            raise UserError(f"`arch` {self.factory} returned a {type(model).__name__}, not a torch nn.Module.")
        return model

    def to_json(self) -> dict[str, Any]:
        return {"factory": self.factory, "kwargs": self.kwargs}


@dataclass
class LoadedModel:
    """A model ready to use, with what is known about where it came from."""

    model: nn.Module
    arch: ArchSpec | None
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)  # parsed explainfix metadata, if any

    @property
    def history(self) -> list[dict[str, Any]]:
        return list(self.metadata.get("history", []))

    @property
    def preprocessing(self) -> Preprocessing | None:
        """The input normalisation the file records, if any (see `data.Preprocessing`)."""
        recorded = self.metadata.get("preprocessing")
        return None if recorded is None else Preprocessing.from_json(recorded)

    @property
    def input_size(self) -> tuple[int, ...] | None:
        """The input size (C, H, W) the latest step of the history recorded (a pruned file remembers
        it), or else the one the input preprocessing records (the input the model was trained on)."""
        recorded = next((h.get("input_size") for h in reversed(self.history) if h.get("input_size")), None)
        if recorded:
            return tuple(recorded)
        pre = self.preprocessing
        return (pre.channels, *pre.size) if pre is not None and pre.channels and pre.size else None


# Factories this package records in the files it writes, by the name an older release recorded:
# a file written before the package was laid out by stage still loads.
MOVED_FACTORIES = {"explainfix_cli.classes:one_vs_rest": "explainfix_cli.classes.extract:one_vs_rest"}


def resolve_factory(spec: str) -> Callable[..., Any]:
    """`package.module:factory`, or `path/to/file.py:factory` for a class defined in a script."""
    module_name, sep, attr = MOVED_FACTORIES.get(spec, spec).partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"`arch` {spec!r} must look like module.path:factory (e.g. explainfix_cli.zoo:resnet).")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                if file.stem.isidentifier() and importlib.util.find_spec(file.stem) is not None:
                    return resolve_factory(f"{file.stem}:{attr}")  # moved with its model: importable by name from here
                raise UserError(f"`arch` {spec}: the file {file} does not exist (nor is a module {file.stem} importable from here); check the path.")
            mod_spec = importlib.util.spec_from_file_location(f"explainfix_arch_{file.stem}", file)
            assert mod_spec is not None and mod_spec.loader is not None
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"`arch` {spec}: cannot import {module_name} ({e}); check the name, install the package, or pass `arch` path/to/file.py:{attr}.") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise UserError(f"`arch` {spec}: {module_name} has no attribute {attr}.")
    if not callable(fn):
        raise UserError(f"`arch` {spec}: {attr} is not callable.")
    return fn


def parse_arch(arch: str | None, arch_kwargs: str | None) -> ArchSpec | None:
    """The `--arch` / `--arch-kwargs` pair of the command line."""
    if arch is None:
        if arch_kwargs:
            raise UserError("`arch_kwargs` needs `arch` module.path:factory as well.")
        return None
    try:
        kwargs = json.loads(arch_kwargs) if arch_kwargs else {}
    except json.JSONDecodeError as e:
        raise UserError(f"`arch_kwargs` is not valid JSON ({e.msg}); write e.g. '{{\"num_classes\": 10}}'.") from None
    if not isinstance(kwargs, dict):
        raise UserError("`arch_kwargs` must be a JSON object, e.g. '{\"num_classes\": 10}'.")
    module_name, sep, attr = arch.partition(":")
    if module_name.endswith(".py") and Path(module_name).is_file():
        # recorded in the files we write: found again from any folder (or by the module's name, if moved)
        arch = f"{Path(module_name).resolve()}{sep}{attr}"
    return ArchSpec(arch, kwargs)


def open_model(
    path: str | Path,
    arch: ArchSpec | None = None,
    trust_checkpoint: bool = False,
) -> LoadedModel:
    """Load any supported model file (docs/cli.md "Models in"); the model is returned in eval mode."""
    path = Path(path)
    fmt = model_format(path)  # by content: a file's name may say anything
    if fmt == "safetensors":
        loaded = _open_safetensors(path, arch)
    elif fmt in ("torch-export", "onnx"):
        loaded = _open_exported(path, fmt)
    else:
        loaded = _open_torch(path, arch, trust_checkpoint)
    if fmt not in ("torch-export", "onnx"):  # an exported program's mode is fixed at export; its module refuses eval()
        loaded.model.eval()
    return loaded


def load_model(path: str | Path, arch: ArchSpec | str | None = None, trust_checkpoint: bool = False) -> nn.Module:
    """The public one-call loader: a ready `nn.Module`, fixed tensors with requires_grad=False."""
    if isinstance(arch, str):
        arch = ArchSpec(arch)
    return open_model(path, arch, trust_checkpoint).model


def _open_safetensors(path: Path, arch: ArchSpec | None) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}).") from None
    if FORMAT not in raw_meta:
        if arch is None:
            raise UserError(f"{path} holds bare tensors with no architecture; pass `arch` module.path:factory.")
        return LoadedModel(_build_and_load(arch, tensors, path), arch, path)
    meta = json.loads(raw_meta[FORMAT])
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has format version {meta.get('format_version')}; this explainfix reads {FORMAT_VERSION}.")
    recorded = ArchSpec(**meta["arch"]) if meta.get("arch") else None
    spec = arch or recorded
    if spec is None:
        raise UserError(f"{path} records no importable architecture; pass `arch` path/to/script.py:ClassName.")
    try:
        model = _build_and_load(spec, tensors, path, meta.get("shapes", {}))
    except UserError as e:
        raise UserError(f"{e} The file's architecture cannot be rebuilt here; pass `arch` path/to/script.py:ClassName pointing at its code.") from None
    fixed = set(meta.get("fixed", []))
    for name, p in model.named_parameters():
        p.requires_grad_(name not in fixed)
    return LoadedModel(model, spec, path, meta)


def _open_exported(path: Path, fmt: ModelFormat) -> LoadedModel:
    """An exported file (`.pt2`, `.onnx`) as a module that runs it, with the record explainfix wrote into it (docs/export.md)."""
    from explainfix_cli.export.runtime import open_onnx, open_program

    model = open_onnx(path) if fmt == "onnx" else open_program(path)
    return LoadedModel(model, None, path, model.metadata)


def _open_torch(path: Path, arch: ArchSpec | None, trust_checkpoint: bool) -> LoadedModel:
    try:
        with open(path, "rb") as f:  # a file object: torch.load would go by a .safetensors name
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_checkpoint:
            raise UserError(
                f"{path} is a pickled Python object, and loading it runs code from the file; "
                "pass `trust_checkpoint` if you trust its source, or save a state dict and pass `arch`."
            ) from None
        obj = _load_pickle(path, _script_folder(arch))
    except Exception as e:  # the weights-only unpickler runs no code; any other failure means a damaged or foreign file
        raise UserError(f"{path} is not a readable PyTorch checkpoint (truncated or another format: {type(e).__name__}: {e}).") from None
    if isinstance(obj, nn.Module):
        cls = type(obj)
        return LoadedModel(obj, arch or ArchSpec(f"{cls.__module__}:{cls.__qualname__}"), path)
    state = _unwrap_state_dict(obj, path)
    if arch is None:
        raise UserError(f"{path} is a state dict, which has no architecture; pass `arch` module.path:factory.")
    return LoadedModel(_build_and_load(arch, state, path), arch, path)


def _script_folder(arch: ArchSpec | None) -> Path | None:
    """The folder of an `arch` given as path/to/script.py:Name, where that script's classes live."""
    module_name = arch.factory.partition(":")[0] if arch is not None else ""
    return Path(module_name).resolve().parent if module_name.endswith(".py") and Path(module_name).is_file() else None


def _load_pickle(path: Path, script_folder: Path | None = None) -> Any:
    """Unpickle a whole model (trusted). A class pickled from a user's script (module `script`) is
    found when `arch` names that script: its folder is importable for this load only."""
    added = script_folder is not None and str(script_folder) not in sys.path
    if added:
        sys.path.insert(0, str(script_folder))
    try:
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError) as e:
        hint = "" if script_folder is not None else ", or pass `arch` path/to/script.py:ClassName naming the script that defines it"
        raise UserError(f"{path} refers to code that cannot be imported here ({e}); import or install it first{hint}.") from None
    except Exception as e:  # unpickling arbitrary objects can fail in any way
        raise UserError(f"{path} could not be unpickled ({type(e).__name__}: {e}).") from None
    finally:
        if added:
            sys.path.remove(str(script_folder))


def _unwrap_state_dict(obj: Any, path: Path) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in STATE_DICT_WRAPPERS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
            if isinstance(inner, nn.Module):
                return inner.state_dict()
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise UserError(f"{path} holds neither a state dict nor a model (keys: {list(obj)[:5] if isinstance(obj, Mapping) else type(obj).__name__}).")


def _build_and_load(
    arch: ArchSpec, state: Mapping[str, torch.Tensor], path: Path, shapes: Mapping[str, Mapping[str, Any]] | None = None
) -> nn.Module:
    """Build `arch`, give it the layer shapes of a pruned model (ours) and load `state` into it.

    The build runs on the meta device, so no time goes into a random initialisation that `state`
    overwrites (half of loading resnet50). A factory that cannot build there, or a model left with
    tensors `state` does not hold (non-persistent buffers, plain tensor attributes), is built again
    for real.
    """
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                model = arch.build()
        except Exception:  # a factory that computes with its tensors (.item(), numpy) cannot run on meta
            if device == "cpu":
                raise
            continue
        _apply_shapes(model, shapes or {})
        _load_tensors(model, state, path, strict=shapes is not None)
        if not _holds_meta(model):
            break
    return model


def _holds_meta(model: nn.Module) -> bool:
    """Is any parameter, buffer or tensor attribute of `model` still without data?"""
    return any(
        isinstance(v, torch.Tensor) and v.is_meta
        for m in model.modules()
        for v in (*m._parameters.values(), *m._buffers.values(), *vars(m).values())
    )


def _load_tensors(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, strict: bool) -> None:
    """Load `state` into `model`, replacing tensors whose shape differs only when `strict` (ours)."""
    own = model.state_dict()
    # DataParallel / DistributedDataParallel checkpoints prefix every key with "module."
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in own):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not _is_optional_slot(model, k)]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"{path} does not match the architecture ({what}); check `arch` and `arch_kwargs`.")
    for name, tensor in state.items():
        if name in own and own[name].shape != tensor.shape and not strict:
            raise UserError(
                f"{path}: {name} has shape {tuple(tensor.shape)} but the architecture expects "
                f"{tuple(own[name].shape)}; check `arch_kwargs`."
            )
        _set_tensor(model, name, tensor)


def _is_optional_slot(model: nn.Module, name: str) -> bool:
    """A tensor slot the factory leaves empty (a conv built with bias=False that pruning gave a bias)."""
    owner, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:  # a tensor of another architecture: no such layer here
        return False
    return attr in module._parameters or attr in module._buffers


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    # the tensors come fresh from the file: no copy
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
    else:
        module._buffers[attr] = tensor


def shape_attributes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per layer, the attributes that fix its tensor shapes (see SHAPE_ATTRIBUTES)."""
    shapes: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        for cls, attrs in SHAPE_ATTRIBUTES.items():
            if isinstance(module, cls):
                shapes[name] = {a: _jsonable(getattr(module, a)) for a in attrs}
    return shapes


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _apply_shapes(model: nn.Module, shapes: Mapping[str, Mapping[str, Any]]) -> None:
    for name, attrs in shapes.items():
        module = model.get_submodule(name)
        for attr, value in attrs.items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)


def save_model(
    model: nn.Module,
    path: str | Path,
    *,
    arch: ArchSpec | None,
    history: list[dict[str, Any]] | None = None,
    report: Mapping[str, Any] | None = None,
    preprocessing: Preprocessing | None = None,
    force: bool = False,
) -> Path:
    """Write `model` as one safetensors file that `load_model` rebuilds exactly (docs/cli.md "Models out").

    `preprocessing` records how the model's inputs are made from images, so that `load_data`
    normalises a folder of images the same way.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors, storages = {}, set()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        storage = t.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory (tied weights): copy the second and later
        tensors[name] = t.clone() if storage in storages else t
        storages.add(storage)
    fixed = sorted(name for name, p in model.named_parameters() if not p.requires_grad)
    # one metadata entry: safetensors stores several in hash order, which would break byte-identical output
    metadata = {
        FORMAT: json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "arch": arch.to_json() if arch else None,
                "shapes": shape_attributes(model),
                "fixed": fixed,
                "history": history or [],
                "report": dict(report or {}),
                **({"preprocessing": preprocessing.to_json()} if preprocessing is not None else {}),
            },
            sort_keys=True,
        )
    }
    with atomic_file(path, force) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path
