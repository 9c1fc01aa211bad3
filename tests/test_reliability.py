"""Reliability and safety: checkpoints that cannot run code, exact resume, runs that never mix,
locked run folders, validated configs, and one clear message instead of a traceback."""

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SimulatedKill, run_until_killed, tiny_config, trainer
from PIL import Image

from tkpbench import distributed as D
from tkpbench.config import ConfigError, load_config
from tkpbench.data import VOCSegmentation
from tkpbench.data.check import check_dataset
from tkpbench.data.common import DatasetError
from tkpbench.engine import TrainingError, fit, load_latest
from tkpbench.io import DiskFullError, atomic_write, atomic_write_text
from tkpbench.runs import CheckpointError, RunLock, claim_outputs, load_checkpoint, load_final
from tkpbench.train import TKPTask

REPO = Path(__file__).resolve().parents[1]


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


class _Payload:
    """Pickles to a call that creates a file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _malicious(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "tkpbench-checkpoint-v2", "model": {}, "evil": _Payload(marker)}, path)


def test_a_crafted_pickle_payload_is_never_executed(synth_root, tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    _malicious(run / "final.pt", marker)
    _malicious(run / "checkpoints" / "step_00000009.pt", marker)
    _malicious(run / "seg" / "final.pt", marker)
    with pytest.raises(CheckpointError, match="would have to run code"):
        load_final(run)
    warnings = []
    assert load_latest(run / "checkpoints", warn=warnings.append) is None and "not usable" in warnings[0]
    cfg = tiny_config(synth_root / "VOC2012", train__epochs="1")
    with pytest.raises(TrainingError, match="would have to run code"):  # an explicit --resume path
        fit(TKPTask(cfg), cfg.to_dict(), tmp_path / "other", D.DistInfo(), resume=str(run / "final.pt"), progress=False)
    image = next((synth_root / "VOC2012" / "JPEGImages").glob("*.jpg"))
    demo = ["--config", str(REPO / "configs" / "demo.toml")]
    for cmd in (
        ["tkpbench.pseudo", "--run", str(run), *demo],  # the commands that read a run someone sent
        ["tkpbench.segment", "eval", "--run", str(run), *demo],
        ["tkpbench.predict", "--run", str(run), str(image), "--out", str(tmp_path / "out")],
    ):
        r = subprocess.run([sys.executable, "-m", *cmd], env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "would have to run code" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not marker.exists()
    # a file that is not a tkpbench checkpoint at all is refused by name
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="foreign.pt is not a tkpbench checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_killed_right_after_an_evaluation_then_resumed_equals_an_uninterrupted_run_bit_for_bit(synth_root, tmp_path):
    cfg = tiny_config(synth_root / "VOC2012", train__eval_every="1", data__workers="2")
    fit(TKPTask(cfg), cfg.to_dict(), tmp_path / "a", D.DistInfo(), progress=False)
    with pytest.raises(SimulatedKill):
        trainer(TKPTask(cfg), cfg, tmp_path / "b", kill_after_eval=2).fit()
    fit(TKPTask(cfg), cfg.to_dict(), tmp_path / "b", D.DistInfo(), progress=False)
    a = torch.load(tmp_path / "a" / "final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # every epoch's evaluation ran, the last one included, and no log line is duplicated
    for run in ("a", "b"):
        recs = [json.loads(x) for x in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in recs if "val_miou" in r] == [1, 2, 3]
        assert len({json.dumps(r, sort_keys=True) for r in recs if "val_miou" not in r}) == sum("val_miou" not in r for r in recs)

    def strip(p):
        return [{k: v for k, v in json.loads(x).items() if k != "images_per_s"} for x in p.read_text().splitlines()]

    assert strip(tmp_path / "a" / "log.jsonl") == strip(tmp_path / "b" / "log.jsonl")


def test_evaluation_never_changes_the_trained_weights(synth_root, tmp_path):
    runs = {}
    for e in ("0", "1"):
        cfg = tiny_config(synth_root / "VOC2012", train__eval_every=e, data__workers="2")
        runs[e] = fit(TKPTask(cfg), cfg.to_dict(), tmp_path / e, D.DistInfo(), progress=False).state_dict()
    assert all(torch.equal(runs["0"][k], runs["1"][k]) for k in runs["0"])


def test_a_truncated_last_log_line_does_not_block_resume(synth_root, tmp_path):
    cfg = tiny_config(synth_root / "VOC2012")
    run_until_killed(TKPTask(cfg), cfg, tmp_path / "r", stop_after=4)
    with open(tmp_path / "r" / "log.jsonl", "a") as f:
        f.write('{"step": 5, "epo')  # the job died while writing this line
    fit(TKPTask(cfg), cfg.to_dict(), tmp_path / "r", D.DistInfo(), progress=False)
    steps = [json.loads(x)["step"] for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == torch.load(tmp_path / "r" / "final.pt", weights_only=True)["step"]


def test_temporary_checkpoint_files_of_a_crash_are_removed_on_restart(synth_root, tmp_path):
    cfg = tiny_config(synth_root / "VOC2012")
    run_until_killed(TKPTask(cfg), cfg, tmp_path / "r", stop_after=2)
    leak = tmp_path / "r" / "checkpoints" / ".step_00000003.pt.abc123.tmp"
    leak.write_bytes(b"half a checkpoint")
    fit(TKPTask(cfg), cfg.to_dict(), tmp_path / "r", D.DistInfo(), progress=False)
    assert not leak.exists()


def test_a_second_training_on_a_locked_run_folder_refuses_naming_the_first(synth_root, tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        from tkpbench.runs import RunLock
        with RunLock({str(tmp_path / "r")!r}):
            print('locked', flush=True)
            time.sleep(60)
        """),
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = tiny_config(synth_root / "VOC2012")
        with pytest.raises(TrainingError, match=rf"in use by another training \(pid {holder.pid} on host "):
            fit(TKPTask(cfg), cfg.to_dict(), tmp_path / "r", D.DistInfo(), progress=False)
        assert not (tmp_path / "r" / "final.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path / "r"):  # released by the kernel when its holder died
        pass


def test_outputs_get_the_users_normal_permissions(tmp_path):
    atomic_write_text(tmp_path / "x.json", "{}")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o666 & ~mask


def test_a_full_disk_names_the_folder_and_leaves_no_temporary_file(tmp_path):
    def write(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=rf"no space left in {tmp_path} while writing out.bin"):
        atomic_write(tmp_path / "out.bin", write)
    assert list(tmp_path.iterdir()) == []


BAD_VALUES = [
    "train.epochs=-1",
    "model.eps=1.5",
    "model.alpha=-1",
    "train.lr=-0.1",
    "seg.iters=-5",
    "crf.backend=gpu",
    "train.batch_size=0",
    "model.pooling=median",
    "data.rrc_p=2",
    "model.k=0",
    "crf.iters=0",
    "seg.scale_range=[1.5, 0.5]",
    "data.color_jitter=[0.3]",
]


@pytest.mark.parametrize("override", BAD_VALUES)
def test_a_bad_value_is_refused_naming_the_key_value_and_source(override):
    key, value = override.split("=", 1)
    with pytest.raises(ConfigError, match=rf"--set {key}=.*: {key} = .* is not allowed; expected"):
        load_config(REPO / "baselines" / "topk_pce.toml", [override])


def test_a_bad_value_in_a_file_names_the_file(tmp_path):
    (tmp_path / "c.toml").write_text('base = "%s"\n[model]\neps = 1.5\n' % (REPO / "baselines" / "topk_pce.toml"))
    with pytest.raises(ConfigError, match=r"c\.toml: model\.eps = 1\.5 is not allowed"):
        load_config(tmp_path / "c.toml")


@pytest.mark.parametrize(
    "cmd",
    [
        ["tkpbench.train", "--config", "baselines/topk_pce.toml", "--set", "train.epochs=-1"],
        ["tkpbench.pipeline", "demo", "--set", "seed=0"],
        ["tkpbench.pseudo", "--run", "/nonexistent/run"],
    ],
)
def test_commands_end_with_one_message_not_a_traceback(cmd, tmp_path):
    r = subprocess.run([sys.executable, "-m", *cmd], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().startswith("error:"), r.stderr
    debug = subprocess.run(
        [sys.executable, "-m", *cmd, "--debug"], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def _voc_copy(synth_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "VOC2012"
    shutil.copytree(synth_root / "VOC2012", root)
    return root


def test_data_check_decodes_and_names_each_damaged_file(synth_root, tmp_path):
    root = _voc_copy(synth_root, tmp_path)
    ds = VOCSegmentation(root, "val")
    jpg = ds.image_path(0)
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])  # truncated JPEG
    m = np.array(Image.open(ds.mask_path(1)))
    m[0, 0] = 37
    Image.fromarray(m, mode="L").save(ds.mask_path(1))  # a value out of range
    Image.open(ds.mask_path(2)).convert("RGB").save(ds.mask_path(2))  # a colour rendering, not class indices
    Image.fromarray(np.zeros((10, 12), np.uint8), mode="L").save(ds.mask_path(3))  # the wrong size
    ok, lines = check_dataset("voc", root, ["val"], decode=True)
    text = "\n".join(lines)
    assert not ok and "DAMAGED" in text
    for i in range(4):
        assert (ds.image_path(i) if i == 0 else ds.mask_path(i)).name in text
    assert "[37]" in text and "mode RGB" in text and "12x10" in text
    r = subprocess.run(
        [sys.executable, "-m", "tkpbench.data", "check", "voc", "--root", str(root), "--splits", "val"],
        env=_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and jpg.name in r.stdout


def test_scoring_against_a_wrong_size_ground_truth_names_the_mask_not_the_prediction(synth_root, tmp_path):
    from tkpbench.evaluate import evaluate_folder

    root = _voc_copy(synth_root, tmp_path)
    ds = VOCSegmentation(root, "val")
    pred = tmp_path / "pred"
    pred.mkdir()
    for i in range(len(ds)):
        Image.fromarray(np.zeros(ds.image(i).shape[:2], np.uint8), mode="L").save(pred / f"{ds.ids[i]}.png")
    Image.fromarray(np.zeros((10, 12), np.uint8), mode="L").save(ds.mask_path(2))
    with pytest.raises(DatasetError, match=rf"ground-truth mask .*{ds.ids[2]}\.png is 12x10 but its image"):
        evaluate_folder(pred, ds)


def test_tags_follow_an_edited_mask_and_the_cache_stays_out_of_the_dataset(synth_root, tmp_path):
    root = _voc_copy(synth_root, tmp_path)
    before = VOCSegmentation(root, "train").all_tags().copy()
    ds = VOCSegmentation(root, "train")
    absent = int(np.flatnonzero(~before[0])[0])
    m = np.array(Image.open(ds.mask_path(0)))
    m[:4, :4] = absent
    time.sleep(0.01)
    Image.fromarray(m, mode="L").save(ds.mask_path(0))
    after = VOCSegmentation(root, "train").all_tags()
    assert after[0, absent] and not before[0, absent]
    assert not list(root.rglob("*cache*"))


def test_stage_outputs_of_another_model_are_removed_before_a_stage_resumes(tmp_path):
    pseudo = tmp_path / "pseudo"
    (pseudo / "masks").mkdir(parents=True)
    assert claim_outputs(pseudo, "aaaa", {"pseudo.infer_size": 960}, ("masks",)) == []  # empty: nothing stale
    (pseudo / "masks" / "x.png").write_bytes(b"old")
    assert claim_outputs(pseudo, "aaaa", {"pseudo.infer_size": 960}, ("masks",)) == []  # same model: resume
    assert (pseudo / "masks" / "x.png").exists()
    stale = claim_outputs(pseudo, "bbbb", {"pseudo.infer_size": 960}, ("masks",))
    assert stale == ["model: aaaa -> bbbb"] and not (pseudo / "masks" / "x.png").exists()
    (pseudo / "masks").mkdir()
    (pseudo / "masks" / "y.png").write_bytes(b"new")
    assert claim_outputs(pseudo, "bbbb", {"pseudo.infer_size": 480}, ("masks",)) == ["pseudo.infer_size: 960 -> 480"]
    assert not (pseudo / "masks" / "y.png").exists()


@pytest.mark.slow
def test_sigint_to_reproduce_sh_leaves_a_resumable_run_and_a_non_zero_exit(synth_root, tmp_path):
    tiny = [
        "model.encoder=vit_tiny_patch16_224",
        "model.encoder_kwargs={depth = 2}",
        "model.img_size=32",
        "model.hidden=8",
        "data.workers=0",
        "train.epochs=300",
        "train.batch_size=4",
        "train.log_every=1",
        "train.eval_every=0",
        "train.keep=last",
    ]
    cmd = [
        str(REPO / "reproduce.sh"),
        "demo",
        "--seeds",
        "0",
        "--demo-data",
        str(synth_root),
        "--runs",
        str(tmp_path / "runs"),
        "--results",
        str(tmp_path / "results"),
        *[x for t in tiny for x in ("--set", t)],
    ]
    proc = subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "runs" / "demo-s0" / "log.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(2)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert "run the same command again" in err.lower() and "Traceback" not in err, err
    ck = load_latest(tmp_path / "runs" / "demo-s0" / "checkpoints")
    assert ck is not None and ck["step"] >= 3 and not (tmp_path / "runs" / "demo-s0" / "final.pt").exists()


def test_each_rank_draws_its_own_dropout_masks_and_rank_0_keeps_the_single_process_stream(synth_root, tmp_path):
    """Under torchrun every rank is seeded alike for the model (DDP needs the same initial weights),
    then with its own seed: rank 1's dropout masks are not a copy of rank 0's."""
    from tkpbench.engine import Trainer

    cfg = tiny_config(synth_root / "VOC2012")
    draws, weights = {}, {}
    for rank in (0, 1):
        t = Trainer(TKPTask(cfg), cfg.to_dict(), tmp_path / f"r{rank}", D.DistInfo(rank=rank, world=2), progress=False)
        t.build()
        weights[rank] = t.model.classifier.weight.clone()
        draws[rank] = torch.nn.functional.dropout(torch.ones(64), 0.5)
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(draws[0], draws[1])
    single = Trainer(TKPTask(cfg), cfg.to_dict(), tmp_path / "one", D.DistInfo(), progress=False)
    single.build()
    assert torch.equal(torch.nn.functional.dropout(torch.ones(64), 0.5), draws[0])


def test_the_cuda_rng_state_is_this_ranks_device_only(monkeypatch):
    """Rank 5 of a 1 x 8 node saves its own device's CUDA generator, and the same rank on a 2 x 4
    layout (local device 1) restores it onto device 1 alone: with every device's state saved, a
    node with 4 GPUs could not take the 8 states back. torch.cuda is faked (no GPU here)."""
    states = {d: torch.full((16,), d, dtype=torch.uint8) for d in range(8)}
    current = {"device": 5}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["device"])
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[device].clone())
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [states[d].clone() for d in range(8)])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((device, state)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda all_: restored.extend(enumerate(all_)))
    saved = D.rng_state()
    assert isinstance(saved["cuda"], torch.Tensor) and torch.equal(saved["cuda"], states[5])
    current["device"] = 1
    D.set_rng_state(saved)
    assert len(restored) == 1 and restored[0][0] == 1 and torch.equal(restored[0][1], states[5])


RESUME_WORKER = """
import json, sys
from pathlib import Path
import tkpbench.checkpoint as C
from tkpbench import distributed as D
from tkpbench.errors import TrainingError

ckpts, out = Path(sys.argv[1]), Path(sys.argv[2])
dist = D.setup("cpu")
results = {}
for case in ("lagging", "unreadable"):
    listing, load = C.list_checkpoints, C.load_checkpoint
    if dist.rank == 1 and case == "lagging":  # this node's view of the shared folder lacks the newest file
        C.list_checkpoints = lambda d: listing(d)[:-1]
    if dist.rank == 1 and case == "unreadable":  # the file rank 0 chose cannot be read on this node
        def refuse(path):
            raise C.CheckpointError(f"{path} cannot be read here")
        C.load_checkpoint = refuse
    try:
        ck = C.resume_checkpoint("auto", ckpts, dist.is_main)
        results[case] = {"path": ck["_path"], "step": int(ck["step"])}
    except TrainingError as e:
        results[case] = {"error": str(e)}
    C.list_checkpoints, C.load_checkpoint = listing, load
(out / f"rank{dist.rank}.json").write_text(json.dumps(results))
D.cleanup()
"""


def test_rank_0_chooses_the_checkpoint_to_resume_and_every_rank_loads_that_one(tmp_path):
    """Two processes (gloo) on one run folder: rank 1 sees a lagging listing without the newest
    checkpoint, yet both resume from step 4, the file rank 0 chose; when rank 1 cannot read that
    file, both ranks stop with one error naming it (neither waits for the other)."""
    import socket

    from tkpbench.runs import CHECKPOINT_FORMAT

    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    for step in (2, 4):
        torch.save({"format": CHECKPOINT_FORMAT, "model": {}, "step": step}, ckpts / f"step_{step:08d}.pt")
    (tmp_path / "worker.py").write_text(RESUME_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "worker.py"), str(ckpts), str(tmp_path)],
            env=dict(_env(), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    newest = str(ckpts / "step_00000004.pt")
    assert [r["lagging"] for r in results] == [{"path": newest, "step": 4}] * 2
    for r in results:
        assert r["unreadable"]["error"].startswith(f"rank 1 cannot load {newest}, the checkpoint rank 0 chose")


def test_a_file_system_without_flock_is_refused_naming_the_folder_and_the_fix(synth_root, tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    cfg = tiny_config(synth_root / "VOC2012")
    with pytest.raises(TrainingError, match=rf"cannot lock {tmp_path / 'r' / '.lock'}: .* does not support flock .*--runs"):
        fit(TKPTask(cfg), cfg.to_dict(), tmp_path / "r", D.DistInfo(), progress=False)

    def broken(fd, op):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(OSError, match="Input/output error"):  # another failure is not mistaken for it
        RunLock(tmp_path / "r").__enter__()


def _children() -> list[int]:
    """The process ids of this process's children (Linux)."""
    return [int(pid) for f in Path("/proc/self/task").glob("*/children") for pid in f.read_text().split()]


def test_sigterm_to_every_process_checkpoints_at_the_next_step_exits_143_and_resumes_exactly(synth_root, tmp_path):
    """SLURM signals every process of a job step, the DataLoader workers too: they ignore it (the
    signal comes at an epoch's last step, so the next step needs them), the trainer checkpoints at
    the next step and ends with 128 + 15; the same command then continues to the weights of an
    uninterrupted run."""
    import signal

    from tkpbench.engine import Trainer
    from tkpbench.errors import TrainingInterrupted

    class SignalledAtTheEndOfEpoch1(Trainer):
        def after_step(self) -> None:
            if self.state.step == self.sampler.batches_per_epoch:
                for pid in [*_children(), os.getpid()]:
                    os.kill(pid, signal.SIGTERM)

    cfg = tiny_config(synth_root / "VOC2012", data__workers="2")
    fit(TKPTask(cfg), cfg.to_dict(), tmp_path / "a", D.DistInfo(), progress=False)
    t = SignalledAtTheEndOfEpoch1(TKPTask(cfg), cfg.to_dict(), tmp_path / "b", D.DistInfo(), progress=False)
    with pytest.raises(TrainingInterrupted, match="stopped by signal 15 ") as stopped:
        t.fit()
    assert stopped.value.exit_code == 143
    # the workers that ignore SIGTERM are gone although ``t`` (and its loader) is still referenced:
    # left alive, the interpreter's exit (SIGTERM to children, then join) would wait for them forever
    assert _children() == []
    assert load_latest(tmp_path / "b" / "checkpoints")["step"] == t.sampler.batches_per_epoch + 1
    assert not (tmp_path / "b" / "final.pt").exists()
    fit(TKPTask(cfg), cfg.to_dict(), tmp_path / "b", D.DistInfo(), progress=False)
    a = torch.load(tmp_path / "a" / "final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_stop_rule_says_why_the_loop_ends():
    import signal

    from tkpbench.engine import StopRule

    rule = StopRule(max_steps=10, patience=2)
    rule.at_start(0, stopped_early=False)
    assert not rule.after_step(5, None) and rule.reason is None
    assert not rule.after_evaluation(5, epoch=2, best_epoch=1)
    assert rule.after_evaluation(6, epoch=3, best_epoch=1) and rule.reason == "patience" and rule.stopped_early
    rule = StopRule(max_steps=10, patience=0)
    assert rule.after_step(10, None) and rule.reason == "max_steps"
    assert not rule.after_evaluation(10, epoch=9, best_epoch=0)  # patience 0: never
    rule = StopRule(max_steps=10, patience=0)
    assert rule.after_step(10, signal.SIGTERM) and (rule.reason, rule.signum) == ("signal", 15)  # a signal wins
    rule.at_start(10, stopped_early=False)  # resumed after the last step: only final.pt is left to write
    assert rule.reason == "max_steps"
    rule.at_start(4, stopped_early=True)  # resumed after patience ran out: it stays stopped
    assert rule.reason == "patience"


@pytest.fixture
def _torch_defaults_after():
    yield
    D.set_determinism(False)


def test_set_determinism_switches_the_kernels_and_precision_settings_records_them(monkeypatch, _torch_defaults_after):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    D.set_determinism(True)
    on = D.precision_settings()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert on["deterministic_algorithms"] and on["cudnn_deterministic"] and not on["cudnn_benchmark"]
    assert on["cublas_workspace_config"] == ":4096:8"
    assert not torch.is_deterministic_algorithms_warn_only_enabled()  # an op without a deterministic kernel raises
    D.set_determinism(False)
    off = D.precision_settings()
    assert not off["deterministic_algorithms"] and not off["cudnn_deterministic"]
    for k in ("tf32_matmul", "tf32_cudnn", "float32_matmul_precision"):
        assert k in off
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert D.precision_settings()["tf32_matmul"] is True  # read live, not cached
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


def test_train_deterministic_trains_the_same_weights_on_the_cpu(synth_root, tmp_path, monkeypatch, _torch_defaults_after):
    """train.deterministic reaches set_determinism before the model is built, and on the CPU (whose
    kernels are deterministic already) the run trains bit-identical weights."""
    from tkpbench.engine import Trainer

    switched = []

    class Recording(Trainer):
        def build(self) -> None:
            switched.append(torch.are_deterministic_algorithms_enabled())
            super().build()

    runs = {}
    for flag in ("false", "true"):
        cfg = tiny_config(synth_root / "VOC2012", train__epochs="1", train__deterministic=flag)
        runs[flag] = Recording(TKPTask(cfg), cfg.to_dict(), tmp_path / flag, D.DistInfo(), progress=False).fit().state_dict()
    assert switched == [False, True]
    assert all(torch.equal(runs["false"][k], runs["true"][k]) for k in runs["false"])
