"""The CRF stage: dense-CRF refinement of a run's pseudo masks (``tkpbench.crf`` is the component).

    tkpbench crf --run runs/topk_pce [--workers N]                   # = python -m tkpbench.refine ...
    tkpbench crf --run runs/topk_pce --backend torch [--device cuda]  # tkpbench.permutohedral
    torchrun --nproc_per_node=8 -m tkpbench.refine --run runs/topk_pce   # each rank a shard

pydensecrf backend: a pool of one-thread worker processes, ``crf.workers`` of them (0 = this
process's share of the CPUs it may run on: under torchrun the ranks of a node split them). torch
backend: on ``crf.device`` or ``--device`` (resolved by ``crf.crf_device``: "" = this rank's GPU,
cuda:LOCAL_RANK, when there is one), with DataLoader workers reading ahead of a GPU, or with the
process's CPU share as threads. Each rank logs the device it uses. Under torchrun each rank refines
its shard; rank 0 first clears outputs made from another model or other settings, and no rank
looks at or writes a file before that is done. Finished images are skipped, a truncated PNG is
made again, and ``<run>/pseudo/crf/<id>.png`` is written atomically.
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
import torch.distributed as tdist
from torch.utils.data import DataLoader

from tkpbench import cli
from tkpbench import distributed as D
from tkpbench.config import CRFConfig, DataConfig
from tkpbench.crf import crf_device, crf_labels
from tkpbench.data.common import save_mask
from tkpbench.data.transforms import build_dataset
from tkpbench.device import cpus_per_process, describe
from tkpbench.errors import UserError
from tkpbench.progress import track
from tkpbench.runs import (
    SELECTION_HELP,
    SELECTIONS,
    RunDir,
    chain_settings,
    claim_outputs,
    load_probs,
    mark_done,
    model_digest,
    png_ok,
    run_config,
)


class CRFError(UserError):
    """Images of a folder that could not be refined (a damaged probabilities file, named)."""


_CTX: dict = {}


def _init(cfg: CRFConfig, data_cfg: DataConfig, split: str, pseudo_dir: str) -> None:
    """A pool worker: one thread each (the pool already uses this process's share of the cores)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    _CTX.update(cfg=cfg, ds=build_dataset(data_cfg, split), dir=Path(pseudo_dir))


def _load(ds, pseudo_dir: Path, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Image ``i`` (uint8 (H, W, 3)) and its merged probabilities (float32 (C, H, W)). A damaged
    probabilities file, or one made for an image of another size, raises CRFError naming it and the fix."""
    path = pseudo_dir / "probs" / f"{ds.ids[i]}.npz"
    try:
        probs = load_probs(path, ds.num_classes)
    except Exception as e:
        raise CRFError(
            f"{path}: cannot be loaded ({e}); run python -m tkpbench.pseudo again, which recomputes damaged files"
        ) from e
    image = ds.image(i)
    if probs.shape[1:] != image.shape[:2]:
        raise CRFError(
            f"{path}: probabilities of a {probs.shape[1]}x{probs.shape[2]} image, but image {ds.ids[i]} is "
            f"{image.shape[0]}x{image.shape[1]} (the images changed after the pseudo masks were made): "
            "delete it and run python -m tkpbench.pseudo again"
        )
    return image, probs


def refine_one(i: int) -> str:
    """Refine image ``i`` of the pool worker's dataset; returns 'done', 'skipped' or an error text."""
    ds, d = _CTX["ds"], _CTX["dir"]
    out = d / "crf" / f"{ds.ids[i]}.png"
    if out.is_file():
        return "skipped"
    try:
        image, probs = _load(ds, d, i)
    except UserError as e:  # a damaged probabilities file, a missing image: named in the stage's error
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
        except UserError as e:
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
    run_dir: Path | RunDir,
    split: str,
    cfg: CRFConfig,
    data_cfg: DataConfig,
    dist: D.DistInfo | None = None,
    progress: bool = True,
    made_from: tuple[str, dict] | None = None,
) -> dict[str, int]:
    """CRF over this rank's shard of ``split`` (all of it without ``dist``). Raises CRFError naming
    the first damaged input. Under torchrun ``dist`` is ``distributed.setup``'s, with its process group.

    ``made_from``: (model digest, settings) that the CRF outputs are made from; outputs of another
    model or other settings (a CRF stage killed, then resumed after a change) are removed first by
    rank 0, and every rank waits for that before it looks at or writes a file (a rank that went
    ahead would skip stale masks that are then deleted, or write masks that are). A truncated PNG
    (a killed write) is made again."""
    dist = dist or D.DistInfo()
    device = crf_device(cfg.device, dist.local_rank) if cfg.backend == "torch" else None  # fails before clearing
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)  # a path: final.pt's pseudo folder
    if made_from is not None and dist.is_main:
        stale = claim_outputs(run.pseudo, made_from[0], made_from[1], ("crf",))
        if stale:
            print(f"CRF masks in {run.crf} were made from another model or settings ({'; '.join(stale)}): made again")
    if dist.enabled:
        tdist.barrier()  # an error, not a no-op, when the process group is missing: the order above must hold
    run.crf.mkdir(parents=True, exist_ok=True)
    ds = build_dataset(data_cfg, split)
    mine = D.shard_indices(len(ds), dist.rank, dist.world)
    todo = [i for i in mine if not png_ok(run.crf / f"{ds.ids[i]}.png")]
    for i in todo:  # a damaged PNG is replaced, not trusted
        (run.crf / f"{ds.ids[i]}.png").unlink(missing_ok=True)
    counts = {"done": 0, "skipped": len(mine) - len(todo)}
    if not todo:
        return counts
    workers = cfg.workers or cpus_per_process()
    threads = torch.get_num_threads()
    pool = None
    if device is not None:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            loaders = min(workers, 4)  # DataLoader workers reading ahead of the GPU
        else:
            torch.set_num_threads(workers)  # on the CPU the CRF's own threads use the share (restored below)
            loaders = 0
        print(f"CRF rank {dist.rank}: {len(todo)} images of {split}, torch backend on {describe(device)}")
        results = _refine_on_device(ds, run.pseudo, todo, dataclasses.replace(cfg, device=str(device)), loaders)
    else:
        print(f"CRF rank {dist.rank}: {len(todo)} images of {split}, pydensecrf in {workers} one-thread processes")
        pool = ProcessPoolExecutor(workers, initializer=_init, initargs=(cfg, data_cfg, split, str(run.pseudo)))
        results = pool.map(refine_one, todo, chunksize=4)
    errors = []
    try:
        for r in track(results, total=len(todo), description=f"CRF {split}", enabled=progress):
            if r in counts:
                counts[r] += 1
            else:
                errors.append(r)
    finally:
        torch.set_num_threads(threads)
        if pool is not None:
            pool.shutdown()
    if errors:
        raise CRFError(f"{len(errors)} images failed the CRF; first: {errors[0]}")
    return counts


def _main(argv: list[str] | None = None) -> int:
    p = cli.parser("tkpbench crf", __doc__, cli.config_options(), cli.run_dir_option())
    p.add_argument("--split", default=None)
    p.add_argument(
        "--workers", type=int, default=None, help="pydensecrf processes or CPU threads (crf.workers; 0 = this rank's CPU share)"
    )
    p.add_argument("--backend", choices=["pydensecrf", "torch"], default=None)
    p.add_argument("--selection", choices=SELECTIONS, default="final", help=SELECTION_HELP)
    args = p.parse_args(argv)
    cfg = run_config(args.run, args.config, args.overrides)
    if args.workers is not None:
        cfg.crf.workers = args.workers
    if args.backend:
        cfg.crf.backend = args.backend
    if args.device:
        cfg.crf.device = args.device
    dist = D.setup("cpu")  # a gloo group for the barrier only: the CRF's device is crf_device's
    try:
        t = time.perf_counter()
        run = RunDir(args.run, args.selection)
        made_from = (model_digest(run.weights()), chain_settings("crf", cfg))
        counts = refine_folder(
            run,
            args.split or cfg.data.seg_train_split,
            cfg.crf,
            cfg.data,
            dist,
            progress=not args.no_progress and dist.is_main,
            made_from=made_from,
        )
        print(f"CRF rank {dist.rank}: {counts} in {time.perf_counter() - t:.1f} s")
        D.barrier()  # every rank's masks are written before the split is marked done
        if dist.is_main:
            mark_done(run, "crf", cfg, args.split or cfg.data.seg_train_split)
    finally:
        D.cleanup()
    return 0


main = cli.entry(_main)


if __name__ == "__main__":
    sys.exit(main())
