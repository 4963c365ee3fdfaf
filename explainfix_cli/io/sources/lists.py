"""A CSV or JSON-lines list of image paths with their labels (docs/cli.md "Data in").

Paths are relative to the list's folder, in a column named `path` (or `Path`, `image`, `file`,
`filename`). A `label` column gives one class per image: integers 0, 1, ... or class names
(sorted names become 0, 1, ..., as an image folder's sub-folders do). Otherwise every other
column whose values are all 1, 0, -1 or empty is a 0/1 label of a multi-label target
(CheXpert-style; columns such as age or sex are left out). Uncertain labels (-1) count as 0
("U-Zeros", Irvin et al. 2019) or, with `uncertain="ones"`, as 1 ("U-Ones"); an empty value
(not mentioned) counts as 0.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch

from explainfix_cli.errors import UserError
from explainfix_cli.io.sources.images import ImageSource, Reading

PATH_COLUMNS = ("path", "Path", "image", "file", "filename")
UNCERTAIN = {"zeros": 0.0, "ones": 1.0}


def _rows(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable list of images ({e}).") from None
    if path.suffix.lower() == ".csv":
        return list(csv.DictReader(text.splitlines()))
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"line {n} of {path} is not a JSON object; a list holds one object per line.") from None
            if not isinstance(row, dict):
                raise UserError(f"line {n} of {path} is not a JSON object; a list holds one object per line.")
            rows.append(row)
    return rows


def _number(value: Any) -> float | None:
    """A label's value as -1, 0 or 1, None when empty; raises ValueError otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    v = float(value)
    if v not in (-1.0, 0.0, 1.0):
        raise ValueError(value)
    return v


def _label_columns(rows: list[dict[str, Any]], path_column: str) -> list[str]:
    columns = []
    for column in rows[0]:
        if column == path_column:
            continue
        try:
            values = [_number(r.get(column)) for r in rows]
        except (TypeError, ValueError):
            continue
        if any(v is not None for v in values):
            columns.append(column)
    return columns


def image_list(path: Path, reading: Reading, uncertain: str = "zeros") -> tuple[ImageSource, list[str] | None]:
    """The images and labels of a list; every file checked to exist before the first minibatch."""
    if uncertain not in UNCERTAIN:
        raise UserError(f"`uncertain` must be zeros or ones, not {uncertain!r}.")
    rows = _rows(path)
    if not rows:
        raise UserError(f"{path} lists no images.")
    path_column = next((c for c in PATH_COLUMNS if c in rows[0]), None)
    if path_column is None:
        raise UserError(f"{path} has no column of image paths; name it one of {', '.join(PATH_COLUMNS)}.")
    files, names = [], []
    for n, row in enumerate(rows, 1):
        file = path.parent / str(row.get(path_column) or "")
        names.append(f"row {n} of {path} ({row.get(path_column)})")
        if not file.is_file():
            raise UserError(f"row {n} of {path}: image {row.get(path_column)!r} does not exist (paths are relative to the list's folder).")
        files.append(file)
    if "label" in rows[0]:
        labels, classes = _single_labels(rows, path, names)
    else:
        labels, classes = _multi_labels(rows, path, path_column, UNCERTAIN[uncertain])
    return ImageSource(files, labels, reading, names), classes


def _single_labels(rows: list[dict[str, Any]], path: Path, names: list[str]) -> tuple[torch.Tensor, list[str] | None]:
    values = [str(r.get("label") if r.get("label") is not None else "").strip() for r in rows]
    for name, v in zip(names, values, strict=True):
        if not v:
            raise UserError(f"{name} has no label.")
    if all(v.lstrip("-").isdigit() for v in values):
        labels = [int(v) for v in values]
        bad = next((k for k, v in enumerate(labels) if v < 0), None)
        if bad is not None:
            raise UserError(f"{names[bad]} has class label {labels[bad]}; class labels must be >= 0.")
        return torch.tensor(labels, dtype=torch.long), None
    classes = sorted(set(values))
    index = {c: k for k, c in enumerate(classes)}
    return torch.tensor([index[v] for v in values], dtype=torch.long), classes


def _multi_labels(rows: list[dict[str, Any]], path: Path, path_column: str, uncertain: float) -> tuple[torch.Tensor, list[str]]:
    columns = _label_columns(rows, path_column)
    if not columns:
        raise UserError(f"{path} has neither a `label` column nor columns of 0/1 labels; add one.")
    table = torch.zeros(len(rows), len(columns))
    for n, row in enumerate(rows):
        for k, column in enumerate(columns):
            v = _number(row.get(column))  # the columns were chosen for parsing
            table[n, k] = 0.0 if v is None else uncertain if v == -1.0 else v
    return table, columns
