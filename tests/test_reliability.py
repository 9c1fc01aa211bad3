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
