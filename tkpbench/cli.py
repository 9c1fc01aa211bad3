"""What every command-line entry point shares: the common options and one way to end on bad input.

Each entry point builds its parser from these parent parsers and runs its ``main`` through
``guard``: an error the user can fix (bad config value, missing data, damaged checkpoint, a
locked run, a full disk, a signal) ends with one ``error: ...`` line and a non-zero exit, never a
traceback. ``--debug`` (or ``TKPBENCH_DEBUG=1``) shows the traceback as well.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

from tkpbench.errors import UserError
from tkpbench.io import DiskFullError

# errors whose message is the whole story (the exit code is 2; a signal's is 128 + its number)
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, DiskFullError, FileNotFoundError, PermissionError)


def config_options(required: bool = False) -> argparse.ArgumentParser:
    """``--config`` and the repeatable ``--set KEY=VALUE``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", type=Path, required=required, default=None, help="a TOML config (e.g. baselines/topk_pce.toml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set data.root=/data/VOC2012 (repeatable)",
    )
    return p


def common_options() -> argparse.ArgumentParser:
    """``--debug`` and ``--device``, on every command."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (or set TKPBENCH_DEBUG=1)")
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or cuda:N (default: this process's GPU; a real run without a usable GPU stops "
        "and says why, --device cpu insists)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    return p


def run_dir_option(help: str = "a run folder holding final.pt (e.g. runs/topk_pce)") -> argparse.ArgumentParser:
    """``--run-dir RUN``, the run folder a stage works on. Not ``--run``: under torchrun its own
    parser takes ``--run`` for an abbreviation of its ``--run-path`` and stops ("ambiguous option").
    Outside torchrun ``--run`` still works (argparse abbreviations)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--run-dir", dest="run", type=Path, required=True, metavar="RUN", help=help)
    return p


def fit_options() -> argparse.ArgumentParser:
    """The options of the commands that train (``train``, ``segment train``)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--resume", default="auto", help="'auto' (newest valid checkpoint), a checkpoint path, or 'no'")
    p.add_argument("--force", action="store_true", help="resume even if the config differs")
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log to <run>/tensorboard for TensorBoard (needs the extra: pip install 'tkpbench[tb]')",
    )
    return p


def fit_kwargs(args: argparse.Namespace) -> dict:
    """The ``engine.fit`` options of a command built with ``fit_options`` and ``common_options``."""
    return {
        "resume": None if args.resume == "no" else args.resume,
        "force": args.force,
        "progress": not args.no_progress,
        "tensorboard": args.tensorboard,
    }


def parser(prog: str, doc: str | None, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=prog, description=doc, parents=[common_options(), *parents], formatter_class=argparse.RawDescriptionHelpFormatter
    )


def _debug(argv: Sequence[str] | None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get("TKPBENCH_DEBUG", "") not in ("", "0")


def guard(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a user error ends with one message and a non-zero exit code."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue (finished work is kept)", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if _debug(argv):
            traceback.print_exc()
        code = getattr(e, "exit_code", 2)  # a stop by a signal: 128 + its number
        print(f"{'interrupted' if code > 128 else 'error'}: {e}", file=sys.stderr)
        return code


def entry(run: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """A command's ``main(argv=None)``: ``run`` through ``guard``. Each stage module ends with
    ``main = cli.entry(_main)``."""

    def main(argv: Sequence[str] | None = None) -> int:
        return guard(run, argv)

    main.__doc__ = "The command; a user error ends with one message and a non-zero exit (tkpbench.cli.guard)."
    return main
