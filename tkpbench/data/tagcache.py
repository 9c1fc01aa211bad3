"""Image-level tags computed once per split and cached as .npz beside the dataset."""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from tkpbench.io import atomic_write_bytes


def cached_tags(root: Path, key: str, ids: list[str], compute: Callable[[int], np.ndarray], n: int) -> np.ndarray:
    """bool (N, C). Cached under ``root/.tkpbench_cache/`` (or $TKPBENCH_CACHE); the cache is
    keyed by the id list, so an edited split list is recomputed. A read-only root keeps it in
    memory only."""
    digest = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:12]
    base = Path(os.environ.get("TKPBENCH_CACHE", root / ".tkpbench_cache"))
    path = base / f"tags_{key}_{digest}.npz"
    if path.is_file():
        try:
            with np.load(path) as f:
                if f["tags"].shape[0] == n:
                    return f["tags"].astype(bool)
        except Exception:
            pass  # a damaged cache is recomputed, never trusted
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        tags = np.stack(list(pool.map(compute, range(n))))
    buf = io.BytesIO()
    np.savez(buf, tags=tags)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError:
        pass  # read-only dataset folder
    return tags
