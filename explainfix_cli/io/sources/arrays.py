"""Tensors in a file: `.npz` or `.safetensors` holding `x` and `y` (docs/method.md §1).

An uncompressed member is memory-mapped (numpy cannot map a `.npz` member itself: the member's
data offset is read from its zip header; a safetensors tensor's from the file's JSON header), so
a large file is read minibatch by minibatch; a compressed `.npz` is read whole, once.
"""

from __future__ import annotations

import json
import random
import struct
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from explainfix_cli.errors import UserError
from explainfix_cli.io.augment import augment_tensors
from explainfix_cli.io.formats import is_zip, sniff
from explainfix_cli.io.sources.base import Augment, Source, TargetKind, stacked

SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                      "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
CHECK_WHOLE_BYTES = 256 << 20  # inputs up to this size are checked for NaN before the first minibatch


def kind_of(y: Any) -> TargetKind:
    return {1: "labels", 2: "multilabel"}.get(len(y.shape), "mask")  # type: ignore[return-value]


class ArraySource(Source):
    """`x` (N, C, H, W) and `y` as tensors or (memory-mapped) arrays, read by rows."""

    def __init__(self, x: Any, y: Any, name: str = "the data") -> None:
        self.x, self.name = x, name
        self.kind = kind_of(y)
        self.sample_shape, self.target_shape = tuple(x.shape[1:]), tuple(y.shape[1:])
        self.labels = _tensor(y) if self.kind != "mask" else None
        self.masks = y if self.kind == "mask" else None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def rows(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        sel: Any = list(indices)
        if isinstance(indices, range) and indices.step == 1:
            sel = slice(indices.start, indices.stop)
        x = rows_for_main(self.x[sel], torch.float32)
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x.flatten(1))).any(dim=1).nonzero()[0])
            raise UserError(f"{self.name}: x contains NaN or infinite values (sample {list(indices)[bad]}).")
        y = self.labels[sel] if self.labels is not None else rows_for_main(self.masks[sel], torch.float32)  # type: ignore[index]
        return x, y

    def fetch(self, indices: Sequence[int], seed: int | None, augment: Augment) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.rows(indices)
        self.decoded += len(x)
        if seed is None or augment == "none":
            return x, y
        pairs = [augment_tensors(x[k], y[k], self.kind == "mask", random.Random(seed * 1_000_003 + i), augment) for k, i in enumerate(indices)]
        return stacked([p[0] for p in pairs]), stacked([p[1] for p in pairs])


def _tensor(a: Any) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a))


def rows_for_main(rows: Any, dtype: torch.dtype) -> torch.Tensor:
    """An array's (or a tensor's) rows as a `dtype` tensor; in a DataLoader worker, converted
    straight into shared memory, for the reason `base.stacked` gives."""
    if torch.utils.data.get_worker_info() is None:
        return _tensor(rows).to(dtype)
    out = torch.empty(tuple(rows.shape), dtype=dtype).share_memory_()
    if isinstance(rows, torch.Tensor):
        return out.copy_(rows)
    out.numpy()[...] = rows  # numpy casts as it copies: no private copy to free
    return out


def read_arrays(path: Path, mapped: bool) -> dict[str, Any]:
    """The arrays of a .npz or safetensors file, told apart by content, not by name; uncompressed
    ones memory-mapped when `mapped`."""
    kind = sniff(path)
    if kind in ("torch-zip", "torch-export"):
        raise UserError(f"data {path} is a PyTorch model file, not data; pass a .npz or .safetensors file with x and y.")
    if is_zip(path):
        try:
            return _npz_arrays(path, mapped)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise UserError(f"{path} is not a readable .npz file ({e}).") from None
    if kind == "safetensors":
        return _safetensors_arrays(path, mapped)
    raise UserError(f"data {path} is neither a .npz nor a safetensors file nor a folder of images per class.")


def _npz_arrays(path: Path, mapped: bool) -> dict[str, Any]:
    arrays: dict[str, Any] = {}
    with np.load(path, allow_pickle=False) as f, zipfile.ZipFile(path) as z:
        for key in f.files:
            info = z.getinfo(key + ".npy")
            mm = _npz_member_map(path, info) if mapped and info.compress_type == zipfile.ZIP_STORED else None
            arrays[key] = mm if mm is not None else f[key]
    return arrays


def _npz_member_map(path: Path, info: zipfile.ZipInfo) -> np.memmap | None:
    """An uncompressed `.npy` member mapped at its offset: the local header (30 bytes, then the
    name and the extra field), then the .npy header, then the data."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if dtype.hasobject or fortran:
            return None
        return np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape)


def _safetensors_arrays(path: Path, mapped: bool) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        metadata = header.pop("__metadata__", None) or {}
        if mapped and all(v["dtype"] in SAFETENSORS_DTYPES for v in header.values()):
            arrays: dict[str, Any] = {
                k: np.memmap(path, dtype=SAFETENSORS_DTYPES[v["dtype"]], mode="r", offset=8 + n + v["data_offsets"][0], shape=tuple(v["shape"]))
                if int(np.prod(v["shape"])) else np.zeros(v["shape"], SAFETENSORS_DTYPES[v["dtype"]])
                for k, v in header.items()
            }
        else:
            arrays = dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError, KeyError, struct.error) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}).") from None
    if "classes" in metadata:  # safetensors holds no strings: class names are a JSON list in the metadata
        try:
            arrays["classes"] = np.array(json.loads(metadata["classes"]), dtype=str)
        except (json.JSONDecodeError, ValueError):
            raise UserError(f"{path}: the metadata entry classes must be a JSON list of class names.") from None
    return arrays


def class_names(arrays: Mapping[str, Any], path: Path) -> list[str] | None:
    """The optional class names of a data file, one per class (e.g. the labels of multi-label
    targets): a `classes` string array in a .npz, a JSON list in a .safetensors file's metadata."""
    names = arrays.get("classes")
    if names is None:
        return None
    names = np.asarray(names)
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise UserError(f"{path}: classes must be a 1-D array of class names (strings), not {names.dtype} {names.shape}.")
    return [str(n) for n in names.astype(str)]


def validated(x: Any, y: Any, path: Path) -> tuple[Any, Any]:
    """`x` and `y` checked (shapes, kinds, labels; NaN when `x` is small enough to check at once);
    labels and multi-label targets read whole (they are small), inputs and masks left mapped."""
    if len(x.shape) != 4 or np.dtype(x.dtype).kind != "f":
        raise UserError(f"{path}: x must be a float array of shape (N, C, H, W), not {x.dtype} {tuple(x.shape)}.")
    if len(y) != len(x):
        raise UserError(f"{path}: x has {len(x)} samples but y has {len(y)}.")
    if len(x) == 0:
        raise UserError(f"{path} holds no samples.")
    if x.nbytes <= CHECK_WHOLE_BYTES and not np.isfinite(np.asarray(x)).all():
        raise UserError(f"{path}: x contains NaN or infinite values.")
    if len(y.shape) == 1:
        labels = np.asarray(y)
        if labels.dtype.kind == "f" and not np.array_equal(labels, labels.round()):
            raise UserError(f"{path}: y of shape (N,) must hold integer class labels.")
        if int(labels.min()) < 0:
            raise UserError(f"{path}: class labels must be >= 0, found {int(labels.min())} (sample {int(labels.argmin())}).")
        return x, torch.from_numpy(labels.astype(np.int64))
    if len(y.shape) == 2:
        return x, torch.from_numpy(np.array(y, dtype=np.float32))
    if len(y.shape) == 4:
        return x, y
    raise UserError(f"{path}: y must be labels (N,), multi-label (N, K) or masks (N, K, H, W), not {tuple(y.shape)}.")
