"""Writing outputs safely (docs/cli.md, "Outputs").

- A command that writes **one file** refuses an existing file unless `force`, and always refuses a
  path that is a folder. It writes a temporary file beside the target and renames it at the end, so
  a failure leaves nothing behind and the output may be the input.
- A command that writes a **report folder** creates it, or writes into an existing one: an empty
  folder is fine, a non-empty one needs `force`, and then only the files the command writes are
  replaced, each by a rename. Nothing else in the folder is touched and no folder of the user's is
  ever removed.

Files get the mode a new file gets under the user's umask; a replaced file keeps its own mode.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from explainfix_cli.errors import UserError


def _check_parent(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"the folder {parent} for the output does not exist; create it first.")
    if not os.access(parent, os.W_OK):
        raise UserError(f"the folder {parent} is not writable; choose another output path.")


def check_target(path: Path, force: bool) -> None:
    """Fail early, before any work, when the file `path` cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, but this command writes one file; name a file as the output.")
    if path.exists() and not force:
        raise UserError(f"{path} already exists; pass `force` to replace it or choose another output path.")
    _check_parent(path)


def check_folder_target(path: Path, force: bool) -> None:
    """Fail early when the report folder `path` cannot be written (see the module docstring)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, but this command writes a folder; name a folder as the output.")
    if path.is_dir():
        if any(path.iterdir()) and not force:
            raise UserError(f"the folder {path} is not empty; pass `force` to replace the files this command writes there, or choose another output folder.")
        if not os.access(path, os.W_OK):
            raise UserError(f"the folder {path} is not writable; choose another output folder.")
        return
    _check_parent(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode_for(target: Path, default: int) -> int:
    """The mode `target` keeps when it is replaced, or the umask's mode for a new file."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        return default & ~_umask()


@contextmanager
def atomic_file(path: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    check_target(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        check_target(path, force)  # the path may have become a folder while we worked
        # after writing: a writer may replace the temporary file (safetensors does), and mkstemp made it 0600
        os.chmod(tmp, _mode_for(path, 0o666))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: Path, force: bool) -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; on success its files move into `path`, one
    rename each (creating `path` and sub-folders as needed). The staging folder is ours and goes."""
    path = Path(path)
    check_folder_target(path, force)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else "."))
    try:
        yield stage
        check_folder_target(path, force)
        if not path.exists():
            os.chmod(stage, 0o777 & ~_umask())  # mkdtemp made it 0700
            os.replace(stage, path)
            return
        for src in sorted(stage.rglob("*")):
            dst = path / src.relative_to(stage)
            if src.is_dir():
                if dst.exists() and not dst.is_dir():
                    raise UserError(f"{dst} is a file where this command writes a folder; move it away first.")
                dst.mkdir(exist_ok=True)
            else:
                if dst.is_dir():
                    raise UserError(f"{dst} is a folder where this command writes a file; move it away first.")
                os.chmod(src, _mode_for(dst, 0o666))
                os.replace(src, dst)
    finally:
        _discard(stage)


def _discard(stage: Path) -> None:
    """Remove what is left of our staging folder, and nothing else: its files and links are
    unlinked (a link is removed, never followed), its folders removed only once empty. No
    recursive delete, so not even a link placed in it can reach a folder of the user's."""
    if not stage.is_dir() or stage.is_symlink():
        return
    for root, folders, files in os.walk(stage, topdown=False):  # os.walk does not follow links
        for name in files:
            os.unlink(os.path.join(root, name))
        for name in folders:
            entry = os.path.join(root, name)
            os.unlink(entry) if os.path.islink(entry) else os.rmdir(entry)
    os.rmdir(stage)
