"""Run by tests/test_crf.py under torchrun with 2 processes: the CRF stage over a folder that holds
another model's masks, with rank 0's clearing of them slowed down by 3 s. A rank that did not wait
for the clearing would skip its stale masks (which rank 0 then deletes) or write masks that rank 0
then deletes."""

import sys
import time
from pathlib import Path

from tkpbench import distributed as D
from tkpbench import refine
from tkpbench.config import Config

voc_root, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
claim = refine.claim_outputs


def slow_claim(*args, **kwargs):
    time.sleep(3)
    return claim(*args, **kwargs)


refine.claim_outputs = slow_claim
dist = D.setup("cpu")
cfg = Config()
cfg.data.root = str(voc_root)
try:
    counts = refine.refine_folder(run_dir, "val", cfg.crf, cfg.data, dist, progress=False, made_from=("new model", {}))
    print(f"rank {dist.rank}: {counts}")
finally:
    D.cleanup()
