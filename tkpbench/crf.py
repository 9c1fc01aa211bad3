"""Dense CRF refinement of pseudo masks (Kraehenbuehl & Koltun 2011, through pydensecrf).

    python -m tkpbench.crf --run runs/topk_pce [--workers N]
    python -m tkpbench.crf --run runs/topk_pce --backend torch --device cuda   # tkpbench.permutohedral
    torchrun --nproc_per_node=8 -m tkpbench.crf --run runs/topk_pce      # each rank a shard

Defaults are ViT-PCM's and deeplab-pytorch's VOC values: 10 iterations, Gaussian (sxy 1,
compat 3), bilateral (sxy 67, srgb 3, compat 4). The unary is -log of the merged softmax.
The folder command runs one process per core with OMP_NUM_THREADS=1, skips finished images
and writes ``<run>/pseudo/crf/<id>.png`` atomically. Only the tagged classes enter the CRF
(absent classes have probability 0 and could never win); a single-class image is left as is.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from tkpbench.config import CRFConfig

DEFAULTS = CRFConfig()


def _check(image: np.ndarray, probs: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be (C, H, W) with H, W = {image.shape[:2]}, got {probs.shape}")
    if probs.shape[0] < 2:
        raise ValueError(f"the CRF needs at least 2 labels, got {probs.shape[0]}")
    if not np.isfinite(probs).all():
        raise ValueError("probs contain NaN or inf")
    s = probs.sum(0)
    if np.abs(s - 1).max() > 1e-2:
        raise ValueError(f"probs must sum to 1 over classes (found sums in [{s.min():.3f}, {s.max():.3f}])")


def dense_crf(image: np.ndarray, probs: np.ndarray, iters: int = DEFAULTS.iters,
              gauss_sxy: float = DEFAULTS.gauss_sxy, gauss_compat: float = DEFAULTS.gauss_compat,
              bi_sxy: float = DEFAULTS.bi_sxy, bi_srgb: float = DEFAULTS.bi_srgb,
              bi_compat: float = DEFAULTS.bi_compat, backend: str = "pydensecrf", device: str = "cpu",
              **_: object) -> np.ndarray:
    """Mean-field inference. image: uint8 (H, W, 3); probs: float32 (C, H, W) summing to 1 over C.
    Returns the refined marginals, float32 (C, H, W). ``backend``: "pydensecrf" (the reference)
    or "torch" (``tkpbench.permutohedral``, on ``device``)."""
    if backend == "torch":
        _check(image, probs)
        return dense_crf_batch(image[None], probs[None], iters, gauss_sxy, gauss_compat, bi_sxy, bi_srgb,
                               bi_compat, device)[0]
    if backend != "pydensecrf":
        raise ValueError(f"unknown CRF backend {backend!r}; available: 'pydensecrf', 'torch'")
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    _check(image, probs)
    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    d.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    d.addPairwiseBilateral(sxy=bi_sxy, srgb=bi_srgb, rgbim=np.ascontiguousarray(image), compat=bi_compat)
    return np.asarray(d.inference(iters), dtype=np.float32).reshape(c, h, w)


def dense_crf_batch(images: np.ndarray, probs: np.ndarray, iters: int = DEFAULTS.iters,
                    gauss_sxy: float = DEFAULTS.gauss_sxy, gauss_compat: float = DEFAULTS.gauss_compat,
                    bi_sxy: float = DEFAULTS.bi_sxy, bi_srgb: float = DEFAULTS.bi_srgb,
                    bi_compat: float = DEFAULTS.bi_compat, device: str = "cpu") -> np.ndarray:
    """The torch backend on several images of one size at once.
    images: uint8 (B, H, W, 3); probs: float32 (B, C, H, W). Returns float32 (B, C, H, W)."""
    import torch

    from tkpbench.permutohedral import mean_field

    for im, p in zip(images, probs):
        _check(im, p)
    img = torch.as_tensor(np.ascontiguousarray(images), device=device)
    unary = -torch.log(torch.as_tensor(probs, device=device).float().clamp_min(1e-5))  # as unary_from_softmax
    q = mean_field(img, unary, iters, gauss_sxy, gauss_compat, bi_sxy, bi_srgb, bi_compat)
    return q.cpu().numpy()


_CTX: dict = {}


def _init(cfg_dict: dict, data_cfg: dict, split: str, pseudo_dir: str) -> None:
    if cfg_dict.get("backend") != "torch":  # a pool worker: one thread each
        os.environ["OMP_NUM_THREADS"] = "1"
    from tkpbench.config import DataConfig
    from tkpbench.data.transforms import build_dataset

    _CTX.update(cfg=cfg_dict, ds=build_dataset(DataConfig(**data_cfg), split), dir=Path(pseudo_dir))


def refine_one(i: int) -> str:
    """Refine image ``i`` of the worker's dataset; returns 'done', 'skipped' or an error text."""
    from tkpbench.data.common import save_mask
    from tkpbench.pseudo import load_probs

    ds, d = _CTX["ds"], _CTX["dir"]
    image_id = ds.ids[i]
    out = d / "crf" / f"{image_id}.png"
    if out.is_file():
        return "skipped"
    try:
        probs = load_probs(d / "probs" / f"{image_id}.npz", ds.num_classes)
    except Exception as e:
        return (f"{d / 'probs' / (image_id + '.npz')}: cannot be loaded ({e}); run python -m tkpbench.pseudo again, "
                "which recomputes damaged files")
    present = np.flatnonzero(probs.reshape(probs.shape[0], -1).max(1) > 0)
    if len(present) < 2:
        label = np.full(probs.shape[1:], present[0] if len(present) else 0, dtype=np.uint8)
    else:
        sub = probs[present]
        sub = sub / np.clip(sub.sum(0, keepdims=True), 1e-12, None)
        q = dense_crf(ds.image(i), sub, **_CTX["cfg"])
        label = present[q.argmax(0)].astype(np.uint8)
    save_mask(out, label)
    return "done"


def refine_folder(run_dir: Path, split: str, cfg: CRFConfig, data_cfg, rank: int = 0, world: int = 1,
                  progress: bool = True) -> dict[str, int]:
    """CRF over this rank's shard of ``split``, one process per worker. Raises on damaged inputs."""
    from dataclasses import asdict

    from tkpbench.data.transforms import build_dataset
    from tkpbench.distributed import shard_indices
    from tkpbench.progress import track

    pseudo_dir = Path(run_dir) / "pseudo"
    (pseudo_dir / "crf").mkdir(parents=True, exist_ok=True)
    ds = build_dataset(data_cfg, split)
    todo = [i for i in shard_indices(len(ds), rank, world) if not (pseudo_dir / "crf" / f"{ds.ids[i]}.png").is_file()]
    counts = {"done": 0, "skipped": len(ds) - len(todo)}
    if not todo:
        return counts
    workers = cfg.workers or os.cpu_count() or 1
    errors = []
    args = (asdict(cfg), asdict(data_cfg), split, str(pseudo_dir))
    if cfg.backend == "torch":  # one process drives the GPU (or CPU) image by image
        import torch

        args[0]["device"] = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        _init(*args)
        results = map(refine_one, todo)
        pool = None
    else:
        pool = ProcessPoolExecutor(workers, initializer=_init, initargs=args)
        results = pool.map(refine_one, todo, chunksize=4)
    try:
        for r in track(results, total=len(todo), description=f"CRF {split}", enabled=progress):
            if r in counts:
                counts[r] += 1
            else:
                errors.append(r)
    finally:
        if pool is not None:
            pool.shutdown()
    if errors:
        raise RuntimeError(f"{len(errors)} images failed the CRF; first: {errors[0]}")
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tkpbench.crf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--split", default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--backend", choices=["pydensecrf", "torch"], default=None)
    p.add_argument("--device", default=None, help="torch backend: cuda or cpu")
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from tkpbench.pseudo import run_config

    cfg = run_config(args.run, args.config, args.overrides)
    if args.workers is not None:
        cfg.crf.workers = args.workers
    if args.backend:
        cfg.crf.backend = args.backend
    if args.device:
        cfg.crf.device = args.device
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    t = time.perf_counter()
    counts = refine_folder(args.run, args.split or cfg.data.seg_train_split, cfg.crf, cfg.data, rank, world,
                           progress=not args.no_progress and rank == 0)
    print(f"CRF rank {rank}: {counts} in {time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
