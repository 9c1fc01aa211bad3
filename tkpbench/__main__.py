"""``tkpbench``: one command for every stage (``python -m tkpbench`` is the same).

    tkpbench reproduce demo                  # the whole chain; = ./reproduce.sh demo
    tkpbench train --config baselines/topk_pce.toml --set data.root=/data/VOC2012
    tkpbench report results
    tkpbench <command> --help

Each command is the ``main`` of one module (``python -m tkpbench.<module>`` keeps working), and
every one of them ends on bad input with one ``error:`` line (``--debug`` for the traceback).
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "reproduce": ("tkpbench.pipeline", "run a whole target (voc, coco, ablation, sweep, demo), resumably"),
    "train": ("tkpbench.train", "train TKP-PCL (torchrun for several GPUs)"),
    "pseudo": ("tkpbench.pseudo", "pseudo masks of a trained run"),
    "crf": ("tkpbench.refine", "dense-CRF refinement of a run's pseudo masks"),
    "evaluate": ("tkpbench.evaluate", "score a run's pseudo masks (Table 1) or a folder of masks"),
    "segment": ("tkpbench.segment", "train or evaluate DeepLab-v2 on a run's pseudo masks"),
    "report": ("tkpbench.report", "Tables 1-4, published vs measured, with intervals; figures"),
    "data": ("tkpbench.data.__main__", "download, check, prepare VOC/SBD/COCO, generate demo data"),
    "predict": ("tkpbench.predict", "masks and overlays for your own images from a trained run"),
    "submit": ("tkpbench.submit", "VOC 2012 test predictions packed for the evaluation server; record its figure"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return (
        "usage: tkpbench <command> [options]   (tkpbench <command> --help for its options)\n\ncommands:\n"
        + "\n".join(lines)
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr, end="")
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv = [f"tkpbench {name}", *rest]
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
