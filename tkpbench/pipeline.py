"""The whole chain for one table, resumable stage by stage (what ``reproduce.sh`` runs).

    python -m tkpbench.pipeline voc        # Tables 1 and 2 (baselines/topk_pce.toml on VOC)
    python -m tkpbench.pipeline coco       # Table 3
    python -m tkpbench.pipeline ablation   # Table 4: avg, ViT-PCM max, top-K, top-K + PCE
    python -m tkpbench.pipeline sweep      # Fig. 4: k and eps sweeps (pseudo-mask mIoU)
    python -m tkpbench.pipeline demo       # everything on generated data, small models, CPU

    python -m tkpbench.pipeline ablation --seeds 0,1,2   # every variant with three training seeds

Stages: check data and device, plan -> train -> pseudo masks -> CRF -> mask mIoU (Table 1) ->
DeepLab train -> DeepLab eval (Tables 2/3) -> report; the loop runs ``config.STAGES`` in order.
Each stage runs as its own command on the requested config (the file and every ``--set``) and,
when it finishes, writes its own DONE marker or record (the same when a person runs it by
hand), which names the sha256 of the final.pt it came from and the values of the config keys
declared to change it and the stages it reads (``tkpbench.config.key``, ``runs.chain_settings``).
Re-running the same command after a crash costs only the unfinished stage; a changed value
redoes that stage and every stage after it (the differing keys are printed). A finished run
trained with another config stops the chain with the fix. Missing data, a real run without a
usable GPU, or a global batch that no process count keeps stop before anything runs. Ctrl-C or
SIGTERM reaches the running stage, which saves what it has; the pipeline exits non-zero and the
same command continues.

Processes: every stage of every chain is planned before the first starts (``tkpbench.plan``):
a stage with a global batch takes the largest process count, at most the GPUs (or ``--nproc``),
that keeps it exactly; the plan is printed and written to ``runs/<name>/plan.json``.

Seeds: ``--seeds 0,1,2`` runs the chain once per training seed, each in its own run folder
``<name>-s<seed>`` with its own record; re-running with more seeds reuses the finished ones.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from tkpbench import cli
from tkpbench.config import STAGES, Config, diff_configs, load_config
from tkpbench.data.check import check_dataset
from tkpbench.data.synth import make_synthetic
from tkpbench.device import resolve as resolve_device
from tkpbench.errors import Interrupted, UserError
from tkpbench.io import atomic_write_json
from tkpbench.plan import StagePlan, chain_plan, format_plan
from tkpbench.records import drop_stages, load_summary
from tkpbench.runs import (
    SELECTIONS,
    ResultsDir,
    RunDir,
    chain_settings,
    marker_mismatch,
    mask_stage,
    model_digest,
    training_view,
    weights_groups,
)

REPO = Path(__file__).resolve().parents[1]


def _shipped(name: str) -> Path:
    """``baselines/`` or ``configs/``: in the source tree, else as installed with the package
    (``pip install .`` ships them as ``tkpbench.baselines`` and ``tkpbench.configs``, siblings as
    in the tree, so ``base = "../baselines/..."`` keeps working)."""
    if (REPO / name).is_dir():
        return REPO / name
    spec = importlib.util.find_spec(f"tkpbench.{name}")  # a folder of data files: a namespace package
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(
            f"the target configs ({name}/*.toml) are neither beside {REPO / 'tkpbench'} nor installed with the package. "
            "Fix: run from a clone of the repository (pip install -e .), or reinstall with pip install ."
        )
    return Path(list(spec.submodule_search_locations)[0])


SWEEP_K = [1, 2, 4, 6, 8, 12]
SWEEP_EPS = [0.75, 0.8, 0.85, 0.9, 0.95]
# default training seeds of each target (what one more seed costs: README, "Seeds")
DEFAULT_SEEDS = {"voc": [0], "coco": [0], "ablation": [0], "sweep": [0], "demo": [0, 1, 2]}
TARGETS = tuple(DEFAULT_SEEDS)
# the coco target's overrides of the VOC configs
COCO = [
    "data.root=data/coco",
    "data.dataset=coco",
    "model.num_classes=81",
    "data.train_split=train2014",
    "data.val_split=val2014",
    "data.mask_split=train2014",
    "data.seg_train_split=train2014",
    # the WSSS convention for DeepLab-v2 on COCO: 100k iterations at batch 10, as deeplab-pytorch's
    # configs/cocostuff164k.yaml (ITER_MAX 100000, batch 5 x ITER_SIZE 2)
    "seg.iters=100000",
]


class PipelineError(UserError, RuntimeError):
    """A chain that cannot start or go on (the message names the stage and the fix)."""


class PipelineInterrupted(Interrupted, PipelineError):
    """A stage stopped by a signal after saving; the same command continues."""


def _stage(module: str, args: list[str], nproc: int, log) -> None:
    """Run one stage (``python -m <module> <args>``). On a machine without a GPU and with one
    process it runs in this process (its ``main``), which saves the 4-6 s of importing torch, timm
    and torchvision per stage (a third of a demo chain's time, measured). Otherwise it is a child
    process, under torchrun with several, so that this process never holds a CUDA context while
    the stages use the GPUs. A signal reaches the stage, which saves what it has; the pipeline then
    stops with 128 + the signal number."""
    shown = "python -m " if nproc == 1 else f"torchrun --standalone --nproc_per_node={nproc} -m "
    log("$ " + shown + " ".join([module, *args]))
    t0 = time.perf_counter()
    if nproc == 1 and not torch.cuda.is_available():
        rc = _in_process(module, args)
    elif nproc == 1:
        rc = _subprocess([sys.executable, "-m", module, *args])
    else:
        rc = _subprocess(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module, *args]
        )
    if rc > 128 or rc < 0:
        sig = rc - 128 if rc > 128 else -rc
        raise PipelineInterrupted(
            f"stopped by signal {sig} during: {shown}{module} {' '.join(args)}\nWhat was "
            "finished is kept; run the same command again to continue.",
            sig,
        )
    if rc:
        raise PipelineError(
            f"stage failed (exit {rc}; its message is above): {shown}{module} {' '.join(args)}\n"
            "Fix what it says, then run the same command again to continue from here."
        )
    log(f"  done in {time.perf_counter() - t0:.1f} s")


def _in_process(module: str, args: list[str]) -> int:
    """The stage's own ``main`` (which ends every error with a message and an exit code).
    SIGTERM becomes a KeyboardInterrupt, as SIGINT is, so every stage stops the same way."""
    got: list[int] = []

    def term(signum, frame):
        got.append(signum)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, term)
    stage = importlib.import_module(module)
    argv, sys.argv = sys.argv, [stage.__file__, *args]  # its records name the stage's own command
    try:
        rc = stage.main(args)
    finally:
        sys.argv = argv
        signal.signal(signal.SIGTERM, old)
    return 128 + signal.SIGTERM if got and rc == 130 else rc


def _subprocess(cmd: list[str]) -> int:
    """SIGINT/SIGTERM sent to the pipeline are passed on to the stage's processes."""
    proc = subprocess.Popen(cmd, cwd=os.getcwd())
    got: list[int] = []

    def forward(signum, frame) -> None:
        got.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 128 + got[0] if got and rc else rc


def has_stage(results: ResultsDir, run: str, stage: str, model: str, settings: dict) -> bool:
    """Whether ``results/<run>/summary.json`` holds ``stage`` measured on the model ``model`` (a
    ``model_digest``) with these ``settings``: a record of another model or settings is redone."""
    try:
        rec = load_summary(results.summary(run))["stages"].get(stage)
    except (ValueError, FileNotFoundError):
        return False
    return rec is not None and rec.get("model_sha256") == model and rec.get("settings") == settings


def check_same_config(cfg: Config, run: RunDir) -> None:
    """A finished run is reused only for the config it was trained with; otherwise stop and show the keys."""
    if not run.config.is_file():
        return
    diff = diff_configs(training_view(load_config(run.config)), training_view(cfg))
    if diff:
        raise PipelineError(
            f"{run.final} was trained with another config (trained -> requested):\n  "
            + "\n  ".join(diff)
            + f"\nFix: give this config its own run (--set name=...), or remove {run.root} to train it again"
        )


def check_data(cfg: Config) -> list[str]:
    """The data check's lines; raises PipelineError (nothing started) when something is missing."""
    splits = sorted({cfg.data.train_split, cfg.data.val_split, cfg.data.mask_split, cfg.data.seg_train_split})
    ok, lines = check_dataset(cfg.data.dataset, cfg.data.root, splits)
    for what, key, path in (
        ("encoder", "model.weights", cfg.model.weights),
        ("DeepLab backbone", "seg.weights", cfg.seg.weights),
    ):
        if not path and not cfg.synthetic:
            ok = False
            lines.append(
                f"  {what} weights: {key} is empty, which would train from random init; the paper starts "
                f"from ImageNet weights. Fix: python -m tkpbench.data download weights --root weights"
            )
        if path and not Path(path).is_file():
            ok = False
            lines.append(f"  {what} weights {path}: MISSING. Fix: python -m tkpbench.data download weights --root weights")
    if not ok:
        raise PipelineError(f"data check of {cfg.name} failed; nothing was started:\n" + "\n".join(lines))
    return lines


@dataclass
class Step:
    """One stage of a chain: a declared stage (``config.STAGES``), the command that runs it, and
    how to tell that its outputs are there for this final.pt and these settings."""

    stage: str
    what: str
    module: str
    args: list[str]
    done: Callable[[], bool]


@dataclass
class Chain:
    """One config's chain: its resolved config, how it is passed to every stage, and its plan."""

    cfg: Config
    conf: list[str]  # --config FILE --set ... (what every stage is given)
    run: RunDir
    seg: bool
    plan: dict[str, StagePlan] = field(default_factory=dict)

    @property
    def stages(self) -> list[str]:
        return [s for s in STAGES if self.seg or s not in ("seg", "seg_eval")]

    def splits(self) -> list[str]:
        d = self.cfg.data
        return list(dict.fromkeys([d.seg_train_split if self.seg else d.mask_split, d.mask_split]))


def marked(run: RunDir, stage: str, cfg: Config, split: str | None, log) -> bool:
    """Whether ``stage``'s own marker says it is done for this final.pt and these settings."""
    why = marker_mismatch(run, stage, cfg, split)
    if why:
        log(f"[redo] {run.marker(stage, split).name}: made with other settings ({'; '.join(why)})")
    return why is None


def steps(chain: Chain, results: ResultsDir, common: list[str], log) -> list[Step]:
    """The chain's stages in order. Each ``done`` is asked only when its turn comes (after the
    stages before it ran), so final.pt's digest is read once it exists."""
    cfg, run, name = chain.cfg, chain.run, chain.cfg.name
    conf, rd = chain.conf, ["--run-dir", str(run.root)]

    def trained() -> bool:
        if run.final.is_file():
            check_same_config(cfg, run)
            return True
        return False

    out = [Step("train", "train", "tkpbench.train", [*conf, "--runs", str(run.root.parent), *common], trained)]
    for split in chain.splits():
        for stage, what, module in (("pseudo", "pseudo masks", "tkpbench.pseudo"), ("crf", "CRF", "tkpbench.refine")):
            out.append(
                Step(
                    stage,
                    f"{what} {split}",
                    module,
                    [*rd, "--split", split, *conf, *common],
                    functools.partial(marked, run, stage, cfg, split, log),
                )
            )
    out.append(
        Step(
            "mask",
            "mask mIoU (Table 1)",
            "tkpbench.evaluate",
            [*rd, "--results", str(results.root), *conf, *common],
            lambda: has_stage(results, name, "mask", model_digest(run.final), chain_settings("mask", cfg)),
        )
    )
    out += selection_steps(chain, results, common, log)
    if chain.seg:
        out.append(
            Step(
                "seg",
                "DeepLab train",
                "tkpbench.segment",
                ["train", *rd, *conf, *common],
                lambda: run.seg.final.is_file() and marked(run, "seg", cfg, None, log),
            )
        )
        out.append(
            Step(
                "seg_eval",
                "DeepLab eval",
                "tkpbench.segment",
                ["eval", *rd, "--results", str(results.root), *conf, *common],
                lambda: has_stage(results, name, "seg", model_digest(run.seg.final), chain_settings("seg_eval", cfg)),
            )
        )
    return out


def selection_steps(chain: Chain, results: ResultsDir, common: list[str], log) -> list[Step]:
    """Table 1's pseudo masks, CRF and mask mIoU of every other checkpoint selection (last.pt,
    best.pt, best_f1.pt) on data.mask_split, each in its own ``pseudo/<selection>/`` and record
    ``mask@<selection>``. A selection whose file is absent (no evaluations: no best files), or
    holds the weights of final.pt or of an earlier selection (``runs.weights_groups``), is skipped:
    the record of those weights names it (``protocol.selections``)."""
    cfg, name, split = chain.cfg, chain.cfg.name, chain.cfg.data.mask_split
    out = []
    for sel in SELECTIONS[1:]:
        run = RunDir(chain.run.root, sel)
        args = [*common, "--run-dir", str(run.root), "--selection", sel, *chain.conf]

        def scored(sel: str = sel) -> bool:  # its file exists and holds weights of its own
            return RunDir(chain.run.root).weights(sel).is_file() and sel in weights_groups(RunDir(chain.run.root))

        for stage, what, module in (("pseudo", "pseudo masks", "tkpbench.pseudo"), ("crf", "CRF", "tkpbench.refine")):
            done = functools.partial(marked, run, stage, cfg, split, log)
            out.append(
                Step(
                    stage,
                    f"{what} {split} ({sel})",
                    module,
                    ["--split", split, *args],
                    lambda scored=scored, done=done: not scored() or done(),
                )
            )
        record = functools.partial(has_stage, results, name, mask_stage(sel))
        out.append(
            Step(
                "mask",
                f"mask mIoU ({sel})",
                "tkpbench.evaluate",
                ["--results", str(results.root), *args],
                lambda scored=scored, run=run, record=record: (
                    not scored() or record(model_digest(run.weights()), chain_settings("mask", cfg))
                ),
            )
        )
    return out


def _relative(path: Path) -> str:
    """``path`` as the stages are given it (configs, runs, results): relative to the current folder
    when it lies inside it, so the commands that records keep do not name the folder they ran in."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def prepare(cfg_path: Path, overrides: list[str], runs: Path, slots: int, seg: bool, device: str | None, log=print) -> Chain:
    """Load, check the data and the device, and plan one chain; nothing runs yet."""
    cfg = load_config(cfg_path, overrides)
    log("\n".join(check_data(cfg)))
    resolve_device(device, cfg.synthetic)  # a real run without a usable GPU stops here, with the reason
    conf = ["--config", _relative(cfg_path), *[x for ov in overrides for x in ("--set", ov)]]
    chain = Chain(cfg, conf, RunDir(Path(_relative(runs)) / cfg.name), seg)
    chain.plan = chain_plan(cfg, slots, chain.stages)
    return chain


def run_planned(chain: Chain, results: ResultsDir, device: str | None = None, log=print) -> str:
    """All stages of one planned chain, each skipped when its outputs are there. Returns the run name."""
    atomic_write_json(chain.run.root / "plan.json", {s: p.to_dict() for s, p in chain.plan.items()})
    common = (["--no-progress"] if not sys.stdout.isatty() else []) + (["--device", device] if device else [])
    for step in steps(chain, results, common, log):
        if step.done():
            log(f"[skip] {step.what}")
            continue
        _stage(step.module, step.args, chain.plan[step.stage].nproc, log)
    drop_stale_selections(chain, results, log)
    return chain.cfg.name


def drop_stale_selections(chain: Chain, results: ResultsDir, log=print) -> None:
    """Drop the ``mask@<selection>`` records that no longer describe this run's weights: the
    selection's file is gone, now holds final.pt's (or an earlier selection's) weights, which the
    "mask" record then names, or other weights than the record measured (records committed from
    another machine, where the best epoch was another). Left in place, they would sit beside the
    run's own records in summary.json, measured on weights that no longer exist."""
    path = results.summary(chain.cfg.name)
    if not path.is_file():
        return
    run = RunDir(chain.run.root)
    leads = weights_groups(run)
    stale = []
    for stage, rec in load_summary(path)["stages"].items():
        head, _, sel = stage.partition("@")
        if head == "mask" and sel and (sel not in leads or rec.get("model_sha256") != model_digest(run.weights(sel))):
            stale.append(stage)
    if stale:
        log(f"[drop] {', '.join(stale)} of {chain.cfg.name}: measured other weights than this run's selections hold now")
        drop_stages(results.root, chain.cfg.name, stale)


def run_chain(
    cfg_path: Path,
    overrides: list[str],
    runs: Path,
    results: Path,
    slots: int,
    seg: bool = True,
    device: str | None = None,
    log=print,
) -> str:
    """Check, plan and run one chain (``prepare`` + ``run_planned``). Returns the run name."""
    chain = prepare(cfg_path, overrides, runs, slots, seg, device, log)
    log(format_plan(chain.cfg.name, chain.plan))
    return run_planned(chain, ResultsDir(Path(_relative(results))), device, log)


def sweep_configs(base: Path, out_dir: Path) -> list[Path]:
    """One config per k (top-K + PCE) and per eps, written beside the runs."""
    out = []
    for k in SWEEP_K:
        p = out_dir / f"sweep_k{k}.toml"
        p.write_text(f'base = "{base.resolve()}"\nname = "sweep_k{k}"\n[model]\nk = {k}\n')
        out.append(p)
    for e in SWEEP_EPS:
        p = out_dir / f"sweep_eps{e}.toml"
        p.write_text(f'base = "{base.resolve()}"\nname = "sweep_eps{e}"\n[model]\neps = {e}\n')
        out.append(p)
    return out


def seeded(chains: list[tuple[Path, list[str]]], seeds: list[int], single_name: bool) -> list[tuple[Path, list[str]]]:
    """Each chain once per seed: ``train.seed=S`` and the run ``<name>-s<S>``. ``single_name``: a
    target run with only seed 0 keeps its plain name (the runs of earlier versions stay valid)."""
    out = []
    for path, ov in chains:
        if single_name and seeds == [0]:
            out.append((path, ov))
            continue
        base = load_config(path, ov).name
        out += [(path, [*ov, f"train.seed={s}", f"name={base}-s{s}"]) for s in seeds]
    return out


def parse_seeds(text: str | None, target: str) -> list[int]:
    if not text:
        return list(DEFAULT_SEEDS[target])
    try:
        seeds = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise PipelineError(f"--seeds {text!r}: expected comma-separated whole numbers, e.g. --seeds 0,1,2") from None
    if not seeds or min(seeds) < 0:
        raise PipelineError(f"--seeds {text!r}: give at least one seed >= 0, e.g. --seeds 0,1,2")
    return seeds


def target_chains(target: str, ov: list[str], runs: Path, demo_data: Path) -> tuple[list[tuple[Path, list[str]]], bool]:
    """The (config file, overrides) of each chain of ``target`` before seeds, and whether the
    chains go on to DeepLab. The one place that says what a target runs (the benchmarks read it too)."""
    baselines = _shipped("baselines")
    if target == "demo":
        if not (demo_data / "SYNTHETIC.json").is_file():
            print(f"generating demo data in {demo_data}")
            make_synthetic(demo_data, n=200, seed=0)
        demo_cfg = _shipped("configs") / "demo.toml"
        root = ["data.root=" + str(demo_data / "VOC2012")]
        return [(demo_cfg, root + ov), (demo_cfg, root + ["name=demo_max", "model.pooling=max", "model.pce=false"] + ov)], True
    if target == "voc":
        # TKP-PCL and ViT-PCM as published (the ViT-PCM row of Tables 1-2 is measured from vit_pcm.toml only)
        return [(baselines / f"{name}.toml", ["data.dataset=voc"] + ov) for name in ("topk_pce", "vit_pcm")], True
    if target == "coco":
        return [(baselines / f"{name}.toml", COCO + [f"name=coco_{name}"] + ov) for name in ("topk_pce", "vit_pcm")], True
    if target == "ablation":
        return [(baselines / f"{name}.toml", ov) for name in ("avg", "vit_pcm_max", "topk", "topk_pce")], True
    cfg_dir = runs / "sweep_configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    return [(c, ov) for c in sweep_configs(baselines / "topk_pce.toml", cfg_dir)], False


def _main(argv: list[str] | None = None) -> int:
    p = cli.parser("tkpbench reproduce", __doc__)
    p.add_argument("target", choices=TARGETS)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="config override for every run, e.g. --set data.root=/data/VOCdevkit/VOC2012",
    )
    p.add_argument(
        "--seeds",
        default=os.environ.get("SEEDS") or None,
        help="training seeds, e.g. 0,1,2 (default per target: "
        + ", ".join(f"{k} {','.join(map(str, v))}" for k, v in DEFAULT_SEEDS.items())
        + "; env SEEDS)",
    )
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="processes at most per stage (default: the number of GPUs, or 1); each stage takes the largest "
        "count that keeps its global batch (the plan printed at the start)",
    )
    p.add_argument("--demo-data", type=Path, default=Path("data/demo"))
    args = p.parse_args(argv)
    if args.nproc is not None and args.nproc < 1:
        raise PipelineError(f"--nproc {args.nproc}: give a number of processes >= 1")
    slots = args.nproc or max(torch.cuda.device_count(), 1)
    seeds = parse_seeds(args.seeds, args.target)
    ov = args.overrides
    t0 = time.perf_counter()
    if args.target == "demo":
        slots = args.nproc or 1
    chains, seg = target_chains(args.target, ov, args.runs, args.demo_data)
    # every chain is checked and planned before the first stage of the first one starts
    planned = [
        prepare(path, chain_ov, args.runs, slots, seg, args.device)
        for path, chain_ov in seeded(chains, seeds, args.target != "demo")
    ]
    for chain in planned:
        print(format_plan(chain.cfg.name, chain.plan))
    results = ResultsDir(Path(_relative(args.results)))
    for chain in planned:
        run_planned(chain, results, args.device)
    _stage("tkpbench.report", [str(args.results), "--runs", str(args.runs)], 1, lambda *_: None)
    print(f"{args.target}: finished in {time.perf_counter() - t0:.0f} s")
    if args.target == "demo":
        demo_learned(results, [c.cfg.name for c in planned])
    return 0


DEMO_MARGIN = 25.0


def demo_learned(results: ResultsDir, names: list[str]) -> None:
    """The demo's self-check: every run's pseudo masks after the CRF must lie more than
    ``DEMO_MARGIN`` points above predicting background everywhere (the demo's seeds reach 30-60
    above it), so that a demo that stopped learning on some seed fails instead of averaging a
    broken seed into its table. The tests train seed 0 of the demo; this checks every seed."""
    failed = []
    for name in names:
        rec = load_summary(results.summary(name))["stages"]["mask"]
        if not rec["miou_crf"] > rec["miou_all_background"] + DEMO_MARGIN:
            failed.append(f"{name} ({rec['miou_crf']:.1f} after the CRF, all-background {rec['miou_all_background']:.1f})")
    if failed:
        raise PipelineError(
            f"the demo did not learn: pseudo masks within {DEMO_MARGIN:.0f} points of all-background for "
            + ", ".join(failed)
            + f"; their records are in {results.root}; this is a defect of the code or of this machine's "
            "numerics: please report it with those records"
        )


main = cli.entry(_main)


if __name__ == "__main__":
    sys.exit(main())
