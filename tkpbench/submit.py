"""PASCAL VOC 2012 test: DeepLab's predictions packed for the evaluation server, and its figure kept.

    tkpbench submit voc-test --run-dir runs/topk_pce
    torchrun --nproc_per_node=8 -m tkpbench.submit voc-test --run-dir runs/topk_pce
    tkpbench submit voc-test --run-dir runs/topk_pce --server-result URL --miou 71.3

VOC's test labels are withheld: a "VOC test" mIoU comes from the evaluation server
(http://host.robots.ox.ac.uk:8080/, an account is needed). This command predicts each image of
``ImageSets/Segmentation/test.txt`` (1,456 ids, from VOC2012test.tar: ``tkpbench data download
voc-test``) with ``<run>/seg/final.pt`` and the protocol ``segment eval`` scores (``seg.eval_scales``,
``seg.eval_flip``, ``seg.eval_crf``), at the image's own size, and writes it as an indexed PNG with
VOC's palette (class indices 0-20) to

    results/<run>/voc-test/results/VOC2012/Segmentation/comp6_test_cls/<id>.png

comp6 is the competition for methods trained on data beyond VOC's (here ImageNet initialisation),
where WSSS papers submit. The folder is then checked (every listed id once and nothing else, mode
"P" with VOC's palette, classes 0-20, each PNG its image's size) and ``results/<run>/voc-test/
results.tar.gz`` is written: a gzipped tar of the ``results/`` folder, the archive the server takes.
Under torchrun the images are shared over the ranks; rank 0 checks and packs.

Resumable: PNGs made by the same DeepLab weights and settings that pass the check are kept; an invalid
one (a killed job's, the wrong size or palette) is made again, and a change of weights or settings
clears the folder (``runs.claim_outputs``).

``--server-result URL --miou X`` records the figure of the server's result page (it needs a login,
so the figure is typed, not fetched) as the "seg_test" stage of ``results/<run>/summary.json``,
with the digest of the archive it scores; the report shows it in Table 2's test column.
"""

from __future__ import annotations

import re
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import tv_tensors

from tkpbench import cli
from tkpbench import distributed as D
from tkpbench.config import Config
from tkpbench.crf import crf_device, dense_crf
from tkpbench.data.common import save_mask, voc_palette
from tkpbench.data.transforms import eval_transform
from tkpbench.data.voc import VOCSegmentation
from tkpbench.deeplab import IMAGENET_MEAN, IMAGENET_STD, DeepLabV2, predict_probs
from tkpbench.device import stage_processes
from tkpbench.errors import ConfigError, UserError
from tkpbench.io import atomic_write, file_digest, remove_stale_temporaries
from tkpbench.progress import track
from tkpbench.records import StageRecord, stamp, write_stage
from tkpbench.runs import ResultsDir, RunDir, chain_settings, claim_outputs, load_final, model_digest, read_marker, run_config

COMPETITION = "comp6"
PNG_FOLDER = Path("results") / "VOC2012" / "Segmentation" / f"{COMPETITION}_test_cls"
ARCHIVE = "results.tar.gz"
STAMP = "STAMP_results.json"  # runs.claim_outputs's stamp of the results/ folder
NUM_CLASSES = 21
_PALETTE = voc_palette()


class SubmissionError(UserError):
    """A test submission that is incomplete or not in the server's format, or a bad server record."""


def submission_dir(results: Path, run: str) -> Path:
    """``results/<run>/voc-test``: the PNG tree under ``results/``, its stamp and the archive."""
    return ResultsDir(results).root / run / "voc-test"


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image from its header, without decoding it."""
    with Image.open(path) as im:
        return im.size


def png_problem(path: Path, size: tuple[int, int]) -> str | None:
    """None when ``path`` is what the server takes for an image of ``size`` (width, height): a whole
    indexed PNG with VOC's palette, classes 0-20, the image's size; else what is wrong, naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            fmt, mode, got, pal = im.format, im.mode, im.size, im.getpalette()
            values = np.asarray(im) if mode == "P" else None
    except FileNotFoundError:
        return f"{path.name}: missing"
    except Exception as e:  # a truncated file from a killed job, or not an image
        return f"{path.name}: cannot be read ({e.__class__.__name__})"
    if fmt != "PNG" or mode != "P":
        return f"{path.name}: a {fmt} of mode {mode}; the server takes indexed PNGs (mode P) of class indices"
    if not pal or len(pal) < 3 * NUM_CLASSES or pal != _PALETTE[: len(pal)]:
        return f"{path.name}: its palette is not VOC's"
    if got != size:
        return f"{path.name}: is {got[0]}x{got[1]}, its image is {size[0]}x{size[1]}"
    if values.max() >= NUM_CLASSES:
        return f"{path.name}: holds class index {int(values.max())}; only 0-{NUM_CLASSES - 1} are classes"
    return None


def check_submission(folder: Path, ids: list[str], sizes: list[tuple[int, int]], limit: int = 5) -> None:
    """Raise SubmissionError unless ``folder`` holds exactly ``<id>.png`` for every id, each passing ``png_problem``."""
    want = {f"{i}.png" for i in ids}
    have = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    problems = [f"{n}: not an id of test.txt" for n in sorted(have - want)]
    problems += [p for i, s in zip(ids, sizes) if (p := png_problem(folder / f"{i}.png", s))]
    if problems:
        raise SubmissionError(
            f"{folder}: {len(have & want)} of {len(ids)} test PNGs present, {len(problems)} problems "
            f"({'; '.join(problems[:limit])}{'; ...' if len(problems) > limit else ''}). "
            "Fix: run the same tkpbench submit voc-test command again (invalid PNGs are made again)"
        )


def pack(root: Path, ids: list[str], archive: Path) -> None:
    """Write ``archive``, a gzipped tar of ``root/results`` (its folders, then every PNG in id order), atomically."""

    def write(f) -> None:
        with tarfile.open(fileobj=f, mode="w:gz") as tar:
            for depth in range(1, len(PNG_FOLDER.parts) + 1):
                d = Path(*PNG_FOLDER.parts[:depth])
                tar.add(root / d, arcname=str(d), recursive=False)
            for i in ids:
                tar.add(root / PNG_FOLDER / f"{i}.png", arcname=str(PNG_FOLDER / f"{i}.png"))

    atomic_write(archive, write)


class TestImages(Dataset):
    """(image normalised as ``segment eval`` reads it, index) of a split without masks."""

    def __init__(self, base: VOCSegmentation) -> None:
        self.base = base
        self.transform = eval_transform(None, IMAGENET_MEAN, IMAGENET_STD)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        img = tv_tensors.Image(torch.from_numpy(self.base.image(index)).permute(2, 0, 1))
        return self.transform(img), index


@torch.no_grad()
def predict(run: RunDir, cfg: Config, base: VOCSegmentation, indices: list[int], out: Path, dist: D.DistInfo, progress: bool):
    """Write DeepLab's prediction of images ``indices`` of ``base`` to ``out/<id>.png`` (Table 2's protocol)."""
    ck = load_final(run.seg)
    model = DeepLabV2(base.num_classes, cfg.seg.backbone, output_stride=cfg.seg.output_stride)
    model.load_state_dict(ck["model"])
    model = model.to(dist.device).eval()
    crf_dev = str(crf_device(cfg.crf.device, dist.local_rank)) if cfg.seg.eval_crf else ""
    loader = DataLoader(Subset(TestImages(base), indices), batch_size=1, num_workers=min(cfg.seg.workers, 4))
    for img, idx in track(loader, total=len(loader), description="DeepLab on VOC test", enabled=progress and dist.is_main):
        i = int(idx)
        p = predict_probs(model, img.to(dist.device), list(cfg.seg.eval_scales), cfg.seg.eval_flip, cfg.train.amp)
        if cfg.seg.eval_crf:
            label = dense_crf(base.image(i), p.cpu().numpy().astype(np.float32), cfg.crf, device=crf_dev).argmax(0)
        else:
            label = p.argmax(0).cpu().numpy()
        save_mask(out / f"{base.ids[i]}.png", label.astype(np.uint8))


def make_submission(run_dir: Path, cfg: Config, dist: D.DistInfo, results: Path = Path("results"), progress: bool = True) -> Path:
    """Predict, check and pack the VOC 2012 test submission of ``run_dir`` (see the module docstring);
    returns the archive's path."""
    if cfg.data.dataset != "voc":
        raise ConfigError(f"data.dataset is {cfg.data.dataset!r}: the test server takes VOC 2012 test (data.dataset = 'voc')")
    run = RunDir(run_dir)
    base = VOCSegmentation(cfg.data.root, "test")  # names a missing list or image
    folder = submission_dir(results, run.name)
    out = folder / PNG_FOLDER
    if dist.is_main:
        load_final(run.seg)  # a missing or foreign final.pt stops here, before anything is removed
        stale = claim_outputs(folder, model_digest(run.seg.final), chain_settings("seg_eval", cfg), ("results",))
        if stale:
            print(f"VOC test: removed the PNGs of other weights or settings ({'; '.join(stale)})", flush=True)
        (folder / ARCHIVE).unlink(missing_ok=True)  # made again from the PNGs below
        if out.is_dir():
            remove_stale_temporaries(out)
    D.barrier()
    sizes = [image_size(base.image_path(i)) for i in range(len(base))]
    mine = D.shard_indices(len(base), dist.rank, dist.world)
    problems = {i: png_problem(out / f"{base.ids[i]}.png", sizes[i]) for i in mine}
    todo = [i for i in mine if problems[i]]
    bad = [problems[i] for i in todo if not problems[i].endswith(": missing")]
    if bad:  # every rank says which of its PNGs it replaces
        print(f"VOC test: {len(bad)} existing PNGs are made again ({'; '.join(bad[:3])})", flush=True)
    if todo:
        predict(run, cfg, base, todo, out, dist, progress)
    made = sum(D.all_gather_object(len(todo)))  # also the barrier before rank 0 reads every rank's PNGs
    archive = folder / ARCHIVE
    if dist.is_main:
        check_submission(out, base.ids, sizes)
        pack(folder, base.ids, archive)
        print(f"VOC test: {made} PNGs predicted, {len(base) - made} kept; all {len(base)} checked. Upload {archive}", flush=True)
    return archive


def record_server_result(run_dir: Path, cfg: Config, url: str, miou: float | None, results: Path = Path("results")) -> Path:
    """Record the server's result page (and the mIoU it shows) as the "seg_test" stage of the run's
    summary, tied to the archive this command made and the weights that made it."""
    if not re.fullmatch(r"https?://\S+", url):
        raise SubmissionError(f"--server-result {url!r}: expected the http(s) address of the server's result page")
    if miou is not None and not 0 <= miou <= 100:
        raise SubmissionError(f"--miou {miou}: expected the page's mean IoU in percent (0-100)")
    name = RunDir(run_dir).name
    folder = submission_dir(results, name)
    archive, made = folder / ARCHIVE, read_marker(folder / STAMP)
    if not archive.is_file() or made is None:
        raise SubmissionError(
            f"{archive} does not exist: a server figure is recorded with the archive it scores. "
            f"Fix: tkpbench submit voc-test --run-dir {run_dir} (then upload it), or pass the --results of that run"
        )
    try:
        with tarfile.open(archive) as tar:
            n = sum(1 for m in tar.getmembers() if m.isfile())
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SubmissionError(f"{archive} cannot be read ({e}). Fix: tkpbench submit voc-test --run-dir {run_dir}") from e
    rec = StageRecord(
        stage="seg_test",
        dataset="voc",
        split="test",
        miou=miou,
        per_class={},
        num_images=n,
        protocol={
            "server_result": url,
            "scored_by": "PASCAL VOC evaluation server (figure typed from its result page)",
            "competition": COMPETITION,
            "archive": str(archive.relative_to(Path(results) / name)),
            "archive_sha256": file_digest(archive),
            "eval_scales": made["settings"].get("seg.eval_scales"),
            "eval_flip": made["settings"].get("seg.eval_flip"),
            "eval_crf": made["settings"].get("seg.eval_crf"),
        },
        synthetic=cfg.synthetic,
        model_sha256=made["model_sha256"],
        settings=made["settings"],
    )
    return write_stage(results, name, stamp(rec, 0.0), cfg.to_dict())


def _main(argv: list[str] | None = None) -> int:
    p = cli.parser(
        "tkpbench submit",
        __doc__,
        cli.config_options(),
        cli.run_dir_option("the run whose seg/final.pt predicts the test images"),
    )
    p.add_argument("target", choices=["voc-test"])
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument(
        "--server-result",
        metavar="URL",
        default=None,
        help="record the server's result page for this run's archive instead of predicting (with --miou)",
    )
    p.add_argument("--miou", type=float, default=None, help="the mean IoU (%%) the result page shows")
    args = p.parse_args(argv)
    if args.miou is not None and args.server_result is None:
        p.error("--miou goes with --server-result URL")
    cfg = run_config(args.run, args.config, args.overrides)
    if args.server_result is not None:
        path = record_server_result(args.run, cfg, args.server_result, args.miou, args.results)
        shown = "no mIoU given" if args.miou is None else f"mIoU {args.miou:.2f}"
        print(f"VOC test (server): {shown}, {args.server_result} recorded in {path}")
        return 0
    with stage_processes("submit voc-test", args.device, cfg.synthetic) as dist:
        make_submission(args.run, cfg, dist, args.results, not args.no_progress)
    return 0


main = cli.entry(_main)


if __name__ == "__main__":
    sys.exit(main())
