"""Writing outputs safely: refuse to replace without --force, write to a temporary path, rename.

Every command that writes goes through these two context managers, so a failure (bad input found
late, an exception, Ctrl-C) never leaves a half-written file or folder behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def check_target(path: Path, force: bool) -> None:
    """Fail early, before any work, when `path` cannot be written."""
    if path.exists() and not force:
        raise UserError(f"{path} already exists; pass --force to replace it or choose another --out.")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"the folder {parent} for the output does not exist; create it first.")
    if not os.access(parent, os.W_OK):
        raise UserError(f"the folder {parent} is not writable; choose another --out.")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    check_target(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private (0600); outputs get the usual mode
    try:
        yield Path(tmp)
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path`."""
    path = Path(path)
    check_target(path, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes the folder private (0700); outputs get the usual mode
    try:
        yield tmp
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def check_files(folder: Path, names: Sequence[str], force: bool) -> None:
    """Fail early when the files `names` cannot be written into `folder` (which may be new).

    Unlike `atomic_dir`, the folder is the user's: it may hold other files, and only these are replaced.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} exists and is not a folder; choose another --out.")
    if not folder.exists():
        check_target(folder, force=False)
        return
    if not os.access(folder, os.W_OK):
        raise UserError(f"the folder {folder} is not writable; choose another --out.")
    for name in names:
        path = folder / name
        if path.is_dir():
            raise UserError(f"{path} is a folder, where a file would be written; move it or choose another --out.")
        if path.exists() and not force:
            raise UserError(f"{path} already exists; pass --force to replace it or choose another --out.")


@contextmanager
def files_in_folder(folder: Path, names: Sequence[str], force: bool) -> Iterator[dict[str, Path]]:
    """Yield a temporary path per file name (same name, in a hidden staging folder inside `folder`);
    on success every file is moved into `folder`, replacing only a file of that name.

    `folder` is made if missing (not its parents) and removed again, empty, if this fails; nothing
    is ever deleted recursively.
    """
    folder = Path(folder)
    check_files(folder, names, force)
    made = not folder.exists()
    if made:
        folder.mkdir()
    stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder))
    try:
        yield {name: stage / name for name in names}
        for name in names:
            os.replace(stage / name, folder / name)
    finally:
        for name in names:
            (stage / name).unlink(missing_ok=True)
        stage.rmdir()
        if made and not any(folder.iterdir()):
            folder.rmdir()
