"""Run by the 2-process test under torchrun: train a tiny config, then each rank saves its parameters."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import tiny_config  # noqa: E402

from tkpbench import distributed as D  # noqa: E402
from tkpbench.engine import fit  # noqa: E402
from tkpbench.train import TKPTask  # noqa: E402

voc_root, run_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
dist = D.setup("cpu")
cfg = tiny_config(voc_root, "ddp", train__epochs="2")
model = fit(TKPTask(cfg), cfg.to_dict(), run_dir, dist, resume="auto", progress=False)
torch.save(model.state_dict(), out / f"rank{dist.rank}.pt")
D.cleanup()
