"""Benchmarks (``make bench``): nothing here is a test; every figure is printed with its device.

    python -m tkpbench.bench [--only model,pce,pooling,data,crf,metrics,deeplab] [--device cuda] [--json out.json]

* model: forward + backward of TKP-PCL at the paper's shapes (batch 16, 384, last 5 blocks
  trainable), images/s and, on CUDA, the model FLOP rate against a measured bf16 matmul peak
  (FLOPs: forward of everything + backward through the trainable blocks only, see ``train_flops``).
* pce / pooling: vectorised implementation against a naive Python loop.
* pseudo: pseudo-mask inference images/s at 960 (ViT-B/16, merge, upsampling, argmax).
* data: decoded+augmented images/s per DataLoader worker on generated data.
* crf: seconds per 500x375 image with 21 labels, pydensecrf (one core, and images/s with all cores) and the
  torch permutohedral backend on the present device, on uniform noise (the lattice's worst case) and on a
  photograph (``--crf-image``; default a VOC sample image when the real samples are present, else a
  generated image).
* metrics: confusion matrix over VOC-val-sized data (1,449 masks of 500x375).
* deeplab: training images/s at crop 321, batch 10 (ResNet-101), bf16 + channels_last vs fp32 on CUDA.
* crf_agreement (not in the default list; accuracy, not speed): the torch CRF backend against
  pydensecrf on every full-size VOC val image under ``--voc-root`` (default: the 50-image VOC sample).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from tkpbench.config import Config, DataConfig, ModelConfig, SegConfig
from tkpbench.crf import dense_crf
from tkpbench.data import VOCSegmentation
from tkpbench.data.synth import blurred_probs, make_synthetic, render
from tkpbench.data.transforms import TKPTrainSet, tkp_train_transform
from tkpbench.deeplab import DeepLabV2, resize_labels
from tkpbench.distributed import autocast
from tkpbench.io import atomic_write_json
from tkpbench.metrics import ConfusionMatrix
from tkpbench.model import TKPPCL, patch_masks, tkp_loss, upsample_probs
from tkpbench.pce import patch_contrastive_error
from tkpbench.pooling import topk_pool
from tkpbench.records import device_name, git_commit
from tkpbench.train import TKPTask


def _timeit(fn, warmup: int = 1, reps: int = 3, sync=None) -> float:
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if sync:
        sync()
    return (time.perf_counter() - t) / reps


def _sync(device):
    return torch.cuda.synchronize if device.type == "cuda" else None


def matmul_peak_tflops(device: torch.device, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    dt = _timeit(lambda: a @ b, warmup=3, reps=20, sync=_sync(device))
    return 2 * n**3 / dt / 1e12


def train_flops(
    batch: int,
    tokens: int = 577,
    dim: int = 768,
    depth: int = 12,
    trainable: int = 5,
    mlp: int = 3072,
    hidden: int = 192,
    classes: int = 21,
) -> float:
    """Matmul FLOPs of one training step: ViT forward over all blocks, backward (2x forward)
    through the trainable blocks; HV-BiLSTM and classifier forward + backward."""
    per_block = 2 * tokens * (4 * dim * dim + 2 * dim * mlp) + 2 * 2 * tokens * tokens * dim
    vit = batch * per_block * (depth + 2 * trainable)
    s = tokens - 1
    lstm = batch * 2 * 2 * (2 * s * 4 * hidden * (dim + hidden))  # 2 LSTMs x 2 directions
    head = batch * 2 * s * 4 * hidden * classes
    return vit + 3 * (lstm + head)


def bench_model(device: torch.device, batch: int, out: dict) -> None:
    # the training's own model, optimiser and phase (epoch 3 on: last 5 blocks + final norm trainable)
    cfg = Config(model=ModelConfig(encoder="vit_base_patch16_384", weights=""))
    task = TKPTask(cfg)
    model = task.build_model().to(device)
    opt = task.optimizer(model)
    task.set_phase(model, cfg.train.warmup_epochs)
    x = torch.randn(batch, 3, 384, 384, device=device)
    tags = torch.zeros(batch, 21, dtype=torch.bool, device=device)
    tags[:, [0, 3, 15]] = True

    def step():
        with autocast(device):
            o = model(x)
        tkp_loss(o, tags, model.cfg)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = _timeit(step, warmup=2 if device.type == "cuda" else 1, reps=10 if device.type == "cuda" else 1, sync=_sync(device))
    r = {"batch": batch, "s_per_step": round(dt, 4), "images_per_s": round(batch / dt, 2)}
    if device.type == "cuda":
        peak = matmul_peak_tflops(device)
        achieved = train_flops(batch) / dt / 1e12
        r.update(
            bf16_matmul_peak_tflops=round(peak, 1),
            model_tflops=round(achieved, 1),
            fraction_of_peak=round(achieved / peak, 3),
            peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        )
    out["model"] = r


@torch.no_grad()
def bench_pseudo(device: torch.device, out: dict) -> None:
    """Pseudo-mask inference at 960: forward, tag merge, upsampling to 500x375, argmax."""

    model = TKPPCL(ModelConfig(encoder="vit_base_patch16_384", weights="")).to(device).eval()
    batch = 4 if device.type == "cuda" else 1
    x = torch.randn(batch, 3, 960, 960, device=device)
    tags = torch.zeros(batch, 21, dtype=torch.bool, device=device)
    tags[:, [0, 3, 15]] = True

    def run():
        with autocast(device):
            o = model(x)
        return patch_masks(o.z, o.grid, tags, (375, 500))

    dt = _timeit(run, warmup=2 if device.type == "cuda" else 0, reps=5 if device.type == "cuda" else 1, sync=_sync(device))
    out["pseudo_masks_at_960"] = {"batch": batch, "images_per_s": round(batch / dt, 3)}


def bench_pce_pooling(device: torch.device, out: dict) -> None:
    b, s, c, e = 16, 576, 21, 768
    f = torch.randn(b, s, e, device=device)
    z = (torch.randn(b, s, c, device=device) * 4).softmax(-1)
    fast = _timeit(lambda: patch_contrastive_error(f, z), sync=_sync(device))

    def naive():
        total = 0.0
        fn = torch.nn.functional.normalize(f, dim=-1)
        for n in range(b):
            for k in range(c):
                hi = (z[n, :, k] > 0.85).nonzero().flatten()
                lo = (z[n, :, k] < 0.15).nonzero().flatten()
                sim = (1 + fn[n, hi] @ fn[n, hi].T) / 2
                m = len(hi)
                if m > 1:
                    total += float(((1 - sim).sum() - (1 - sim.diagonal()).sum()) / (m * (m - 1)))
                if m and len(lo):
                    total += float(((1 + fn[n, hi] @ fn[n, lo].T) / 2).mean())
        return total / b

    slow = _timeit(naive, warmup=0, reps=1)
    out["pce"] = {
        "shape": [b, s, c, e],
        "vectorised_ms": round(fast * 1e3, 2),
        "per_image_class_loop_ms": round(slow * 1e3, 2),
        "speedup": round(slow / fast, 1),
    }
    fast = _timeit(lambda: topk_pool(z, 6), sync=_sync(device))
    slow = _timeit(
        lambda: torch.stack(
            [torch.stack([z[n, :, k].sort(descending=True).values[:6].mean() for k in range(c)]) for n in range(b)]
        ),
        warmup=0,
        reps=1,
    )
    out["pooling"] = {"vectorised_ms": round(fast * 1e3, 3), "loop_ms": round(slow * 1e3, 2), "speedup": round(slow / fast, 1)}


def bench_data(out: dict, tmp: Path) -> None:
    make_synthetic(tmp, n=64, seed=0, size=(375, 500))
    ds = TKPTrainSet(
        VOCSegmentation(tmp / "VOC2012", "train_aug"), tkp_train_transform(DataConfig(), 384, (0.5,) * 3, (0.5,) * 3)
    )
    res = {}
    for w in (0, 1, 2):
        loader = DataLoader(ds, batch_size=8, num_workers=w)
        t = time.perf_counter()
        n = sum(x.shape[0] for x, _ in loader)
        res[f"workers_{w}"] = round(n / (time.perf_counter() - t), 1)
    out["data_images_per_s_500x375_to_384"] = res


def bench_crf(device: torch.device, out: dict, photo: Path | None) -> None:
    """Both backends on two 500x375 inputs with 21 labels: uniform noise (the worst case for the
    bilateral lattice, about d + 1 = 6 vertices per pixel) and a photograph (``photo``, a real VOC
    image; a generated demo image where none is given), whose lattice is 3-6x smaller."""

    cores = os.cpu_count() or 1
    sync = _sync(device)
    res: dict = {"cores": cores, "torch_device": device.type}
    for kind in ("noise", "photo"):
        img, probs, source = _crf_inputs(kind, photo)
        one = _timeit(lambda: dense_crf(img, probs), warmup=0, reps=2)
        ours = _timeit(
            lambda: dense_crf(img, probs, backend="torch", device=str(device)),
            warmup=1,
            reps=5 if device.type == "cuda" else 2,
            sync=sync,
        )
        n = 2 * cores
        t = time.perf_counter()
        with ProcessPoolExecutor(cores) as pool:
            list(pool.map(_crf_job, [(kind, photo)] * n))
        res[kind] = {
            "image": _portable(source),
            "pydensecrf_s_per_image_one_core": round(one, 3),
            "pydensecrf_images_per_s_all_cores": round(n / (time.perf_counter() - t), 2),
            "torch_s_per_image": round(ours, 3),
            "torch_images_per_s": round(1 / ours, 2),
            "torch_speedup_vs_pydensecrf_one_core": round(one / ours, 2),
        }
    out["crf_500x375x21"] = res


def _crf_inputs(kind: str, photo: Path | None):
    """uint8 (375, 500, 3) image, float32 (21, 375, 500) probabilities, and where the image came from."""
    rng = np.random.default_rng(0)
    if kind == "noise":
        img, source = rng.integers(0, 255, (375, 500, 3), dtype=np.uint8), "uniform noise"
    elif photo is not None:
        img = np.array(Image.open(photo).convert("RGB").resize((500, 375), Image.BILINEAR))
        source = str(photo)
    else:
        img, source = render(rng, 375, 500, 20)[0], "generated demo image (tkpbench.data.synth.render, seed 0)"
    p = rng.random((21, 375, 500)).astype(np.float32) ** 4
    return img, p / p.sum(0, keepdims=True), source


def _crf_job(args):
    os.environ["OMP_NUM_THREADS"] = "1"

    img, probs, _ = _crf_inputs(*args)
    return dense_crf(img, probs).shape


def bench_crf_agreement(device: torch.device, out: dict, voc_root: Path | None) -> None:
    """The torch backend against pydensecrf on every VOC val image under ``voc_root``, full size,
    with probabilities from a blurred, shifted, noisy copy of the ground truth restricted to the
    image's classes (the CRF stage's own input form). Accuracy, not speed."""

    if voc_root is None:
        out["crf_agreement"] = "skipped: no VOC root (--voc-root)"
        return
    ds = VOCSegmentation(voc_root, "val")
    cms = {"pydensecrf": ConfusionMatrix(ds.num_classes), "torch": ConfusionMatrix(ds.num_classes)}
    agree, max_abs, mean_abs, over = [], 0.0, [], []
    for i in range(len(ds)):
        img, mask, keep = ds.image(i), ds.mask(i), np.flatnonzero(ds.tags(i))
        p = blurred_probs(mask, ds.num_classes, sigma=4, offset=3, seed=i)[keep]
        p /= p.sum(0, keepdims=True)
        ref, ours = dense_crf(img, p), dense_crf(img, p, backend="torch", device=str(device))
        diff = np.abs(ref - ours)
        agree.append(float((ref.argmax(0) == ours.argmax(0)).mean()))
        max_abs = max(max_abs, float(diff.max()))
        mean_abs.append(float(diff.mean()))
        over.append(int((diff.max(0) > 1e-3).sum()))
        cms["pydensecrf"].update(keep[ref.argmax(0)], mask)
        cms["torch"].update(keep[ours.argmax(0)], mask)
    out["crf_agreement"] = {
        "images": len(ds),
        "root": _portable(voc_root),
        "torch_device": device.type,
        "argmax_agreement_min": round(min(agree), 6),
        "argmax_agreement_mean": round(float(np.mean(agree)), 6),
        "max_abs_prob_diff": max_abs,
        "mean_abs_prob_diff": float(np.mean(mean_abs)),
        "pixels_over_1e-3_worst_image": max(over),
        "pixels_over_1e-3_total": sum(over),
        "miou_pydensecrf": round(100 * cms["pydensecrf"].miou(), 4),
        "miou_torch": round(100 * cms["torch"].miou(), 4),
    }


def bench_metrics(out: dict) -> None:
    rng = np.random.default_rng(0)
    gt = torch.from_numpy(rng.integers(0, 21, size=(375, 500), dtype=np.uint8))
    pred = torch.from_numpy(rng.integers(0, 21, size=(375, 500), dtype=np.uint8))
    cm = ConfusionMatrix(21)
    t = time.perf_counter()
    for _ in range(1449):
        cm.update(pred, gt)
    out["confusion_matrix_voc_val_s"] = round(time.perf_counter() - t, 2)


def bench_deeplab(device: torch.device, out: dict) -> None:
    res = {}
    modes = [("bf16_channels_last", True), ("fp32", False)] if device.type == "cuda" else [("fp32", False)]
    batch = 10 if device.type == "cuda" else 2
    for name, fast in modes:
        m = DeepLabV2(21, "resnet101").to(device)
        if fast:
            m = m.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
        x = torch.randn(batch, 3, 321, 321, device=device)
        if fast:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 21, (batch, 321, 321), device=device)
        scales = list(SegConfig().msc_scales)  # the default recipe: MSC training, four losses summed

        def step():
            with autocast(device, fast):
                outs = m(x, msc_scales=scales) if scales else [m(x)]
            sum(torch.nn.functional.cross_entropy(o.float(), resize_labels(y, o.shape[-2:])) for o in outs).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        dt = _timeit(step, warmup=2 if device.type == "cuda" else 0, reps=10 if device.type == "cuda" else 1, sync=_sync(device))
        res[name] = {"batch": batch, "images_per_s": round(batch / dt, 2), "msc_scales": scales}
    out["deeplab_resnet101_crop321"] = res


def _portable(path) -> str:
    """A path as it may be written into a shared benchmark record: its last two parts, never the
    absolute path of the machine that measured it."""
    p = Path(str(path))
    return str(Path(p.parent.name) / p.name) if p.is_absolute() else str(p)


_SAMPLE_VOC = Path(__file__).resolve().parents[2] / "shared/data/voc2012-sample/VOC2012"
_SAMPLE_PHOTO = _SAMPLE_VOC / "JPEGImages/2007_000063.jpg"


# sizes of the full targets (SPEC Sec. 2-3): images per split, tagged classes per image (incl. background,
# from VOC's cls_labels and COCO's instances files), DeepLab iterations and batch
TARGETS = {
    "voc": {
        "train": 10582,
        "mask": 1464,
        "val": 1449,
        "classes_per_image": 2.5,
        "epochs": 50,
        "seg_iters": 20000,
        "seg_batch": 10,
        "size": (375, 500),
    },
    "coco": {
        "train": 82081,
        "mask": 82081,
        "val": 40504,
        "classes_per_image": 3.9,
        "epochs": 50,
        "seg_iters": 100000,  # the coco target's DeepLab iterations (pipeline.py: deeplab-pytorch's COCO recipe)
        "seg_batch": 10,
        "size": (480, 640),
    },
}


def bench_storage(out: dict) -> None:
    """Bytes per image of the stored pseudo-mask probabilities, now (patch grid, float32) and as
    earlier versions stored them (full size, float16), with the projected disk use of each target."""
    rng = np.random.default_rng(0)
    res = {}
    for target, t in TARGETS.items():
        k = int(round(t["classes_per_image"]))
        grid = torch.from_numpy(rng.random((1, k, 60, 60), dtype=np.float32))
        grid = torch.nn.functional.avg_pool2d(grid, 5, 1, 2)  # smooth like real patch scores
        grid = grid / grid.sum(1, keepdim=True)
        full = upsample_probs(grid, t["size"])[0].numpy()
        sizes = {}
        for name, arrays in (
            ("grid_float32", {"grid": grid[0].numpy(), "size": np.array(t["size"])}),
            ("full_float16", {"probs": full.astype(np.float16)}),
        ):
            buf = io.BytesIO()
            np.savez_compressed(buf, classes=np.arange(k, dtype=np.int16), **arrays)
            sizes[name] = len(buf.getvalue())
        res[target] = {
            "classes_per_image": k,
            "image_size": list(t["size"]),
            "bytes_per_image": sizes,
            "projected_gb_train_split": {n: round(b * t["train"] / 1e9, 2) for n, b in sizes.items()},
            "ratio": round(sizes["full_float16"] / sizes["grid_float32"], 1),
        }
    out["pseudo_storage"] = res


def projection(out: dict) -> dict:
    """Wall-clock of each full target on this device, from the per-image figures just measured
    (training steps x s/step, images / images per s); a missing measurement leaves its stage out."""
    m, p = out.get("model"), out.get("pseudo_masks_at_960")
    crf = out.get("crf_500x375x21", {}).get("photo", {})
    dl = out.get("deeplab_resnet101_crop321", {})
    dl = dl.get("bf16_channels_last") or dl.get("fp32")
    proj = {}
    for target, t in TARGETS.items():
        stages = {}
        if m:
            stages["train"] = t["epochs"] * (t["train"] // 16) * m["s_per_step"] * 16 / m["batch"]
        if p:
            stages["pseudo"] = t["train"] / p["images_per_s"]
        if crf:
            stages["crf"] = t["train"] / crf["pydensecrf_images_per_s_all_cores"]
        if dl:
            stages["deeplab"] = t["seg_iters"] * t["seg_batch"] / dl["images_per_s"]
        proj[target] = {k: round(v / 3600, 2) for k, v in stages.items()}
        proj[target]["total_hours"] = round(sum(stages.values()) / 3600, 1)
        proj[target]["per_seed"] = "one training seed; each more seed adds the same again"
    return proj


def print_summary(out: dict) -> None:
    """The table ``make bench`` ends with: throughput per stage, storage, projected time per target."""
    con = Console()
    t = Table(title=f"tkpbench bench on {out['device']} ({out['cpu_count']} cores), commit {out['commit']}", title_justify="left")
    t.add_column("what", overflow="fold")
    t.add_column("measured", justify="right", overflow="fold")
    rows = []
    if "model" in out:
        rows.append(("TKP-PCL training, ViT-B/16 at 384", f"{out['model']['images_per_s']} images/s"))
    if "pseudo_masks_at_960" in out:
        rows.append(("pseudo-mask inference at 960", f"{out['pseudo_masks_at_960']['images_per_s']} images/s"))
    if "photo" in out.get("crf_500x375x21", {}):
        ips = out["crf_500x375x21"]["photo"]["pydensecrf_images_per_s_all_cores"]
        rows.append(("CRF, pydensecrf, all cores (photo)", f"{ips} images/s"))
    for name, r in out.get("deeplab_resnet101_crop321", {}).items():
        rows.append((f"DeepLab-v2 ResNet-101 training ({name})", f"{r['images_per_s']} images/s"))
    for target, r in out.get("pseudo_storage", {}).items():
        b = r["bytes_per_image"]
        rows.append(
            (
                f"stored probabilities per image, {target} (grid / earlier full size)",
                f"{b['grid_float32'] / 1e3:.1f} KB / {b['full_float16'] / 1e3:.1f} KB",
            )
        )
        g = r["projected_gb_train_split"]
        rows.append((f"  projected disk, {target} training split", f"{g['grid_float32']} GB / {g['full_float16']} GB"))
    for target, r in out.get("projection_hours", {}).items():
        if r["total_hours"] == 0:
            continue  # no stage of it was measured in this run
        parts = ", ".join(f"{k} {v} h" for k, v in r.items() if k not in ("total_hours", "per_seed"))
        rows.append((f"projected {target} chain on this device (one seed)", f"{r['total_hours']} h ({parts})"))
    for r in rows:
        t.add_row(*r)
    con.print(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tkpbench.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", default="metrics,pce,pooling,crf,data,model,pseudo,deeplab,storage")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=16, help="TKP-PCL training batch (the paper's 16)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--crf-image",
        type=Path,
        default=_SAMPLE_PHOTO if _SAMPLE_PHOTO.is_file() else None,
        help="a photograph for the CRF benchmark (default: a VOC sample image when present)",
    )
    p.add_argument(
        "--voc-root",
        type=Path,
        default=_SAMPLE_VOC if _SAMPLE_VOC.is_dir() else None,
        help="crf_agreement: a VOC2012 folder whose val images to use (default: the 50-image VOC val sample)",
    )
    args = p.parse_args(argv)
    device = torch.device(args.device)

    out: dict = {
        "device": device_name() if device.type == "cuda" else "CPU",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "commit": git_commit(),
        "command": " ".join(["python -m tkpbench.bench", *(argv or sys.argv[1:])]),
    }
    only = set(args.only.split(","))

    steps = [
        ("metrics", lambda: bench_metrics(out)),
        ("pce", lambda: bench_pce_pooling(device, out)),
        ("crf", lambda: bench_crf(device, out, args.crf_image)),
        ("data", lambda: bench_data(out, Path(tempfile.mkdtemp()))),
        ("model", lambda: bench_model(device, args.batch, out)),
        ("pseudo", lambda: bench_pseudo(device, out)),
        ("deeplab", lambda: bench_deeplab(device, out)),
        ("storage", lambda: bench_storage(out)),
        ("crf_agreement", lambda: bench_crf_agreement(device, out, args.voc_root)),
    ]
    for name, fn in steps:
        if name in only or (name == "pce" and "pooling" in only):
            t = time.perf_counter()
            fn()
            print(f"[{name}] done in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    out["projection_hours"] = projection(out)
    print(json.dumps(out, indent=2))
    print_summary(out)
    if args.json:
        atomic_write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
