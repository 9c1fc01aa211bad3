"""The whole chain for one table, resumable stage by stage (what ``reproduce.sh`` runs).

    python -m tkpbench.pipeline voc        # Tables 1 and 2 (baselines/topk_pce.toml on VOC)
    python -m tkpbench.pipeline coco       # Table 3
    python -m tkpbench.pipeline ablation   # Table 4: avg, ViT-PCM max, top-K, top-K + PCE
    python -m tkpbench.pipeline sweep      # Fig. 4: k and eps sweeps (pseudo-mask mIoU)
    python -m tkpbench.pipeline demo       # everything on generated data, small models, CPU

    python -m tkpbench.pipeline ablation --seeds 0,1,2   # every variant with three training seeds

Stages: check data -> train -> pseudo masks -> CRF -> mask mIoU (Table 1) -> DeepLab train ->
DeepLab eval (Tables 2/3) -> report. Each stage runs as its own process on the requested config
(the file and every ``--set``). A finished stage is recognised by its DONE marker or record,
which carry the sha256 of the final.pt they came from and the settings they were made with
(``tkpbench.runs.STAGE_KEYS``): re-running the same command after a crash costs only the
unfinished stage; a changed ``pseudo.*``, ``crf.*`` or ``seg.*`` value redoes that stage and
every stage after it (the differing keys are printed). A finished run trained with another
config stops the chain with the fix. Missing data stops before any training. Ctrl-C or SIGTERM
reaches the running stage, which saves what it has; the pipeline exits non-zero and the same
command continues.

Seeds: ``--seeds 0,1,2`` runs the chain once per training seed, each in its own run folder
``<name>-s<seed>`` with its own record; re-running with more seeds reuses the finished ones.
Training, pseudo masks and DeepLab run under torchrun over all visible GPUs (one process on CPU).
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tkpbench import cli
from tkpbench.config import Config, diff_configs, load_config
from tkpbench.data.check import check_dataset
from tkpbench.data.synth import make_synthetic
from tkpbench.errors import Interrupted, UserError
from tkpbench.records import load_summary
from tkpbench.runs import (
    RunDir,
    chain_settings,
    claim_outputs,
    model_digest,
    read_marker,
    settings_diff,
    training_view,
    write_marker,
)

REPO = Path(__file__).resolve().parents[1]
BASELINES = REPO / "baselines"
SWEEP_K = [1, 2, 4, 6, 8, 12]
SWEEP_EPS = [0.75, 0.8, 0.85, 0.9, 0.95]
# default training seeds of each target (what one more seed costs: README, "Seeds")
DEFAULT_SEEDS = {"voc": [0], "coco": [0], "ablation": [0], "sweep": [0], "demo": [0, 1, 2]}


class PipelineError(UserError, RuntimeError):
    """A chain that cannot start or go on (the message names the stage and the fix)."""


class PipelineInterrupted(Interrupted, PipelineError):
    """A stage stopped by a signal after saving; the same command continues."""


def _stage(module: str, args: list[str], nproc: int, log) -> None:
    """Run one stage (``python -m <module> <args>``). With one process it runs in this process
    (its ``main``), which saves the 4-6 s of importing torch, timm and torchvision per stage (a
    third of a demo chain's time, measured); with several, under torchrun. A signal reaches the
    stage, which saves what it has; the pipeline then stops with 128 + the signal number."""
    shown = "python -m " if nproc == 1 else f"torchrun --standalone --nproc_per_node={nproc} -m "
    log("$ " + shown + " ".join([module, *args]))
    t0 = time.perf_counter()
    if nproc == 1:
        rc = _in_process(module, args)
    else:
        rc = _subprocess(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module, *args]
        )
    if rc > 128 or rc < 0:
        sig = rc - 128 if rc > 128 else -rc
        raise PipelineInterrupted(
            f"stopped by signal {sig} during: python -m {module} {' '.join(args)}\nWhat was "
            "finished is kept; run the same command again to continue.",
            sig,
        )
    if rc:
        raise PipelineError(
            f"stage failed (exit {rc}; its message is above): python -m {module} {' '.join(args)}\n"
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
    try:
        rc = importlib.import_module(module).main(args)
    finally:
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


def has_stage(results: Path, run: str, stage: str, model: str, settings: dict) -> bool:
    """Whether ``results/<run>/summary.json`` holds ``stage`` measured on the model ``model`` (a
    ``model_digest``) with these ``settings``: a record of another model or settings is redone."""
    try:
        rec = load_summary(results / run / "summary.json")["stages"].get(stage)
    except (ValueError, FileNotFoundError):
        return False
    return rec is not None and rec.get("model_sha256") == model and rec.get("settings") == settings


def check_same_config(cfg: Config, run: RunDir) -> None:
    """A finished run is reused only for the config it was trained with; otherwise stop and show the keys."""
    if not run.config.is_file():
        return
    diff = diff_configs(training_view(load_config(run.config).to_dict()), training_view(cfg.to_dict()))
    if diff:
        raise PipelineError(
            f"{run.final} was trained with another config (trained -> requested):\n  "
            + "\n  ".join(diff)
            + f"\nFix: give this config its own run (--set name=...), or remove {run.root} to train it again"
        )


def stage_done(marker: Path, model: str, settings: dict, log) -> bool:
    """Whether a stage's DONE marker exists for ``model`` and ``settings``. A marker of another
    model or other settings is removed (the stage's own files are replaced when it runs again)."""
    have = read_marker(marker)
    if have is None:
        return False
    if have.get("model_sha256") == model and have.get("settings") == settings:
        return True
    why = ([f"final.pt: {have.get('model_sha256')} -> {model}"] if have.get("model_sha256") != model else []) + settings_diff(
        have.get("settings") or {}, settings
    )
    log(f"[redo] {marker.name}: made with other settings ({'; '.join(why)})")
    marker.unlink(missing_ok=True)
    return False


def check_data(cfg: Config, log) -> None:
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
        raise PipelineError("data check failed; nothing was started:\n" + "\n".join(lines))
    log("\n".join(lines))


def run_chain(cfg_path: Path, overrides: list[str], runs: Path, results: Path, nproc: int, seg: bool = True, log=print) -> str:
    """All stages for one config. Returns the run name."""
    cfg = load_config(cfg_path, overrides)
    name = cfg.name
    run = RunDir(runs / name)
    check_data(cfg, log)
    conf = ["--config", str(cfg_path), *[x for ov in overrides for x in ("--set", ov)]]
    common = ["--no-progress"] if not sys.stdout.isatty() else []
    if not run.final.is_file():
        _stage("tkpbench.train", [*conf, "--runs", str(runs), *common], nproc, log)
    else:
        check_same_config(cfg, run)
        log(f"[skip] train: {run.final} exists")
    model = model_digest(run.final)
    pseudo_set, crf_set = chain_settings("pseudo", cfg), chain_settings("crf", cfg)
    splits = list(dict.fromkeys([cfg.data.seg_train_split if seg else cfg.data.mask_split, cfg.data.mask_split]))
    for split in splits:
        marker = run.marker("pseudo", split)
        if not stage_done(marker, model, pseudo_set, log):
            run.marker("crf", split).unlink(missing_ok=True)
            _stage("tkpbench.pseudo", ["--run", str(run.root), "--split", split, *conf, *common], nproc, log)
            write_marker(marker, model, pseudo_set, split=split, time=time.time())
        else:
            log(f"[skip] pseudo masks {split}")
        marker = run.marker("crf", split)
        if not stage_done(marker, model, crf_set, log):
            _stage("tkpbench.refine", ["--run", str(run.root), "--split", split, *conf, *common], 1, log)
            write_marker(marker, model, crf_set, split=split, time=time.time())
        else:
            log(f"[skip] CRF {split}")
    if not has_stage(results, name, "mask", model, crf_set):
        _stage("tkpbench.evaluate", ["--run", str(run.root), "--results", str(results), *conf], 1, log)
    else:
        log(f"[skip] mask mIoU: recorded for this final.pt in {results / name / 'summary.json'}")
    if seg:
        seg_set = chain_settings("seg", cfg)
        if run.seg.final.is_file() and stage_done(run.marker("seg"), model, seg_set, log):
            log("[skip] DeepLab train")
        else:
            # a DeepLab folder (finished or partial) trained on other pseudo masks or settings is removed;
            # a partial one of the same model and settings resumes
            stale = claim_outputs(run.root, model, seg_set, ("seg",))
            if stale:
                log(f"[redo] DeepLab: removed {run.seg.root} ({'; '.join(stale)})")
            _stage("tkpbench.segment", ["train", "--run", str(run.root), *conf, *common], nproc, log)
            write_marker(run.marker("seg"), model, seg_set, time=time.time())
        eval_set = chain_settings("seg_eval", cfg)
        if not has_stage(results, name, "seg", model_digest(run.seg.final), eval_set):
            _stage("tkpbench.segment", ["eval", "--run", str(run.root), "--results", str(results), *conf, *common], nproc, log)
        else:
            log("[skip] DeepLab eval")
    return name


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


def _main(argv: list[str] | None = None) -> int:
    p = cli.parser("tkpbench reproduce", __doc__)
    p.add_argument("target", choices=["voc", "coco", "ablation", "sweep", "demo"])
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
    p.add_argument("--nproc", type=int, default=None, help="processes (default: number of GPUs, or 1)")
    p.add_argument("--demo-data", type=Path, default=Path("data/demo"))
    args = p.parse_args(argv)
    nproc = args.nproc or max(torch.cuda.device_count(), 1)
    seeds = parse_seeds(args.seeds, args.target)
    ov = args.overrides
    t0 = time.perf_counter()
    seg = True
    if args.target == "demo":
        if not (args.demo_data / "SYNTHETIC.json").is_file():
            print(f"generating demo data in {args.demo_data}")
            make_synthetic(args.demo_data, n=200, seed=0)
        demo_cfg = REPO / "configs" / "demo.toml"
        root = ["data.root=" + str(args.demo_data / "VOC2012")]
        chains = [(demo_cfg, root + ov), (demo_cfg, root + ["name=demo_max", "model.pooling=max", "model.pce=false"] + ov)]
        nproc = 1
    elif args.target == "voc":
        # TKP-PCL and ViT-PCM as published (the ViT-PCM row of Tables 1-2 is measured from vit_pcm.toml only)
        chains = [(BASELINES / f"{name}.toml", ["data.dataset=voc"] + ov) for name in ("topk_pce", "vit_pcm")]
    elif args.target == "coco":
        coco = [
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
        chains = [(BASELINES / f"{name}.toml", coco + [f"name=coco_{name}"] + ov) for name in ("topk_pce", "vit_pcm")]
    elif args.target == "ablation":
        chains = [(BASELINES / f"{name}.toml", ov) for name in ("avg", "vit_pcm_max", "topk", "topk_pce")]
    else:
        cfg_dir = args.runs / "sweep_configs"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        chains = [(c, ov) for c in sweep_configs(BASELINES / "topk_pce.toml", cfg_dir)]
        seg = False
    for path, chain_ov in seeded(chains, seeds, single_name=args.target != "demo"):
        run_chain(path, chain_ov, args.runs, args.results, nproc, seg=seg)
    _stage("tkpbench.report", [str(args.results), "--runs", str(args.runs)], 1, lambda *_: None)
    print(f"{args.target}: finished in {time.perf_counter() - t0:.0f} s")
    return 0


main = cli.entry(_main)


if __name__ == "__main__":
    sys.exit(main())
