"""Data commands.

python -m tkpbench.data download {voc,voc-test,sbd,coco,weights} --root DIR [--base-url URL]
python -m tkpbench.data check {voc,coco} --root DIR [--splits train val train_aug]
python -m tkpbench.data prepare-aug --root VOC2012_DIR --sbd SBD_DATASET_DIR
python -m tkpbench.data coco-masks --root COCO_DIR --split train2014
python -m tkpbench.data synth --root DIR --n N --seed S
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tkpbench.data.check import check_dataset
from tkpbench.data.coco import COCOSegmentation, build_masks
from tkpbench.data.common import DatasetError
from tkpbench.data.download import DownloadError, download
from tkpbench.data.synth import make_synthetic
from tkpbench.data.voc import prepare_train_aug


def _bounded_int(lo: int, hi: int | None, what: str):
    """An argparse type: an integer in [lo, hi] (no upper bound when hi is None)."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = None
        if n is None or n < lo or (hi is not None and n > hi):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return n

    return parse


WORKERS = _bounded_int(0, None, "a number of processes >= 0 (0: one per CPU)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tkpbench data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="fetch archives (resumable, checksummed) and extract them")
    d.add_argument("what", choices=["voc", "voc-test", "sbd", "coco", "weights"])
    d.add_argument("--root", type=Path, required=True)
    d.add_argument("--base-url", default=None, help="mirror folder that holds the same file names")
    c = sub.add_parser("check", help="report what is present and how to fix what is missing")
    c.add_argument("dataset", choices=["voc", "coco"])
    c.add_argument("--root", type=Path, required=True)
    c.add_argument("--splits", nargs="+", default=None)
    c.add_argument("--quick", action="store_true", help="check that files exist, without decoding each one")
    a = sub.add_parser("prepare-aug", help="build train_aug.txt and SegmentationClassAug/ from SBD")
    a.add_argument("--root", type=Path, required=True)
    a.add_argument("--sbd", type=Path, required=True)
    a.add_argument("--workers", type=WORKERS, default=0, help="processes (default 0: one per CPU)")
    m = sub.add_parser("coco-masks", help="write COCO semantic masks as PNGs (parallel, resumable)")
    m.add_argument("--root", type=Path, required=True)
    m.add_argument("--split", default="train2014")
    m.add_argument("--workers", type=WORKERS, default=0, help="processes (default 0: one per CPU)")
    m.add_argument("--protocol", choices=["tkpbench", "vit_pcm"], default="tkpbench", help="data.coco_protocol")
    s = sub.add_parser("synth", help="generate the demo datasets (VOC layout + COCO twin)")
    s.add_argument("--root", type=Path, required=True)
    s.add_argument("--n", type=int, default=200)
    s.add_argument("--seed", type=_bounded_int(0, None, "a seed >= 0"), default=0)
    s.add_argument("--classes", type=_bounded_int(1, 20, "a number of VOC foreground classes (1 to 20)"), default=20)
    s.add_argument(
        "--size",
        type=_bounded_int(16, None, "an image side of at least 16 px (one ViT patch)"),
        nargs=2,
        default=[120, 160],
        metavar=("H", "W"),
        help="mean image size",
    )
    args = p.parse_args(argv)

    try:
        if args.cmd == "download":
            for path in download(args.what, args.root, args.base_url):
                print(f"ok: {path}")
        elif args.cmd == "check":
            splits = args.splits or (["train", "val", "train_aug"] if args.dataset == "voc" else ["train2014", "val2014"])
            ok, lines = check_dataset(args.dataset, args.root, splits, decode=not args.quick)
            print("\n".join(lines))
            return 0 if ok else 1
        elif args.cmd == "prepare-aug":
            print(prepare_train_aug(args.root, args.sbd, args.workers, progress=True))
        elif args.cmd == "coco-masks":
            folder = "semantic" if args.protocol == "tkpbench" else f"semantic_{args.protocol}"
            ds = COCOSegmentation(
                args.root,
                args.split,
                mask_dir=Path(args.root) / folder / args.split,
                skip_unannotated=args.protocol == "vit_pcm",
                protocol=args.protocol,
            )
            print(f"built {build_masks(ds, args.workers)} masks into {ds.mask_dir}")
        elif args.cmd == "synth":
            print(make_synthetic(args.root, args.n, args.seed, tuple(args.size), args.classes))
    except (DatasetError, DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
