import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import run_until_killed, tiny_config, trainer

from tkpbench import distributed as D
from tkpbench.config import save_config
from tkpbench.engine import TrainingError, fit, list_checkpoints, load_latest
from tkpbench.train import TKPTask

REPO = Path(__file__).resolve().parents[1]
CPU = D.DistInfo()


def _final(run_dir):
    return torch.load(run_dir / "final.pt", weights_only=True)["model"]


def test_killed_and_resumed_run_equals_an_uninterrupted_one(synth_root, tmp_path):
    cfg = tiny_config(synth_root / "VOC2012")
    fit(TKPTask(cfg), cfg.to_dict(), tmp_path / "a", CPU, progress=False)
    # "killed" mid-way through epoch 2, after the encoder was unfrozen, then the same command again
    run_until_killed(TKPTask(cfg), cfg, tmp_path / "b", stop_after=6)
    assert not (tmp_path / "b" / "final.pt").exists()
    fit(TKPTask(cfg), cfg.to_dict(), tmp_path / "b", CPU, progress=False)
    a, b = _final(tmp_path / "a"), _final(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    # and the weights really moved during training
    fresh = TKPTask(cfg).build_model().state_dict()
    assert not torch.allclose(fresh["classifier.weight"], a["classifier.weight"])
    lines = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    steps = [__import__("json").loads(ln)["step"] for ln in lines]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no duplicated log lines after resume


def test_resuming_with_a_different_config_is_refused_with_the_keys(synth_root, tmp_path):
    from tkpbench.config import dumps, load_config

    cfg = tiny_config(synth_root / "VOC2012")
    run_until_killed(TKPTask(cfg), cfg, tmp_path / "r", stop_after=2, config_text=dumps(cfg))
    other = tiny_config(synth_root / "VOC2012", model__k="3")
    with pytest.raises(TrainingError, match=r"model\.k: 2 -> 3"):
        fit(TKPTask(other), other.to_dict(), tmp_path / "r", CPU, progress=False, config_text=dumps(other))
    assert load_config(tmp_path / "r" / "config.toml").model.k == 2  # the refused run overwrote nothing
    run_until_killed(TKPTask(other), other, tmp_path / "r", force=True, stop_after=3)
    with pytest.raises(TrainingError, match="--resume auto"):
        fit(TKPTask(cfg), cfg.to_dict(), tmp_path / "r", CPU, progress=False, resume=None)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(synth_root, tmp_path):
    cfg = tiny_config(synth_root / "VOC2012", train__ckpt_every="1", train__keep_checkpoints="3")
    run_until_killed(TKPTask(cfg), cfg, tmp_path / "c", stop_after=3)
    cks = list_checkpoints(tmp_path / "c" / "checkpoints")
    assert [p.name for p in cks][-1] == "step_00000003.pt"
    cks[-1].write_bytes(b"truncated")
    warnings = []
    ck = load_latest(tmp_path / "c" / "checkpoints", warn=warnings.append)
    assert ck["step"] == 2 and "corrupt" in warnings[0]


def test_forced_nan_stops_with_a_diagnostic_checkpoint(synth_root, tmp_path):
    cfg = tiny_config(synth_root / "VOC2012")
    with pytest.raises(TrainingError, match=r"non-finite loss at step 2 .*loss=nan"):
        trainer(TKPTask(cfg), cfg, tmp_path / "n", nan_at=2).fit()
    diag = tmp_path / "n" / "checkpoints" / "diagnostic_nan_step00000002.pt"
    assert torch.load(diag, weights_only=True)["step"] == 2


def test_global_batch_that_does_not_divide_is_refused(synth_root, tmp_path):
    cfg = tiny_config(synth_root / "VOC2012", train__batch_size="5")
    with pytest.raises(TrainingError, match="does not divide over 2 processes"):
        fit(TKPTask(cfg), cfg.to_dict(), tmp_path / "g", D.DistInfo(world=2), progress=False)


def test_accumulation_gives_the_same_step_as_one_big_batch(synth_root, tmp_path):
    off = {"model__dropout": "0.0", "model__lstm_dropout": "0.0", "model__encoder_dropout": "0.0"}
    a = tiny_config(synth_root / "VOC2012", train__epochs="1", **off)
    b = tiny_config(synth_root / "VOC2012", train__epochs="1", train__micro_batch="2", **off)
    run_until_killed(TKPTask(a), a, tmp_path / "a", stop_after=1)
    run_until_killed(TKPTask(b), b, tmp_path / "b", stop_after=1)
    wa = load_latest(tmp_path / "a" / "checkpoints")["model"]["classifier.weight"]
    wb = load_latest(tmp_path / "b" / "checkpoints")["model"]["classifier.weight"]
    torch.testing.assert_close(wa, wb, atol=1e-6, rtol=1e-5)


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def test_sigterm_saves_a_loadable_checkpoint_and_exits_non_zero_with_how_to_resume(synth_root, tmp_path):
    cfg = tiny_config(synth_root / "VOC2012", train__epochs="200")
    save_config(cfg, tmp_path / "cfg.toml")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tkpbench.train",
            "--config",
            str(tmp_path / "cfg.toml"),
            "--runs",
            str(tmp_path / "runs"),
            "--no-progress",
            "--device",
            "cpu",
        ],
        env=_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log = tmp_path / "runs" / "tiny" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped by signal 15" in out and "run the same command again" in out.lower()
    assert "Traceback" not in out
    ck = load_latest(tmp_path / "runs" / "tiny" / "checkpoints")
    assert ck is not None and ck["step"] >= 3
    assert not (tmp_path / "runs" / "tiny" / "final.pt").exists()


def _two_processes(synth_root, tmp_path, *extra: str):
    """tests/ddp_worker.py under torchrun with 2 processes; returns the result and its output folder."""
    out = tmp_path / "out"
    out.mkdir()
    worker = [str(REPO / "tests" / "ddp_worker.py"), str(synth_root / "VOC2012"), str(tmp_path / "run"), str(out), *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *worker]
    return subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600), out


@pytest.mark.slow
def test_two_process_torchrun_run_keeps_ranks_identical(synth_root, tmp_path):
    r, out = _two_processes(synth_root, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "run" / "final.pt").is_file()
    fresh = TKPTask(tiny_config(synth_root / "VOC2012")).build_model().state_dict()
    assert not torch.equal(fresh["classifier.weight"], a["classifier.weight"])


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_at_that_step(synth_root, tmp_path):
    r, out = _two_processes(synth_root, tmp_path, "2")
    assert r.returncode != 0
    for rank in (0, 1):  # both ranks stop at the same step, none hangs waiting for the other
        err = (out / f"rank{rank}.err").read_text()
        assert "non-finite loss at step 2 " in err and "loss=nan" in err, err
        assert not (out / f"rank{rank}.pt").exists()
    assert (tmp_path / "run" / "checkpoints" / "diagnostic_nan_step00000002.pt").is_file()


def test_tensorboard_logging_writes_events_or_says_how_to_install_it(synth_root, tmp_path):
    import importlib.util

    cfg = tiny_config(synth_root / "VOC2012", train__epochs="1")
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(TrainingError, match=r"pip install 'tkpbench\[tb\]'"):
            fit(TKPTask(cfg), cfg.to_dict(), tmp_path / "t", CPU, progress=False, tensorboard=True)
    else:
        fit(TKPTask(cfg), cfg.to_dict(), tmp_path / "t", CPU, progress=False, tensorboard=True)
        assert list((tmp_path / "t" / "tensorboard").glob("events.out.tfevents.*"))


def test_keep_best_makes_the_best_val_epoch_final(synth_root, tmp_path):
    """train.keep = "best" (ViT-PCM's save_best_only): final.pt holds the weights of the epoch with
    the best val mIoU, here scripted to be epoch 2 of 3."""
    scripted = {1: 0.2, 2: 0.9, 3: 0.5}

    class Scripted(TKPTask):
        def evaluate(self, model, dist):
            return {"miou": scripted[self._epochs_seen()]}

        def _epochs_seen(self):
            self.seen = getattr(self, "seen", 0) + 1
            return self.seen

    cfg = tiny_config(synth_root / "VOC2012", train__keep="best", train__eval_every="1", train__keep_checkpoints="10")
    fit(Scripted(cfg), cfg.to_dict(), tmp_path / "b", CPU, progress=False)
    final = torch.load(tmp_path / "b" / "final.pt", weights_only=True)
    per_epoch = final["step"] // 3
    epoch2 = torch.load(tmp_path / "b" / "checkpoints" / f"step_{2 * per_epoch:08d}.pt", weights_only=True)["model"]
    last = load_latest(tmp_path / "b" / "checkpoints")["model"]
    assert all(torch.equal(final["model"][k], epoch2[k]) for k in epoch2)
    assert not all(torch.equal(final["model"][k], last[k]) for k in last)
    assert final["kept"].startswith("best miou 0.9000 at epoch 2")


def test_keep_best_without_an_evaluation_every_epoch_is_refused(synth_root):
    from tkpbench.config import ConfigError

    with pytest.raises(ConfigError, match="train.keep = 'best' needs an evaluation every epoch"):
        tiny_config(synth_root / "VOC2012", train__keep="best", train__eval_every="0")


@pytest.mark.parametrize("reset", [False, True])
def test_a_fresh_adam_at_the_unfreeze_when_asked(synth_root, tmp_path, reset):
    """train.reset_optimizer_at_unfreeze (ViT-PCM compiles a new optimiser there): Adam's step count
    restarts at the first fine-tuning epoch (the default); with false it carries on."""
    cfg = tiny_config(synth_root / "VOC2012", train__reset_optimizer_at_unfreeze=str(reset).lower())
    fit(TKPTask(cfg), cfg.to_dict(), tmp_path / "r", CPU, progress=False)
    ck = load_latest(tmp_path / "r" / "checkpoints")
    steps = {int(s["step"]) for s in ck["optimizer"]["state"].values()}
    per_epoch = ck["step"] // 3
    assert steps == ({2 * per_epoch} if reset else {3 * per_epoch, 2 * per_epoch})


def test_a_diverging_run_stops_at_the_nan_guard_with_one_line_and_a_diagnostic_checkpoint(synth_root, tmp_path):
    """lr 1e30 from the unfreeze: the weights blow up and the scores become NaN. The BCE must pass the
    NaN on to the guard (F.binary_cross_entropy raised 'between 0 and 1', and asserts on CUDA)."""
    cfg = tiny_config(synth_root / "VOC2012", train__lr="1e30")
    save_config(cfg, tmp_path / "cfg.toml")
    cmd = [sys.executable, "-m", "tkpbench.train", "--config", str(tmp_path / "cfg.toml"), "--no-progress", "--device", "cpu"]
    r = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    found = re.fullmatch(r"error: non-finite loss at step (\d+) \(epoch 2\): (.*); diagnostic checkpoint (\S+)", lines[0])
    assert found, lines[0]
    step, terms, path = int(found[1]), found[2], Path(found[3])
    assert "loss=nan" in terms and "mce=nan" in terms
    warmup_steps = 5  # 20 train_aug images, batch 4: the first epoch (lr_warmup) is steps 0-4
    assert step > warmup_steps - 1
    assert path.name == f"diagnostic_nan_step{step:08d}.pt"
    ck = torch.load(tmp_path / path, weights_only=True)
    assert ck["step"] == step and not (tmp_path / "runs" / "tiny" / "final.pt").exists()


def test_the_et_target_forward_leaves_no_gradless_autocast_casts_to_the_training_forward(synth_root, monkeypatch):
    """Autocast caches a weight's bf16 copy until its outermost region ends; a copy made under
    no_grad has no history, and torch < 2.10 hands it to the training forward of the same region
    (pytorch#112583): the unfrozen blocks would get no gradient. The target forward runs in eval mode
    without gradient, then the cache is dropped, before the training forward; the unfrozen blocks learn."""
    cfg = tiny_config(synth_root / "VOC2012", model__et="true", data__et_crop="16")
    task = TKPTask(cfg)
    torch.manual_seed(0)
    model = task.build_model()
    task.set_phase(model, epoch=1)  # the last block unfrozen
    data = task.train_set()
    batch = torch.utils.data.default_collate([data[(i, i)] for i in range(4)])
    events = []
    forward = model.forward

    def spy_forward(x):
        events.append(("forward", torch.is_grad_enabled(), model.training, torch.is_autocast_enabled("cpu")))
        return forward(x)

    clear = torch.clear_autocast_cache
    monkeypatch.setattr(model, "forward", spy_forward)
    monkeypatch.setattr(torch, "clear_autocast_cache", lambda: (events.append("clear"), clear())[1])
    task.train_mode(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = task.loss(model, batch, torch.device("cpu"))
    # the last clear is the autocast region's own exit
    assert events == [("forward", False, False, True), "clear", ("forward", True, True, True), "clear"]
    losses["loss"].backward()
    unfrozen = model.encoder.vit.blocks[-1]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in unfrozen.parameters())
