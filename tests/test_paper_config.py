"""``./reproduce.sh voc`` end to end with the paper's shapes on real images.

Both chains of the voc target (TKP-PCL and ViT-PCM) run with ViT-B/16 at 384, HV-BiLSTM 192,
pseudo masks at 960, the dense CRF (pydensecrf) and DeepLab-v2 ResNet-101 at output stride 8
with MSC training, on a few images of the real VOC sample in ``../shared/data``, from weight
files of the expected names holding random weights. What is small is the data and the schedule:
4 train_aug images (training), 2 train (pseudo masks, Table 1, DeepLab) and 1 val, a global
batch of 4 (ViT-PCM's ET tiles 4 images into a mosaic), two training steps (one per epoch: step
1 in the warm-up with the encoder frozen, step 2 after the unfreeze of the last 5 blocks, with
its fresh Adam) and two DeepLab iterations at batch 2. The report must then show measured
cells for Tables 1 and 2.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from paper_fixture import grid_of, random_weights, voc_subset

from tkpbench.records import load_summary

REPO = Path(__file__).resolve().parents[1]
RUNS = ("topk_pce", "vit_pcm")  # the voc target's two chains
METHOD = {"topk_pce": "TKP-PCL", "vit_pcm": "ViT-PCM"}  # their rows in Tables 1 and 2
# the paper's shapes, stated even where they are the defaults, so that a changed default cannot shrink this test
PAPER = [
    "model.encoder=vit_base_patch16_384.orig_in21k_ft_in1k",
    "model.img_size=384",
    "model.hidden=192",
    "pseudo.infer_size=960",
    "crf.backend=pydensecrf",
    "seg.backbone=resnet101",
    "seg.output_stride=8",
    "seg.msc_scales=[0.5, 0.75]",
    "seg.crop=321",
]
SMALL = [
    "train.batch_size=4",
    "train.epochs=2",
    "train.warmup_epochs=1",
    "train.max_steps=2",
    # no per-epoch evaluation and the last epoch kept: final.pt is the only selection to score
    # (the extra selections and the ladder would add about 4 minutes on 2 cores)
    "train.eval_every=0",
    "train.keep=last",
    "seg.batch_size=2",
    "seg.iters=2",
    # DeepLab trains on the pseudo masks of train (2 images) rather than train_aug (4): half the
    # inference at 960; and it is scored at scales 1 and 0.5 (+ flip: 4 views, not the default
    # 0.5-1.5 ladder's 10), about 80 s less on 2 cores in all
    "data.seg_train_split=train",
    "seg.eval_scales=[1.0, 0.5]",
    "data.workers=0",
    "seg.workers=0",
    "pseudo.batch_size=2",
]


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def stage_times(log: str) -> list[str]:
    """'<seconds>  <command>' of each stage the pipeline ran (its "$ python -m ..." and "done in" lines)."""
    out, cmd = [], ""
    for line in log.splitlines():
        if line.startswith("$ python -m "):
            cmd = " ".join(x for x in line[12:].split()[:4] if not x.startswith("--"))
        elif m := re.match(r"\s+done in ([\d.]+) s", line):
            out.append(f"{float(m.group(1)):7.1f} s  {cmd}")
    return out


def _row(tables: list[dict], number: int, method: str) -> dict[str, str]:
    (table,) = [t for t in tables if t["title"].startswith(f"Table {number}.")]
    (row,) = [r for r in table["rows"] if r[0] == method]
    return dict(zip(table["header"], row))


def _number(cell: str) -> float:
    """The measured value of a report cell ("12.3 (n=1, no interval)", "12.3 ± 0.4 (n=3)")."""
    found = re.match(r"-?\d+\.\d", cell)
    assert found, f"not a measured cell: {cell!r}"
    return float(found.group())


@pytest.mark.slow
def test_reproduce_voc_with_the_paper_shapes_on_real_images(shared_data, tmp_path):
    voc = voc_subset(shared_data, tmp_path / "data", n_train_aug=4, n_train=2, n_val=1)
    train_aug = (voc / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    vit_file, resnet_file = random_weights(tmp_path / "weights", [voc / "JPEGImages" / f"{i}.jpg" for i in train_aug])
    overrides = [f"data.root={voc}", f"model.weights={vit_file}", f"seg.weights={resnet_file}", *PAPER, *SMALL]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "tkpbench.pipeline", "voc", "--runs", "tmp/runs", "--results", "tmp/results"]
    cmd += ["--device", "cpu", *[x for ov in overrides for x in ("--set", ov)]]
    t0, cpu0 = time.perf_counter(), _children_cpu_s()
    with open(tmp_path / "pipeline.log", "w") as out:  # to watch while it runs
        rc = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=3600).returncode
    # wall time depends on what else the machine runs; CPU time / 2 is what 2 idle cores need at least
    took, cpu, log = time.perf_counter() - t0, _children_cpu_s() - cpu0, (tmp_path / "pipeline.log").read_text()
    print(f"pipeline: {took:.0f} s wall, {cpu:.0f} s CPU\n" + "\n".join(stage_times(log)))
    assert rc == 0, log[-6000:]

    runs, results = tmp_path / "tmp" / "runs", tmp_path / "tmp" / "results"
    for name in RUNS:
        final = torch.load(runs / name / "final.pt", map_location="cpu", weights_only=True)
        cfg = final["config"]
        assert (cfg["model"]["img_size"], cfg["model"]["hidden"], cfg["pseudo"]["infer_size"]) == (384, 192, 960)
        # one warm-up step, then one after the unfreeze, at the fine-tuning rate train.lr
        assert final["step"] == 2
        log = [json.loads(line) for line in (runs / name / "log.jsonl").read_text().splitlines()]
        assert {e["step"]: e["lr"] for e in log if "lr" in e}[2] == cfg["train"]["lr"] != cfg["train"]["lr_warmup"]
        # the encoder started from the weight file: block 0 is never unfrozen, so it is the file's
        vit = torch.load(vit_file, map_location="cpu", weights_only=True)
        assert torch.equal(final["model"]["encoder.vit.blocks.0.attn.qkv.weight"], vit["blocks.0.attn.qkv.weight"])
        # pseudo masks were inferred at 960: a 60 x 60 patch grid, for every image of train (the
        # split Table 1 scores and DeepLab trains on), and for no other
        ids = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
        assert len(ids) == 2 and sorted(p.stem for p in (runs / name / "pseudo" / "probs").glob("*.npz")) == sorted(ids)
        assert all(grid_of(runs / name / "pseudo" / "probs" / f"{i}.npz") == (60, 60) for i in ids)
        # DeepLab is ResNet-101 (23 blocks in layer3) from the file, its frozen BatchNorm the file's
        seg = torch.load(runs / name / "seg" / "final.pt", map_location="cpu", weights_only=True)
        resnet = torch.load(resnet_file, map_location="cpu", weights_only=True)
        assert "backbone.6.22.conv1.weight" in seg["model"]
        assert torch.equal(seg["model"]["backbone.1.running_var"], resnet["bn1.running_var"])
        assert seg["config"]["seg"]["output_stride"] == 8 and seg["config"]["seg"]["msc_scales"] == [0.5, 0.75]

    rep = subprocess.run(
        [sys.executable, "-m", "tkpbench.report", "tmp/results", "--runs", "tmp/runs", "--format", "json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rep.returncode == 0, rep.stderr
    tables = json.loads(rep.stdout)
    for name in RUNS:
        stages = load_summary(results / name / "summary.json")["stages"]
        assert not load_summary(results / name / "summary.json")["synthetic"]
        t1, t2 = _row(tables, 1, METHOD[name]), _row(tables, 2, METHOD[name])
        # Table 1: the pseudo masks' mIoU on train before and after the CRF; Table 2: DeepLab on val
        assert stages["mask"]["split"] == "train" and stages["seg"]["split"] == "val"
        assert _number(t1["measured"]) == pytest.approx(stages["mask"]["miou"], abs=0.051)
        assert _number(t1["measured +CRF"]) == pytest.approx(stages["mask"]["miou_crf"], abs=0.051)
        assert _number(t2["measured"]) == pytest.approx(stages["seg"]["miou"], abs=0.051)
