"""Pseudo masks from a trained TKP-PCL run (SPEC Sec. 2).

    python -m tkpbench.pseudo --run runs/topk_pce --split train_aug
    torchrun --nproc_per_node=8 -m tkpbench.pseudo --run runs/topk_pce --split train_aug
    python -m tkpbench.pseudo --run runs/topk_pce --split train --selection best_f1   # another epoch's weights

Each image is resized to ``pseudo.infer_size`` (960 by default, as ViT-PCM; the encoder resamples
its position embeddings), Z is read as a (C, h, w) map, merged with the image's tags (zero
absent classes, divide each class map by its maximum, renormalise), upsampled bilinearly to
the image's own size and arg-maxed. Outputs, one file per image id, atomic, skipped when done:

    <run>/pseudo/masks/<id>.png   palette PNG
    <run>/pseudo/probs/<id>.npz   merged probabilities of the tagged classes on the patch grid (float32,
                                  60 x 60 at 960) and the image size; ``runs.load_probs`` upsamples them
                                  with the call that made the mask (15-25x less disk than full size)
"""

from __future__ import annotations

import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from tkpbench import cli
from tkpbench import distributed as D
from tkpbench.config import Config
from tkpbench.data.common import save_mask
from tkpbench.data.transforms import build_dataset
from tkpbench.device import stage_processes
from tkpbench.errors import ConfigError
from tkpbench.model import TKPPCL, merged_grid, upsample_probs
from tkpbench.progress import track
from tkpbench.runs import (
    SELECTION_HELP,
    SELECTIONS,
    RunDir,
    claim_outputs,
    load_final,
    load_probs,
    mark_done,
    model_digest,
    png_ok,
    run_config,
    save_probs,
    stage_settings,
)


def is_done(run: RunDir, image_id: str, num_classes: int, need_probs: bool) -> bool:
    """Whether an image's outputs are whole: a truncated PNG or a damaged .npz is recomputed."""
    if not png_ok(run.masks / f"{image_id}.png"):
        return False
    if not need_probs:
        return True
    try:  # a probabilities file that fails to load is recomputed, not trusted
        load_probs(run.probs / f"{image_id}.npz", num_classes)
        return True
    except Exception:
        return False


class _InferSet(Dataset):
    def __init__(self, base, indices: list[int], size: int, mean, std) -> None:
        self.base, self.indices, self.size, self.mean, self.std = base, indices, size, mean, std

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, n: int):
        i = self.indices[n]
        img = torch.from_numpy(self.base.image(i)).permute(2, 0, 1)
        h, w = img.shape[-2:]
        x = TF.resize(img, [self.size, self.size], antialias=True).float().div_(255)
        x = TF.normalize(x, self.mean, self.std)
        return x, torch.from_numpy(np.asarray(self.base.tags(i))), i, torch.tensor([h, w])


def load_run(run: Path | RunDir) -> tuple[Config, TKPPCL]:
    """The trained model of a run folder's selection (``RunDir(root, selection)``; a path: final.pt),
    in eval mode on the CPU, and the config it was trained with."""
    model, cfg = TKPPCL.from_checkpoint(load_final(run))
    return cfg, model


@torch.no_grad()
def generate(run_dir: Path | RunDir, split: str, dist: D.DistInfo, cfg: Config | None = None, progress: bool = True) -> int:
    """Write pseudo masks (and probabilities) of ``split`` for this rank's shard, from the weights of
    ``run_dir``'s selection (a path: final.pt) into its pseudo folder. Returns images done."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    run_cfg, model = load_run(run)
    cfg = cfg or run_cfg
    patch = model.encoder.patch_size
    if cfg.pseudo.infer_size % patch:
        raise ConfigError(
            f"pseudo.infer_size = {cfg.pseudo.infer_size} is not a multiple of the encoder's patch size {patch}; "
            f"set it to one, e.g. {cfg.pseudo.infer_size // patch * patch}"
        )
    model = model.to(dist.device)
    base = build_dataset(cfg.data, split)
    if dist.is_main:  # outputs of another final.pt or other settings (a resumed stage) are removed, never mixed
        for stage in ("pseudo", "crf"):  # this split is not done (nor its CRF) until this stage marks it again
            run.marker(stage, split).unlink(missing_ok=True)
        stale = claim_outputs(run.pseudo, model_digest(run.weights()), stage_settings("pseudo", cfg), ("masks", "probs"))
        if stale:
            print(f"pseudo masks in {run.pseudo} were made from another model or settings ({'; '.join(stale)}): made again")
    D.barrier()
    run.masks.mkdir(parents=True, exist_ok=True)
    run.probs.mkdir(parents=True, exist_ok=True)
    mine = D.shard_indices(len(base), dist.rank, dist.world)
    todo = [i for i in mine if not is_done(run, base.ids[i], base.num_classes, cfg.pseudo.save_probs)]
    if not todo:
        return 0
    enc = model.encoder
    ds = _InferSet(base, todo, cfg.pseudo.infer_size, enc.mean, enc.std)
    loader = DataLoader(
        ds, batch_size=cfg.pseudo.batch_size, num_workers=min(cfg.data.workers, 8), pin_memory=dist.device.type == "cuda"
    )
    writer = ThreadPoolExecutor(4)
    pending: deque = deque()

    def write(image_id: str, mask: np.ndarray, grid: np.ndarray | None, classes: np.ndarray, size) -> None:
        save_mask(run.masks / f"{image_id}.png", mask)
        if grid is not None:
            save_probs(run.probs / f"{image_id}.npz", grid, classes, size, cfg.pseudo.align_corners)

    for x, tags, idx, hw in track(
        loader, total=len(loader), description=f"pseudo masks {split}", enabled=progress and dist.is_main
    ):
        with D.autocast(dist.device, cfg.train.amp):
            o = model(x.to(dist.device, non_blocking=True))
        tags = tags.to(dist.device)
        tags[:, 0] = True
        for b in range(x.shape[0]):  # each image goes back to its own size
            h, w = hw[b].tolist()
            merged = merged_grid(o.z[b : b + 1], o.grid, tags[b : b + 1])  # (1, C, h', w') on the patch grid
            mask = upsample_probs(merged, (h, w), cfg.pseudo.align_corners)[0].argmax(0).to(torch.uint8).cpu().numpy()
            classes = tags[b].nonzero().flatten()
            # only the tagged classes' grid leaves the device (the others are 0); the CRF upsamples it again
            kept = merged[0, classes].cpu().numpy() if cfg.pseudo.save_probs else None
            pending.append(writer.submit(write, base.ids[int(idx[b])], mask, kept, classes.cpu().numpy(), (h, w)))
            while len(pending) > 32:  # back-pressure: at most 32 images wait for the disk
                pending.popleft().result()
    for f in pending:
        f.result()
    writer.shutdown()
    return len(todo)


def _main(argv: list[str] | None = None) -> int:
    p = cli.parser("tkpbench pseudo", __doc__, cli.config_options(), cli.run_dir_option())
    p.add_argument("--split", default=None, help="default: data.seg_train_split of the run's config")
    p.add_argument("--selection", choices=SELECTIONS, default="final", help=SELECTION_HELP)
    args = p.parse_args(argv)
    cfg = run_config(args.run, args.config, args.overrides)
    with stage_processes("pseudo", args.device, cfg.synthetic) as dist:
        split = args.split or cfg.data.seg_train_split
        t = time.perf_counter()
        run = RunDir(args.run, args.selection)
        n = generate(run, split, dist, cfg, progress=not args.no_progress)
        D.barrier()
        if dist.is_main:
            mark_done(run, "pseudo", cfg, split)
            print(f"pseudo masks: {n} new images on rank 0 in {time.perf_counter() - t:.1f} s -> {run.pseudo}")
    return 0


main = cli.entry(_main)


if __name__ == "__main__":
    sys.exit(main())
