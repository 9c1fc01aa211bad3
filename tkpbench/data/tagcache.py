"""Image-level tags computed once per split and cached as .npz in a cache folder.

The cache lives in ``$TKPBENCH_CACHE`` (default ``~/.cache/tkpbench``), never in the dataset
folder, which may be read-only or shared. Its key covers the split's id list and the size and
modification time of every file the tags are read from, so an edited mask or annotation is
re-read, never served stale. A damaged cache file is recomputed.
"""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from tkpbench.device import usable_cpus
from tkpbench.io import atomic_write_bytes


def cache_dir() -> Path:
    return Path(os.environ.get("TKPBENCH_CACHE") or Path.home() / ".cache" / "tkpbench")


def _fingerprint(ids: list[str], sources: list[Path]) -> str:
    h = hashlib.sha256("\n".join(ids).encode())
    for p in sources:
        try:
            st = p.stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns};".encode())
        except OSError:
            h.update(f"{p}:missing;".encode())
    return h.hexdigest()[:16]


def cached_tags(key: str, ids: list[str], sources: list[Path], compute: Callable[[int], np.ndarray]) -> np.ndarray:
    """bool (N, C): ``compute(i)`` for every image, cached under ``cache_dir()`` by ``key`` and the
    fingerprint of ``ids`` and the ``sources`` files. An unwritable cache keeps them in memory only."""
    n = len(ids)
    path = cache_dir() / f"tags_{key}_{_fingerprint(ids, sources)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                if f["tags"].shape[0] == n:
                    return f["tags"].astype(bool)
        except Exception:
            pass  # a damaged cache is recomputed, never trusted
    with ThreadPoolExecutor(min(8, usable_cpus())) as pool:
        tags = np.stack(list(pool.map(compute, range(n))))
    buf = io.BytesIO()
    np.savez(buf, tags=tags)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError:
        pass  # a read-only cache folder
    return tags
