"""The whole chain for one table, resumable stage by stage (what ``reproduce.sh`` runs).

    python -m tkpbench.pipeline voc        # Tables 1 and 2 (baselines/topk_pce.toml on VOC)
    python -m tkpbench.pipeline coco       # Table 3
    python -m tkpbench.pipeline ablation   # Table 4: avg, ViT-PCM max, top-K, top-K + PCE
    python -m tkpbench.pipeline sweep      # Fig. 4: k and eps sweeps (pseudo-mask mIoU)
    python -m tkpbench.pipeline demo       # everything on generated data, small models, CPU

Stages: check data -> train -> pseudo masks -> CRF -> mask mIoU (Table 1) -> DeepLab train ->
DeepLab eval (Tables 2/3) -> report. A finished stage is recognised by its output (final.pt, a
DONE marker, a record in results/<run>/summary.json) and skipped, so re-running the same command
after a crash costs only the unfinished stage. Markers and records carry the sha256 of the
final.pt they came from: a record of another model is measured again; a finished run trained with
another config, or a marker of another model, stops the chain with the fix. Missing data stops
before any training.
Training, pseudo masks and DeepLab run under torchrun over all visible GPUs (one process on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tkpbench.config import Config, diff_configs, load_config
from tkpbench.io import atomic_write_json
from tkpbench.records import load_summary, model_digest

REPO = Path(__file__).resolve().parents[1]
BASELINES = REPO / "baselines"
SWEEP_K = [1, 2, 4, 6, 8, 12]
SWEEP_EPS = [0.75, 0.8, 0.85, 0.9, 0.95]


class PipelineError(RuntimeError):
    pass


def _launcher(nproc: int) -> list[str]:
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
    return [sys.executable, "-m"]


def _run(cmd: list[str], log) -> None:
    log("$ " + " ".join(cmd))
    r = subprocess.run(cmd, cwd=os.getcwd())
    if r.returncode:
        raise PipelineError(f"stage failed (exit {r.returncode}): {' '.join(cmd)}\nRe-run the same command to continue from here.")


def has_stage(results: Path, run: str, stage: str, model: str) -> bool:
    """Whether ``results/<run>/summary.json`` holds ``stage`` measured on the model whose
    ``model_digest`` is ``model``: a record of another model (retrained, or committed from elsewhere) is redone."""
    path = results / run / "summary.json"
    try:
        rec = load_summary(path)["stages"].get(stage)
    except (ValueError, FileNotFoundError):
        return False
    return rec is not None and rec.get("model_sha256") == model


def check_same_config(cfg: Config, run_dir: Path) -> None:
    """A finished run is reused only for the config it was trained with (the keys a resume must
    match); otherwise stop and show the differing keys."""
    from tkpbench.train import TKPTask

    trained = run_dir / "config.toml"
    if not trained.is_file():
        return
    task = TKPTask(cfg)
    diff = diff_configs(task.resume_view(load_config(trained).to_dict()), task.resume_view(cfg.to_dict()))
    if diff:
        raise PipelineError(
            f"{run_dir}/final.pt was trained with another config (trained -> requested):\n  " + "\n  ".join(diff)
            + f"\nFix: give this config its own run (--set name=...), or remove {run_dir} to train it again")


def stage_done(marker: Path, model: str) -> bool:
    """Whether a stage's DONE marker exists for the model ``model`` (a ``model_digest``). A marker made
    from another final.pt stops the chain: what follows it would mix two models."""
    if not marker.is_file():
        return False
    made_from = json.loads(marker.read_text()).get("model_sha256")
    if made_from not in (None, model):  # None: written before markers carried digests
        run_dir = marker.parents[1]
        raise PipelineError(
            f"{marker} was made from another {run_dir}/final.pt (sha256 {made_from}, now {model}): its pseudo "
            f"masks, CRF masks and DeepLab model are stale. Fix: remove {run_dir}/pseudo and {run_dir}/seg, "
            "then run the same command again")
    return True


def check_data(cfg: Config, log) -> None:
    from tkpbench.data.check import check_dataset

    splits = sorted({cfg.data.train_split, cfg.data.val_split, cfg.data.mask_split, cfg.data.seg_train_split})
    ok, lines = check_dataset(cfg.data.dataset, cfg.data.root, splits)
    for what, key, path in (("encoder", "model.weights", cfg.model.weights),
                            ("DeepLab backbone", "seg.weights", cfg.seg.weights)):
        if not path and not cfg.synthetic:
            ok = False
            lines.append(f"  {what} weights: {key} is empty, which would train from random init; the paper starts "
                         f"from ImageNet weights. Fix: python -m tkpbench.data download weights --root weights")
        if path and not Path(path).is_file():
            ok = False
            lines.append(f"  {what} weights {path}: MISSING. Fix: python -m tkpbench.data download weights --root weights")
    if not ok:
        raise PipelineError("data check failed; nothing was started:\n" + "\n".join(lines))
    log("\n".join(lines))


def run_chain(cfg_path: Path, overrides: list[str], runs: Path, results: Path, nproc: int, seg: bool = True,
              log=print) -> str:
    """All stages for one config. Returns the run name."""
    cfg = load_config(cfg_path, overrides)
    name = cfg.name
    run_dir = runs / name
    check_data(cfg, log)
    sets = [x for ov in overrides for x in ("--set", ov)]
    common = ["--no-progress"] if not sys.stdout.isatty() else []
    if not (run_dir / "final.pt").is_file():
        _run(_launcher(nproc) + ["tkpbench.train", "--config", str(cfg_path), *sets, "--runs", str(runs), *common], log)
    else:
        check_same_config(cfg, run_dir)
        log(f"[skip] train: {run_dir}/final.pt exists")
    model = model_digest(run_dir / "final.pt")
    splits = list(dict.fromkeys([cfg.data.seg_train_split if seg else cfg.data.mask_split, cfg.data.mask_split]))
    for split in splits:
        marker = run_dir / "pseudo" / f"DONE_pseudo_{split}.json"
        if not stage_done(marker, model):
            _run(_launcher(nproc) + ["tkpbench.pseudo", "--run", str(run_dir), "--split", split, *common], log)
            atomic_write_json(marker, {"split": split, "time": time.time(), "model_sha256": model})
        else:
            log(f"[skip] pseudo masks {split}")
        marker = run_dir / "pseudo" / f"DONE_crf_{split}.json"
        if not stage_done(marker, model):
            _run([sys.executable, "-m", "tkpbench.crf", "--run", str(run_dir), "--split", split, *common], log)
            atomic_write_json(marker, {"split": split, "time": time.time(), "model_sha256": model})
        else:
            log(f"[skip] CRF {split}")
    if not has_stage(results, name, "mask", model):
        from tkpbench.evaluate import score_pseudo_masks
        from tkpbench.pseudo import run_config

        r = score_pseudo_masks(run_dir, run_config(run_dir), results)
        log(f"pseudo masks on {cfg.data.mask_split}: mIoU {100 * r['miou']:.2f} (before CRF), {100 * r['miou_crf']:.2f} (after CRF)")
    else:
        log(f"[skip] mask mIoU: recorded for this final.pt in {results / name / 'summary.json'}")
    if seg:
        seg_final = run_dir / "seg" / "final.pt"
        marker = run_dir / "seg" / "DONE_seg_train.json"  # model: the TKP-PCL run whose pseudo masks it learned
        # a final.pt without a marker was trained before markers existed: kept
        if seg_final.is_file() and (not marker.is_file() or stage_done(marker, model)):
            log("[skip] DeepLab train")
        else:
            _run(_launcher(nproc) + ["tkpbench.segment", "train", "--run", str(run_dir), *common], log)
            atomic_write_json(marker, {"time": time.time(), "model_sha256": model})
        if not has_stage(results, name, "seg", model_digest(seg_final)):
            _run(_launcher(nproc) + ["tkpbench.segment", "eval", "--run", str(run_dir), "--results", str(results), *common], log)
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


def nproc_default() -> int:
    import torch

    return max(torch.cuda.device_count(), 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tkpbench.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", choices=["voc", "coco", "ablation", "sweep", "demo"])
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override for every run, e.g. --set data.root=/data/VOCdevkit/VOC2012")
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--nproc", type=int, default=None, help="processes (default: number of GPUs, or 1)")
    p.add_argument("--demo-data", type=Path, default=Path("data/demo"))
    args = p.parse_args(argv)
    nproc = args.nproc or nproc_default()
    ov = args.overrides
    t0 = time.perf_counter()
    try:
        if args.target == "demo":
            if not (args.demo_data / "SYNTHETIC.json").is_file():
                from tkpbench.data.synth import make_synthetic

                print(f"generating demo data in {args.demo_data}")
                make_synthetic(args.demo_data, n=200, seed=0)
            demo_cfg = REPO / "configs" / "demo.toml"
            root = ["data.root=" + str(args.demo_data / "VOC2012")]
            run_chain(demo_cfg, root + ov, args.runs, args.results, 1)
            run_chain(demo_cfg, root + ["name=demo_max", "model.pooling=max", "model.pce=false"] + ov,
                      args.runs, args.results, 1)
        elif args.target == "voc":
            run_chain(BASELINES / "topk_pce.toml", ["data.dataset=voc"] + ov, args.runs, args.results, nproc)
        elif args.target == "coco":
            coco = ["data.root=data/coco", "data.dataset=coco", "model.num_classes=81", "data.train_split=train2014", "data.val_split=val2014",
                    "data.mask_split=train2014", "data.seg_train_split=train2014", "name=coco_topk_pce"]
            run_chain(BASELINES / "topk_pce.toml", coco + ov, args.runs, args.results, nproc)
        elif args.target == "ablation":
            for name in ("avg", "vit_pcm_max", "topk", "topk_pce"):
                run_chain(BASELINES / f"{name}.toml", ov, args.runs, args.results, nproc)
        elif args.target == "sweep":
            cfg_dir = args.runs / "sweep_configs"
            cfg_dir.mkdir(parents=True, exist_ok=True)
            for c in sweep_configs(BASELINES / "topk_pce.toml", cfg_dir):
                run_chain(c, ov, args.runs, args.results, nproc, seg=False)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from tkpbench.report import main as report_main

    report_main([str(args.results)])
    print(f"{args.target}: finished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
