"""The CRF stage: dense-CRF refinement of a run's pseudo masks (``tkpbench.crf`` is the component).

    tkpbench crf --run runs/topk_pce [--workers N]                   # = python -m tkpbench.crf ...
    tkpbench crf --run runs/topk_pce --backend torch --device cuda   # tkpbench.permutohedral
    torchrun --nproc_per_node=8 -m tkpbench.refine --run runs/topk_pce   # each rank a shard

Defaults are ViT-PCM's and deeplab-pytorch's VOC values: 10 iterations, Gaussian (sxy 1,
compat 3), bilateral (sxy 67, srgb 3, compat 4). The unary is -log of the merged softmax.
The folder command runs one process per core with OMP_NUM_THREADS=1, skips finished images
and writes ``<run>/pseudo/crf/<id>.png`` atomically. Only the tagged classes enter the CRF
(absent classes have probability 0 and could never win); a single-class image is left as is.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from tkpbench import cli
from tkpbench.config import CRFConfig, DataConfig
from tkpbench.crf import crf_labels
from tkpbench.data.common import save_mask
from tkpbench.data.transforms import build_dataset
from tkpbench.distributed import shard_indices
from tkpbench.errors import UserError
from tkpbench.progress import track
from tkpbench.runs import RunDir, chain_settings, claim_outputs, load_probs, model_digest, png_ok, run_config


class CRFError(UserError):
    """Images of a folder that could not be refined (a damaged probabilities file, named)."""


_CTX: dict = {}


def _init(cfg: CRFConfig, data_cfg: DataConfig, split: str, pseudo_dir: str) -> None:
    """A pool worker: one thread each (the pool already uses every core)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    _CTX.update(cfg=cfg, ds=build_dataset(data_cfg, split), dir=Path(pseudo_dir))


def _load(ds, pseudo_dir: Path, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Image ``i`` (uint8 (H, W, 3)) and its merged probabilities (float32 (C, H, W)); a damaged
    probabilities file raises ValueError naming it and the fix."""
    path = pseudo_dir / "probs" / f"{ds.ids[i]}.npz"
    try:
        probs = load_probs(path, ds.num_classes)
    except Exception as e:
        raise ValueError(
            f"{path}: cannot be loaded ({e}); run python -m tkpbench.pseudo again, which recomputes damaged files"
        ) from e
    return ds.image(i), probs


def refine_one(i: int) -> str:
    """Refine image ``i`` of the pool worker's dataset; returns 'done', 'skipped' or an error text."""
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


def _refine_on_device(ds, pseudo_dir: Path, todo: list[int], cfg: CRFConfig, loaders: int):
    """The torch backend: one process drives the device image by image while DataLoader workers
    load the next images and a thread writes the PNGs, so the device does not wait on file I/O.
    Yields 'done' or an error text per image."""
    loader = DataLoader(
        _Inputs(ds, pseudo_dir, todo),
        batch_size=None,
        num_workers=loaders,
        prefetch_factor=4 if loaders else None,
        collate_fn=_as_is,
    )  # keep numpy arrays
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


def refine_folder(
    run_dir: Path,
    split: str,
    cfg: CRFConfig,
    data_cfg: DataConfig,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    made_from: tuple[str, dict] | None = None,
) -> dict[str, int]:
    """CRF over this rank's shard of ``split``. Raises on damaged inputs.

    ``made_from``: (model digest, settings) that the CRF outputs are made from; outputs of another
    model or other settings (a CRF stage killed, then resumed after a change) are removed first.
    A truncated PNG (a killed write) is made again."""
    run = RunDir(run_dir)
    if made_from is not None and rank == 0:
        stale = claim_outputs(run.pseudo, made_from[0], made_from[1], ("crf",))
        if stale:
            print(f"CRF masks in {run.crf} were made from another model or settings ({'; '.join(stale)}): made again")
    run.crf.mkdir(parents=True, exist_ok=True)
    ds = build_dataset(data_cfg, split)
    todo = [i for i in shard_indices(len(ds), rank, world) if not png_ok(run.crf / f"{ds.ids[i]}.png")]
    for i in todo:  # a damaged PNG is replaced, not trusted
        (run.crf / f"{ds.ids[i]}.png").unlink(missing_ok=True)
    counts = {"done": 0, "skipped": len(ds) - len(todo)}
    if not todo:
        return counts
    workers = cfg.workers or os.cpu_count() or 1
    errors = []
    if cfg.backend == "torch":
        cfg = dataclasses.replace(cfg, device=cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        loaders = min(workers, 4) if cfg.device != "cpu" else 0  # on the CPU the CRF itself uses every core
        results = _refine_on_device(ds, run.pseudo, todo, cfg, loaders)
        pool = None
    else:
        pool = ProcessPoolExecutor(workers, initializer=_init, initargs=(cfg, data_cfg, split, str(run.pseudo)))
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
        raise CRFError(f"{len(errors)} images failed the CRF; first: {errors[0]}")
    return counts


def _main(argv: list[str] | None = None) -> int:
    p = cli.parser("tkpbench crf", __doc__, cli.config_options())
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--split", default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--backend", choices=["pydensecrf", "torch"], default=None)
    args = p.parse_args(argv)
    cfg = run_config(args.run, args.config, args.overrides)
    if args.workers is not None:
        cfg.crf.workers = args.workers
    if args.backend:
        cfg.crf.backend = args.backend
    if args.device:
        cfg.crf.device = args.device
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    t = time.perf_counter()
    made_from = (model_digest(RunDir(args.run).final), chain_settings("crf", cfg))
    counts = refine_folder(
        args.run,
        args.split or cfg.data.seg_train_split,
        cfg.crf,
        cfg.data,
        rank,
        world,
        progress=not args.no_progress and rank == 0,
        made_from=made_from,
    )
    print(f"CRF rank {rank}: {counts} in {time.perf_counter() - t:.1f} s")
    return 0


main = cli.entry(_main)


if __name__ == "__main__":
    sys.exit(main())
