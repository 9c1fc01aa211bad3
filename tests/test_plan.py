"""The process plan, the device rule and the commands torchrun is given: what decides whether a
chain can run on 1 to 8 GPUs, checked without GPUs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.distributed.run import get_args_parser

from tkpbench import device
from tkpbench.config import STAGES, load_config
from tkpbench.pipeline import TARGETS, Chain, seeded, steps, target_chains
from tkpbench.plan import PlanError, chain_plan, stage_plan
from tkpbench.runs import ResultsDir, RunDir

REPO = Path(__file__).resolve().parents[1]


def _target_configs(target: str, tmp_path: Path):
    demo = tmp_path / "demo"
    if target == "demo":  # the demo's chains without generating its data
        (demo / "SYNTHETIC.json").parent.mkdir(parents=True, exist_ok=True)
        (demo / "SYNTHETIC.json").write_text("{}")
    chains, seg = target_chains(target, [], tmp_path / "runs", demo)
    return [load_config(p, ov) for p, ov in seeded(chains, [0], single_name=True)], seg


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_plans_on_1_to_8_gpus_keeping_every_global_batch(target, tmp_path):
    cfgs, seg = _target_configs(target, tmp_path)
    stages = [s for s in STAGES if seg or s not in ("seg", "seg_eval")]
    for gpus in range(1, 9):
        for cfg in cfgs:
            plan = chain_plan(cfg, gpus, stages)
            assert list(plan) == stages
            for stage, p in plan.items():
                assert 1 <= p.nproc <= gpus
                if stage == "train":
                    per = cfg.train.batch_size // p.nproc
                    assert per * p.nproc == cfg.train.batch_size
                    assert not cfg.model.et or per % 4 == 0
                    # the largest such count: one more process would break the batch or ET's mosaics
                    for n in range(p.nproc + 1, gpus + 1):
                        assert cfg.train.batch_size % n or (cfg.model.et and (cfg.train.batch_size // n) % 4)
                elif stage == "seg":
                    assert cfg.seg.batch_size % p.nproc == 0
                    assert all(cfg.seg.batch_size % n for n in range(p.nproc + 1, gpus + 1))
                elif stage in ("pseudo", "seg_eval"):
                    assert p.nproc == gpus
                else:
                    assert p.nproc == (gpus if cfg.crf.backend == "torch" and stage == "crf" else 1)


def test_the_defaults_on_4_and_8_gpus_and_the_counts_that_failed_before(tmp_path):
    (tkp, vit_pcm), _ = _target_configs("voc", tmp_path)
    assert vit_pcm.model.et and tkp.train.batch_size == vit_pcm.train.batch_size == 16 and tkp.seg.batch_size == 10
    got = {
        g: (stage_plan("train", tkp, g).nproc, stage_plan("train", vit_pcm, g).nproc, stage_plan("seg", tkp, g).nproc)
        for g in (3, 4, 6, 8)
    }
    # DeepLab's 10 on 4 or 8 GPUs, ViT-PCM's ET on 8 and TKP-PCL on 3 or 6 all used to stop the chain
    assert got == {3: (2, 2, 2), 4: (4, 4, 2), 6: (4, 4, 5), 8: (8, 4, 5)}
    assert "10 does not split into 8 equal parts" in stage_plan("seg", tkp, 8).why


def test_a_batch_no_count_keeps_is_refused_naming_the_stage_and_the_fix(tmp_path):
    (_, vit_pcm), _ = _target_configs("voc", tmp_path)
    vit_pcm.train.batch_size = 6  # ET needs multiples of 4 per process: no count works
    with pytest.raises(PlanError, match=r"stage train: train\.batch_size = 6 .*Fix: set train\.batch_size to a multiple of 4"):
        chain_plan(vit_pcm, 8, list(STAGES))
    vit_pcm.train.batch_size, vit_pcm.train.micro_batch = 8, 3
    with pytest.raises(PlanError, match=r"micro_batch = 3"):
        stage_plan("train", vit_pcm, 2)


def test_torchrun_passes_every_stage_command_through_unchanged(tmp_path):
    """Each command the pipeline gives torchrun is parsed by torchrun's own parser as a module and
    its arguments (``--run`` was taken for an abbreviation of ``--run-path``: "ambiguous option")."""
    cfg = load_config(REPO / "baselines" / "topk_pce.toml")
    chain = Chain(cfg, ["--config", "baselines/topk_pce.toml", "--set", "seg.iters=5"], RunDir(tmp_path / "runs" / "x"), True)
    common = ["--no-progress", "--device", "cuda"]
    all_steps = steps(chain, ResultsDir(tmp_path / "results"), common, print)
    assert {s.stage for s in all_steps} == set(STAGES)
    for step in all_steps:
        argv = ["--standalone", "--nproc_per_node=4", "-m", step.module, *step.args]
        ns = get_args_parser().parse_args(argv)
        assert (ns.training_script, ns.training_script_args, ns.module) == (step.module, step.args, True)
    with pytest.raises(SystemExit):  # what the README's command did before
        get_args_parser().parse_args(["--standalone", "-m", "tkpbench.pseudo", "--run", "runs/x"])


def test_the_readmes_torchrun_commands_reach_the_stage_unchanged():
    text = (REPO / "README.md").read_text().replace("\\\n", " ")  # continued lines joined
    lines = [ln.split("#")[0].split() for ln in text.splitlines() if ln.startswith("torchrun ")]
    assert len(lines) >= 5, "README shows the stages under torchrun"
    for words in lines:
        ns = get_args_parser().parse_args(words[1:])
        assert ns.training_script.startswith("tkpbench") and ns.module, words
        assert words[len(words) - len(ns.training_script_args) :] == ns.training_script_args, words
    sbatch = (REPO / "examples" / "slurm_voc.sbatch").read_text()
    assert "--run-dir" in sbatch and not re.search(r"--run\b(?!-)", sbatch)


def test_a_real_run_without_a_usable_gpu_stops_and_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.resolve(None, synthetic=True) == "cpu"  # generated data: the CPU without asking
    assert device.resolve("cpu", synthetic=False) == "cpu"  # insisting
    monkeypatch.setattr(device, "driver_version", lambda: "470.82.01")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(device.DeviceError, match=r"driver 470\.82\.01 is too old .*CUDA 13\.0.*>= 580.*--device cpu"):
        device.resolve(None, synthetic=False)
    with pytest.raises(device.DeviceError, match="--device cuda: no usable GPU"):
        device.resolve("cuda", synthetic=True)
    monkeypatch.setattr(device, "driver_version", lambda: None)
    assert "no NVIDIA driver" in device.why_no_cuda()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "hides every GPU" in device.why_no_cuda()
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in device.why_no_cuda()


def test_cpu_counts_come_from_the_affinity(monkeypatch):
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(device.os, "cpu_count", lambda: 128)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert (device.usable_cpus(), device.cpus_per_process()) == (6, 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert device.cpus_per_process() == 3


def test_the_pipeline_holds_no_cuda_context_while_gpu_stages_run(monkeypatch):
    """With a GPU, a one-process stage is a child process too (never ``main`` in this process)."""
    from tkpbench import pipeline

    called = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pipeline, "_in_process", lambda *a: called.append("in") or 0)
    monkeypatch.setattr(pipeline, "_subprocess", lambda cmd: called.append(cmd) or 0)
    pipeline._stage("tkpbench.pseudo", ["--run-dir", "r"], 1, lambda *_: None)
    assert called and called[0][1:] == ["-m", "tkpbench.pseudo", "--run-dir", "r"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pipeline._stage("tkpbench.pseudo", ["--run-dir", "r"], 1, lambda *_: None)
    assert called[-1] == "in"
    assert re.search("largest", pipeline.__doc__)


def test_the_driver_version_comes_from_proc_else_from_nvidia_smi(tmp_path, monkeypatch):
    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build\n")
    assert device.driver_version(proc) == "580.65.06"
    smi = tmp_path / "bin" / "nvidia-smi"  # a container that hides /proc/driver/nvidia but has nvidia-smi
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 550.54.15\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(smi.parent))
    assert device.driver_version(tmp_path / "absent") == "550.54.15"
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert device.driver_version(tmp_path / "absent") is None
