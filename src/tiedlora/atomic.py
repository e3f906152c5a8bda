"""Files and folders written as a unit: a reader, or a process killed mid-write, finds the old
version or the new one, never half of one. Adapters, checkpoints, run records and reports are
all written through here.

Temporary names are hidden siblings (`.<name>.<random>.tmp`) on the same file system, so the
final rename is atomic and `runs.clean_stale` can find what a killed write left behind. They are
created with the modes open() and mkdir() would give, the process's umask applied by the kernel
(a private 0600 temporary would hide results from other users once renamed).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path

from .config import TiedLoraError


def json_bytes(data) -> bytes:
    """JSON as every file tiedlora writes it: indented, ending in a newline."""
    return (json.dumps(data, indent=2) + "\n").encode()


def hidden_sibling(path: Path, suffix: str = ".tmp") -> Path:
    """A fresh hidden name beside `path`, for a write or a removal in progress."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{suffix}")


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename: a crash leaves
    the old file or the new one, never half of one."""
    path = Path(path)
    tmp = hidden_sibling(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise TiedLoraError(f"Could not write {path}: {e.strerror or e}; nothing was changed there.") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise TiedLoraError(
                f"Could not write {path}: {e.strerror or e}; the file there before, if any, is unchanged."
            ) from e
        raise


def write_folder(folder: Path, files: dict[str, bytes]) -> None:
    """Write `files` as the whole of `folder`, as a unit: into a temporary folder beside it, then
    renamed into place, so a reader finds the old folder or the new one, never a mix of the two."""
    folder = Path(folder)
    tmp = hidden_sibling(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise TiedLoraError(f"Could not write {folder}: {e.strerror or e}; nothing was changed there.") from e
    try:
        for name, data in files.items():
            write_atomic(tmp / name, data)
        old = hidden_sibling(folder, ".old.tmp")
        if folder.exists():
            os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise TiedLoraError(
                f"Could not write {folder}: {e.strerror or e}; the folder there before is unchanged."
            ) from e
        raise


def discard(folder: Path) -> None:
    """Remove `folder` as a unit: it is renamed to a hidden `.tmp` name first, so a kill during
    the removal leaves a leftover that `runs.clean_stale` removes, never a half-deleted folder
    under its own name. Best effort: a folder that cannot be moved is removed where it is."""
    gone = hidden_sibling(folder)
    try:
        os.rename(folder, gone)
    except OSError:
        gone = folder
    shutil.rmtree(gone, ignore_errors=True)
