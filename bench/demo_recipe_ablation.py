"""Which of the ViT-PCM-style defaults (#15) changes what the demo's TKP-PCL learns?

Trains configs/demo.toml (top-K + PCE) on the generated demo data with the current defaults and
with one group of them set back to tkpbench's earlier choice, for each seed, then scores the pseudo
masks on the demo's train split after the CRF (no DeepLab). Prints a markdown table of mean,
sample s.d. and the per-seed values, with the command, commit and machine.

    .venv/bin/python bench/demo_recipe_ablation.py --seeds 0,1,2 --out /tmp/ablation

Runs and records go under --out (never into runs/ or results/): these are measurements about the
demo recipe, not reproductions.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tkpbench.pipeline import run_chain  # noqa: E402
from tkpbench.records import load_summary, machine_info  # noqa: E402

VARIANTS = {
    "defaults (ViT-PCM-style)": [],
    "no extra dropout, torch init": ["model.lstm_dropout=0.0", "model.encoder_dropout=0.0", "model.init=torch"],
    "old augmentation": [
        "data.vflip=0.0",
        "data.rot90=0.0",
        "data.grayscale=0.0",
        "data.color_jitter=[0.3, 0.3, 0.3, 0.1]",
        "data.rrc_p=0.3",
        "data.crop_tags=keep",
    ],
    "last epoch, Adam kept": ["train.keep=last", "train.reset_optimizer_at_unfreeze=false"],
    "no v-flip, no transposition": ["data.vflip=0.0", "data.rot90=0.0"],
    "old colour jitter, no grayscale": ["data.grayscale=0.0", "data.color_jitter=[0.3, 0.3, 0.3, 0.1]"],
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", type=Path, default=Path("/tmp/tkpbench-ablation"))
    p.add_argument("--data", type=Path, default=REPO / "data" / "demo" / "VOC2012")
    p.add_argument("--variants", default="", help="comma-separated indices into VARIANTS (default: all)")
    args = p.parse_args()
    chosen = {int(i) for i in args.variants.split(",") if i.strip()} or set(range(len(VARIANTS)))
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    t0 = time.perf_counter()
    for n, (label, ov) in enumerate(VARIANTS.items()):
        if n not in chosen:
            continue
        vals = []
        for seed in seeds:
            name = f"abl{n}-s{seed}"
            overrides = [f"data.root={args.data}", f"train.seed={seed}", f"name={name}", *ov]
            with contextlib.redirect_stdout(io.StringIO()):
                run_chain(REPO / "configs" / "demo.toml", overrides, args.out / "runs", args.out / "results", 1, seg=False)
            vals.append(load_summary(args.out / "results" / name / "summary.json")["stages"]["mask"]["miou_crf"])
        sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        rows.append(f"| {label} | {statistics.mean(vals):.1f} ± {sd:.1f} | {', '.join(f'{v:.1f}' for v in vals)} |")
        print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    print(f"\n| demo variant (top-K + PCE) | mask mIoU after CRF, mean ± s.d. over seeds {args.seeds} | per seed |")
    print("|---|---|---|")
    print("\n".join(rows))
    print(f"\ncommand: {' '.join(sys.argv)}; commit {commit}; machine {machine_info()}; {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
