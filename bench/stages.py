"""Benchmarks (``make bench``): nothing here is a test; every figure is printed with its device.

    python bench/stages.py [--only model,pce,pooling,data,crf,metrics,deeplab,...] [--device cuda] [--json out.json]

Shapes and recipes are the voc target's (``tkpbench.pipeline.target_chains`` + ``load_config``, its
first chain: baselines/topk_pce.toml), and the projected cost of each target is computed from the
config of every chain that target runs, so a recipe changed there changes the figures here.

* model: forward + backward of TKP-PCL at the recipe's shapes (batch 16, 384, encoder blocks of the
  fine-tuning phase trainable), images/s and, on CUDA, the model FLOP rate against a measured bf16
  matmul peak (FLOPs: forward of everything + backward through the trainable blocks only, see
  ``train_flops``). Built from the components (``TKPPCL``, ``tkp_loss``, Adam over what trains),
  without the ET term: a chain with ``model.et`` (vit_pcm) costs more per step than measured here.
* pce / pooling: vectorised implementation against a naive Python loop.
* pseudo: pseudo-mask inference images/s at ``pseudo.infer_size`` (ViT-B/16, merge, upsampling, argmax).
* data: decoded+augmented images/s per DataLoader worker on generated data.
* crf: seconds per 500x375 image with 21 labels, pydensecrf (one core, and images/s with all cores) and the
  torch permutohedral backend on the present device, on uniform noise (the lattice's worst case) and on a
  photograph (``--crf-image``; default a VOC sample image when the real samples are present, else a
  generated image).
* metrics: confusion matrix over VOC-val-sized data (1,449 masks of 500x375).
* deeplab: training images/s at the recipe's crop, batch, backbone and MSC scales, bf16 + channels_last
  vs fp32 on CUDA (the fp32 mode is labelled TF32 when torch lets cuDNN/cuBLAS use TF32).
* crf_agreement (not in the default list; accuracy, not speed): the torch CRF backend against
  pydensecrf on every full-size VOC val image under ``--voc-root`` (default: the 50-image VOC sample).

Every record holds the machine (``tkpbench.records.machine_info``: CPU model, usable cores, GPU,
torch and CUDA versions) and the float settings (``tkpbench.distributed.precision_settings``: TF32).
"""

from __future__ import annotations

import argparse
import dataclasses
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's bench package

from bench.common import bench_model, machine_record, sync, tf32_in_use, timeit  # noqa: E402
from tkpbench.config import Config, DataConfig, load_config  # noqa: E402
from tkpbench.crf import dense_crf  # noqa: E402
from tkpbench.data import VOCSegmentation  # noqa: E402
from tkpbench.data.synth import blurred_probs, make_synthetic, render  # noqa: E402
from tkpbench.data.transforms import TKPTrainSet, tkp_train_transform  # noqa: E402
from tkpbench.deeplab import DeepLabV2, resize_labels  # noqa: E402
from tkpbench.device import usable_cpus  # noqa: E402
from tkpbench.distributed import autocast  # noqa: E402
from tkpbench.io import atomic_write_json  # noqa: E402
from tkpbench.metrics import ConfusionMatrix  # noqa: E402
from tkpbench.model import TKPPCL, patch_masks, upsample_probs  # noqa: E402
from tkpbench.pce import patch_contrastive_error  # noqa: E402
from tkpbench.pipeline import target_chains  # noqa: E402
from tkpbench.pooling import topk_pool  # noqa: E402
from tkpbench.records import device_name  # noqa: E402

# images per split of the full datasets (SPEC Sec. 2-3); per dataset the tagged classes per image
# (background included, from VOC's cls_labels and COCO's instances files) and a typical image size.
# Facts of the data; what each target runs on them is its configs' (``target_configs``).
SPLIT_IMAGES = {"voc": {"train_aug": 10582, "train": 1464, "val": 1449}, "coco": {"train2014": 82081, "val2014": 40504}}
DATASETS = {"voc": {"classes_per_image": 2.5, "size": (375, 500)}, "coco": {"classes_per_image": 3.9, "size": (480, 640)}}
PROJECTED = ("voc", "coco")


def target_configs(target: str) -> tuple[list[Config], bool]:
    """The config of each chain ``target`` runs (one seed), loaded as the pipeline loads it, and
    whether its chains go on to DeepLab."""
    chains, seg = target_chains(target, [], Path("runs"), Path("data/demo"))
    return [load_config(path, ov) for path, ov in chains], seg


def recipe() -> Config:
    """The configuration the stage benchmarks measure: the voc target's first chain (top-K + PCE)."""
    return target_configs("voc")[0][0]


@torch.no_grad()
def bench_pseudo(device: torch.device, cfg: Config, out: dict) -> None:
    """Pseudo-mask inference at ``pseudo.infer_size``: forward, tag merge, upsampling to 500x375, argmax."""

    model = TKPPCL(dataclasses.replace(cfg.model, weights="")).to(device).eval()
    batch, size = (4 if device.type == "cuda" else 1), cfg.pseudo.infer_size
    x = torch.randn(batch, 3, size, size, device=device)
    tags = torch.zeros(batch, cfg.model.num_classes, dtype=torch.bool, device=device)
    tags[:, [0, 3, 15]] = True

    def run():
        with autocast(device, cfg.train.amp):
            o = model(x)
        return patch_masks(o.z, o.grid, tags, (375, 500))

    dt = timeit(run, warmup=2 if device.type == "cuda" else 0, reps=5 if device.type == "cuda" else 1, sync=sync(device))
    out[f"pseudo_masks_at_{size}"] = {"batch": batch, "images_per_s": round(batch / dt, 3)}


def bench_pce_pooling(device: torch.device, out: dict) -> None:
    b, s, c, e = 16, 576, 21, 768
    f = torch.randn(b, s, e, device=device)
    z = (torch.randn(b, s, c, device=device) * 4).softmax(-1)
    fast = timeit(lambda: patch_contrastive_error(f, z), sync=sync(device))

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

    slow = timeit(naive, warmup=0, reps=1)
    out["pce"] = {
        "shape": [b, s, c, e],
        "vectorised_ms": round(fast * 1e3, 2),
        "per_image_class_loop_ms": round(slow * 1e3, 2),
        "speedup": round(slow / fast, 1),
    }
    fast = timeit(lambda: topk_pool(z, 6), sync=sync(device))
    slow = timeit(
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

    cores = usable_cpus()
    wait = sync(device)
    res: dict = {"cores": cores, "torch_device": device.type}
    for kind in ("noise", "photo"):
        img, probs, source = _crf_inputs(kind, photo)
        one = timeit(lambda: dense_crf(img, probs), warmup=0, reps=2)
        ours = timeit(
            lambda: dense_crf(img, probs, backend="torch", device=str(device)),
            warmup=1,
            reps=5 if device.type == "cuda" else 2,
            sync=wait,
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


def deeplab_key(cfg: Config) -> str:
    return f"deeplab_{cfg.seg.backbone}_crop{cfg.seg.crop}"


def bench_deeplab(device: torch.device, cfg: Config, out: dict) -> None:
    """DeepLab-v2 training steps at the recipe's backbone, output stride, crop, batch (10 on CUDA, 2 on
    the CPU) and MSC scales (all scales' losses summed): bf16 + channels_last and fp32 on CUDA."""
    s = cfg.seg
    res = {}
    modes = [("bf16_channels_last", True), ("fp32", False)] if device.type == "cuda" else [("fp32", False)]
    batch = s.batch_size if device.type == "cuda" else 2
    for name, fast in modes:
        m = DeepLabV2(cfg.model.num_classes, s.backbone, output_stride=s.output_stride).to(device)
        if fast:
            m = m.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
        x = torch.randn(batch, 3, s.crop, s.crop, device=device)
        if fast:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, cfg.model.num_classes, (batch, s.crop, s.crop), device=device)
        scales = list(s.msc_scales)

        def step():
            with autocast(device, fast):
                outs = m(x, msc_scales=scales) if scales else [m(x)]
            sum(torch.nn.functional.cross_entropy(o.float(), resize_labels(y, o.shape[-2:])) for o in outs).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        dt = timeit(step, warmup=2 if device.type == "cuda" else 0, reps=10 if device.type == "cuda" else 1, sync=sync(device))
        res[name] = {
            "batch": batch,
            "images_per_s": round(batch / dt, 2),
            "msc_scales": scales,
            "output_stride": s.output_stride,
            "tf32": not fast and tf32_in_use(device),
        }
    out[deeplab_key(cfg)] = res


def _portable(path) -> str:
    """A path as it may be written into a shared benchmark record: its last two parts, never the
    absolute path of the machine that measured it."""
    p = Path(str(path))
    return str(Path(p.parent.name) / p.name) if p.is_absolute() else str(p)


_SAMPLE_VOC = Path(__file__).resolve().parents[2] / "shared/data/voc2012-sample/VOC2012"
_SAMPLE_PHOTO = _SAMPLE_VOC / "JPEGImages/2007_000063.jpg"


def bench_storage(out: dict) -> None:
    """Bytes per image of the stored pseudo-mask probabilities, now (patch grid, float32) and as
    earlier versions stored them (full size, float16), with the projected disk use of each target's
    DeepLab training split."""
    rng = np.random.default_rng(0)
    res = {}
    for target in PROJECTED:
        cfg = target_configs(target)[0][0]
        d = DATASETS[cfg.data.dataset]
        k, size = int(round(d["classes_per_image"])), d["size"]
        grid = torch.from_numpy(rng.random((1, k, 60, 60), dtype=np.float32))
        grid = torch.nn.functional.avg_pool2d(grid, 5, 1, 2)  # smooth like real patch scores
        grid = grid / grid.sum(1, keepdim=True)
        full = upsample_probs(grid, size)[0].numpy()
        sizes = {}
        for name, arrays in (
            ("grid_float32", {"grid": grid[0].numpy(), "size": np.array(size)}),
            ("full_float16", {"probs": full.astype(np.float16)}),
        ):
            buf = io.BytesIO()
            np.savez_compressed(buf, classes=np.arange(k, dtype=np.int16), **arrays)
            sizes[name] = len(buf.getvalue())
        n = SPLIT_IMAGES[cfg.data.dataset][cfg.data.seg_train_split]
        res[target] = {
            "classes_per_image": k,
            "image_size": list(size),
            "bytes_per_image": sizes,
            "projected_gb_train_split": {name: round(b * n / 1e9, 2) for name, b in sizes.items()},
            "ratio": round(sizes["full_float16"] / sizes["grid_float32"], 1),
        }
    out["pseudo_storage"] = res


def chain_seconds(cfg: Config, seg: bool, out: dict) -> dict[str, float]:
    """Seconds of each stage of one chain (one seed) on this device, from the figures in ``out``:
    training steps x s/step (rescaled to the chain's batch), images / images per s for the pseudo
    masks and the CRF of each split the chain makes them for, DeepLab iterations x batch / images
    per s. A stage whose figure was not measured here, or was measured at other settings (another
    inference size, DeepLab crop or backbone), is left out. Per-epoch validation is not counted."""
    images = SPLIT_IMAGES[cfg.data.dataset]
    splits = list(dict.fromkeys([cfg.data.seg_train_split if seg else cfg.data.mask_split, cfg.data.mask_split]))
    t = {}
    m = out.get("model")
    if m and m["img_size"] == cfg.model.img_size:
        steps = cfg.train.epochs * (images[cfg.data.train_split] // cfg.train.batch_size)
        steps = min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps
        t["train"] = steps * m["s_per_step"] * cfg.train.batch_size / m["batch"]
    p = out.get(f"pseudo_masks_at_{cfg.pseudo.infer_size}")
    if p:
        t["pseudo"] = sum(images[s] for s in splits) / p["images_per_s"]
    crf = out.get("crf_500x375x21", {}).get("photo")
    if crf:
        t["crf"] = sum(images[s] for s in splits) / crf["pydensecrf_images_per_s_all_cores"]
    dl = out.get(deeplab_key(cfg), {})
    dl = dl.get("bf16_channels_last") or dl.get("fp32")
    if seg and dl and dl["msc_scales"] == list(cfg.seg.msc_scales):
        t["deeplab"] = cfg.seg.iters * cfg.seg.batch_size / dl["images_per_s"]
    return t


def projection(out: dict) -> dict:
    """Wall-clock hours of each full target on this device, one seed, summed over the chains the
    target runs (``target_configs``), per stage; a stage not measured here is left out."""
    proj = {}
    for target in PROJECTED:
        cfgs, seg = target_configs(target)
        stages: dict[str, float] = {}
        for cfg in cfgs:
            for k, v in chain_seconds(cfg, seg, out).items():
                stages[k] = stages.get(k, 0.0) + v
        proj[target] = {k: round(v / 3600, 2) for k, v in stages.items()}
        proj[target]["total_hours"] = round(sum(stages.values()) / 3600, 1)
        proj[target]["chains"] = [c.name for c in cfgs]
        proj[target]["per_seed"] = "one training seed; each more seed adds the same again"
        if any(c.model.et for c in cfgs) and "train" in stages:
            proj[target]["note"] = "training of the model.et chains counted at the step time measured without ET"
    return proj


def print_summary(out: dict) -> None:
    """The table ``make bench`` ends with: throughput per stage, storage, projected time per target."""
    con = Console()
    cores = out["machine"]["cores"]
    t = Table(title=f"bench/stages.py on {out['device']} ({cores} usable cores), commit {out['commit']}", title_justify="left")
    t.add_column("what", overflow="fold")
    t.add_column("measured", justify="right", overflow="fold")
    rows = []
    if "model" in out:
        m = out["model"]
        rows.append((f"TKP-PCL training, {m['encoder']} at {m['img_size']}", f"{m['images_per_s']} images/s"))
    for key, r in out.items():
        if key.startswith("pseudo_masks_at_"):
            rows.append((f"pseudo-mask inference at {key.rsplit('_', 1)[1]}", f"{r['images_per_s']} images/s"))
    if "photo" in out.get("crf_500x375x21", {}):
        ips = out["crf_500x375x21"]["photo"]["pydensecrf_images_per_s_all_cores"]
        rows.append(("CRF, pydensecrf, all cores (photo)", f"{ips} images/s"))
    for key, modes in out.items():
        if key.startswith("deeplab_"):
            for name, r in modes.items():
                label = f"{name}, TF32" if r.get("tf32") else name
                rows.append((f"DeepLab-v2 {key[len('deeplab_') :]} training ({label})", f"{r['images_per_s']} images/s"))
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
        parts = ", ".join(f"{k} {v} h" for k, v in r.items() if isinstance(v, float) and k != "total_hours")
        rows.append((f"projected {target} target ({' + '.join(r['chains'])}, one seed)", f"{r['total_hours']} h ({parts})"))
    for r in rows:
        t.add_row(*r)
    con.print(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/stages.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="metrics,pce,pooling,crf,data,model,pseudo,deeplab,storage")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="TKP-PCL training batch (default: the recipe's train.batch_size)")
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
    cfg = recipe()

    rec = machine_record()
    out: dict = {
        "device": device_name() if device.type == "cuda" else "CPU",
        "cpu_count": rec["machine"]["cores"],
        "torch": torch.__version__,
        "commit": rec["commit"],
        "command": " ".join(["python bench/stages.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": rec["machine"],
        "precision": rec["precision"],
        "recipe": cfg.name,
    }
    only = set(args.only.split(","))

    steps = [
        ("metrics", lambda: bench_metrics(out)),
        ("pce", lambda: bench_pce_pooling(device, out)),
        ("crf", lambda: bench_crf(device, out, args.crf_image)),
        ("data", lambda: bench_data(out, Path(tempfile.mkdtemp()))),
        ("model", lambda: bench_model(device, cfg, args.batch or cfg.train.batch_size, out)),
        ("pseudo", lambda: bench_pseudo(device, cfg, out)),
        ("deeplab", lambda: bench_deeplab(device, cfg, out)),
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
