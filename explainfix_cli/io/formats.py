"""What a model file is, read from its first bytes rather than its name (docs/cli.md, "Models in").

Torch-free, so the command line can refuse a file of the wrong kind before importing torch.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import Literal

from explainfix_cli.errors import UserError

ModelFormat = Literal["safetensors", "torch-zip", "torch-export", "pickle", "onnx"]

# ONNX ModelProto starts with field 1 (ir_version, a varint: tag 0x08) followed by one of
# its other fields: producer_name 0x12, producer_version 0x1a, domain 0x22, model_version 0x28,
# doc_string 0x32, graph 0x3a, opset_import 0x42, metadata_props 0x72
_ONNX_NEXT_TAGS = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72}


def sniff(path: Path) -> ModelFormat | None:
    """The format of the model file `path` by content, or None when none matches."""
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    header_len = _safetensors_header_len(head)
    if header_len is not None and 8 + header_len <= size:
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return None
        if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
            return "torch-export"
        if any(n.endswith("data.pkl") for n in names):
            return "torch-zip"
        return None
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO opcode (torch's legacy format too)
        return "pickle"
    if len(head) >= 3 and head[0] == 0x08 and head[1] < 0x80 and head[2] in _ONNX_NEXT_TAGS:
        return "onnx"
    return None


def _safetensors_header_len(head: bytes) -> int | None:
    """The JSON header's length that a safetensors file's first 8 bytes give (little-endian), if
    the header then opens with `{`; else None."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    return int(struct.unpack("<Q", head[:8])[0])


def _cut_short_safetensors(path: Path) -> tuple[int, int] | None:
    """(bytes the header needs, bytes there are) for a safetensors file whose header runs past its
    end (an interrupted download or copy), else None."""
    with open(path, "rb") as f:
        header_len = _safetensors_header_len(f.read(9))
    size = path.stat().st_size
    if header_len is None or header_len >= 1 << 32:  # not one, or a length no header has
        return None
    return (8 + header_len, size) if 8 + header_len > size else None


IMAGE_LIST_SUFFIXES = (".csv", ".jsonl", ".json", ".ndjson")  # a list of image paths with labels (io/sources/lists)


def is_images(path: Path) -> bool:
    """Is `path` images (a folder, or a list of image files) rather than tensors in a file?"""
    return path.is_dir() or path.suffix.lower() in IMAGE_LIST_SUFFIXES


def is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def model_format(path: Path) -> ModelFormat:
    """`sniff`, with one sentence for a missing, unreadable or unrecognised file."""
    if not path.is_file():
        raise UserError(f"model file {path} does not exist.")
    try:
        found = sniff(path)
    except OSError as e:
        raise UserError(f"model file {path} cannot be read ({e.strerror}).") from None
    if found is None and is_zip(path):
        return "torch-zip"  # a damaged archive: the checkpoint reader says what is wrong with it
    if found is None and (short := _cut_short_safetensors(path)) is not None:
        raise UserError(f"{path} starts as a safetensors file but ends early: its header alone needs {short[0]:,} bytes and the file has {short[1]:,}; copy it again.")
    if found is None:
        raise UserError(
            f"{path} is in an unrecognised model format; explainfix reads safetensors, PyTorch checkpoints "
            "(torch.save), torch.export programs (.pt2) and, for evaluate and bench, ONNX files."
        )
    return found  # an ONNX model is read by evaluate and bench (export/runtime.py); the other commands refuse it
