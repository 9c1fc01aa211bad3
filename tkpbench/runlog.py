"""The run log: ``log.jsonl`` (one JSON object per logged step or evaluation, appended by rank 0)
and, with ``--tensorboard``, the same numbers in TensorBoard.

Each checkpoint stores the log's length (``size``); a resume cuts the log back to it
(``truncate``), so the lines of the steps that run again are not written twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tkpbench.errors import TrainingError
from tkpbench.io import atomic_write_text


class RunLog:
    """``path`` is the log file; ``tensorboard`` a folder for TensorBoard's events, or None.
    Only the process with ``main`` writes; the others' calls do nothing. ``tag`` prefixes the
    TensorBoard names (the task's name)."""

    def __init__(self, path: Path, main: bool, tag: str, tensorboard: Path | None = None) -> None:
        self.path, self.main, self.tag, self.tensorboard = Path(path), main, tag, tensorboard
        self.tb = None  # the SummaryWriter, made at the first record

    def write(self, rec: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tensorboard is not None:
            self._tb_write(rec)

    def size(self) -> int:
        """The log's length in bytes (what a checkpoint stores; 0 off rank 0)."""
        return os.path.getsize(self.path) if self.main and self.path.is_file() else 0

    def truncate(self, keep_bytes: int | None) -> None:
        """Keep the first ``keep_bytes`` (all when None); a torn last line (a kill mid-write) is dropped."""
        if not self.main:
            return
        data = self.path.read_bytes() if self.path.is_file() else b""
        if keep_bytes is not None:
            data = data[:keep_bytes]
        lines = []
        for ln in data.decode(errors="replace").splitlines():
            try:
                json.loads(ln)
                lines.append(ln)
            except ValueError:
                continue
        atomic_write_text(self.path, "".join(x + "\n" for x in lines))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def _tb_write(self, rec: dict[str, Any]) -> None:
        """The same numbers as log.jsonl, live in TensorBoard (``--tensorboard``, extra ``tkpbench[tb]``)."""
        if self.tb is None:
            # lazy: the optional extra; torch.utils.tensorboard needs the tensorboard package
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise TrainingError(
                    f"--tensorboard needs the tensorboard package: pip install 'tkpbench[tb]' (or pip install tensorboard); {e}"
                ) from None
            self.tb = SummaryWriter(str(self.tensorboard))
        for k, v in rec.items():
            if k not in ("step", "epoch") and isinstance(v, (int, float)):
                self.tb.add_scalar(f"{self.tag}/{k}", v, rec["step"])
        self.tb.flush()
