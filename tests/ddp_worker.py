"""Run by the 2-process tests under torchrun: train a tiny config, then each rank saves its parameters.
An optional 4th argument N makes rank 1 alone produce a NaN loss at step N; each rank then writes
the error it stopped with to ``rank<r>.err``."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import tiny_config, trainer  # noqa: E402

from tkpbench import distributed as D  # noqa: E402
from tkpbench.engine import TrainingError  # noqa: E402
from tkpbench.train import TKPTask  # noqa: E402

voc_root, run_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
dist = D.setup("cpu")
cfg = tiny_config(voc_root, "ddp", train__epochs="2")
nan_at = int(sys.argv[4]) if len(sys.argv) > 4 and dist.rank == 1 else -1
try:
    model = trainer(TKPTask(cfg), cfg, run_dir, dist=dist, nan_at=nan_at).fit()
except TrainingError as e:
    (out / f"rank{dist.rank}.err").write_text(str(e))
    D.cleanup()
    sys.exit(3)
torch.save(model.state_dict(), out / f"rank{dist.rank}.pt")
D.cleanup()
