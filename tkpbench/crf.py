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
from collections import deque
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


def _load(ds, pseudo_dir: Path, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Image ``i`` (uint8 (H, W, 3)) and its merged probabilities (float32 (C, H, W)); a damaged
    probabilities file raises ValueError naming it and the fix."""
    from tkpbench.pseudo import load_probs

    path = pseudo_dir / "probs" / f"{ds.ids[i]}.npz"
    try:
        probs = load_probs(path, ds.num_classes)
    except Exception as e:
        raise ValueError(f"{path}: cannot be loaded ({e}); run python -m tkpbench.pseudo again, "
                         "which recomputes damaged files") from e
    return ds.image(i), probs


def crf_labels(image: np.ndarray, probs: np.ndarray, cfg: dict) -> np.ndarray:
    """The CRF-refined label map (uint8 (H, W)) of merged probabilities (C, H, W): only the classes
    present (non-zero somewhere) enter the CRF; with fewer than two the map is that class."""
    present = np.flatnonzero(probs.reshape(probs.shape[0], -1).max(1) > 0)
    if len(present) < 2:
        return np.full(probs.shape[1:], present[0] if len(present) else 0, dtype=np.uint8)
    sub = probs[present]
    sub = sub / np.clip(sub.sum(0, keepdims=True), 1e-12, None)
    return present[dense_crf(image, sub, **cfg).argmax(0)].astype(np.uint8)


def refine_one(i: int) -> str:
    """Refine image ``i`` of the pool worker's dataset; returns 'done', 'skipped' or an error text."""
    from tkpbench.data.common import save_mask

    ds, d = _CTX["ds"], _CTX["dir"]
    out = d / "crf" / f"{ds.ids[i]}.png"
    if out.is_file():
        return "skipped"
    try:
        image, probs = _load(ds, d, i)
    except ValueError as e:
        return str(e)
    save_mask(out, crf_labels(image, probs, _CTX["cfg"]))
    return "done"


class _Inputs:
    """(index, image, probabilities or None, error text or None) of the images to refine, for a
    DataLoader whose workers decode while the device runs the CRF."""

    def __init__(self, ds, pseudo_dir: Path, todo: list[int]) -> None:
        self.ds, self.dir, self.todo = ds, pseudo_dir, todo

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, n: int):
        i = self.todo[n]
        try:
            return (i, *_load(self.ds, self.dir, i), None)
        except ValueError as e:
            return i, None, None, str(e)


def _refine_on_device(ds, pseudo_dir: Path, todo: list[int], cfg: dict, loaders: int):
    """The torch backend: one process drives the device image by image while DataLoader workers
    load the next images and a thread writes the PNGs, so the device does not wait on file I/O.
    Yields 'done' or an error text per image."""
    from concurrent.futures import ThreadPoolExecutor

    from torch.utils.data import DataLoader

    from tkpbench.data.common import save_mask

    loader = DataLoader(_Inputs(ds, pseudo_dir, todo), batch_size=None, num_workers=loaders,
                        prefetch_factor=4 if loaders else None, collate_fn=_as_is)  # keep numpy arrays
    with ThreadPoolExecutor(1) as writer:
        pending: deque = deque()
        for i, image, probs, error in loader:
            if error is not None:
                yield error
                continue
            label = crf_labels(image, probs, cfg)
            pending.append(writer.submit(save_mask, pseudo_dir / "crf" / f"{ds.ids[i]}.png", label))
            while pending and pending[0].done():
                pending.popleft().result()
                yield "done"
        for f in pending:
            f.result()
            yield "done"


def _as_is(sample):
    return sample


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
    if cfg.backend == "torch":
        import torch

        args[0]["device"] = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        loaders = min(workers, 4) if args[0]["device"] != "cpu" else 0  # on the CPU the CRF itself uses every core
        results = _refine_on_device(ds, pseudo_dir, todo, args[0], loaders)
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
