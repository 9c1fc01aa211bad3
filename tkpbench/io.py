"""Atomic file writes (a temporary file in the same folder, fsync, then rename) and file digests.

A killed job never leaves a half-written file under the final name; its temporary files
(``.<name>.*.tmp``) are removed by ``remove_stale_temporaries``. Files get the user's normal
permissions (``0666 & ~umask``, like ``open``), not mkstemp's 0600, so a group can share results.
A full disk is reported with the folder and the size that was being written.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


class DiskFullError(OSError):
    """No space left for a write: names the folder, what was being written and how much is free."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb", size_hint: int | None = None) -> int:
    """Write ``path`` through ``write(f)`` into a temporary file, then rename; returns the bytes written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            free = shutil.disk_usage(path.parent).free
            need = f"{size_hint / 2**20:.1f} MiB needed, " if size_hint else ""
            raise DiskFullError(
                errno.ENOSPC,
                f"no space left in {path.parent} while writing {path.name} "
                f"({need}{free / 2**20:.1f} MiB free); free some space (or point --runs/--results "
                "at a larger disk) and run the same command again: finished work is kept",
            ) from e
        raise
    return size


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporary files that a killed ``atomic_write`` left in ``folder``; returns how many."""
    n = 0
    for p in Path(folder).glob(".*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data), size_hint=len(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_png(path: Path, image: Any) -> None:
    """Save a PIL image as PNG atomically."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def atomic_torch_save(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def file_digest(path: Path, algo: str = "sha256") -> str:
    """Hex digest of a file's bytes (``algo``: any hashlib name), read in 1 MiB chunks."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
