"""The first hour on a GPU machine (``make gpu-check``): every CUDA path of tkpbench, at tiny but real
shapes, in at most 8 minutes on one GPU and 10 on two. One table, one JSON record with the machine.

    python bench/gpu_check.py                       # every check this machine allows
    python bench/gpu_check.py --only cuda,peak,tflops --out /tmp/check.json
    python bench/gpu_check.py --skip crf,deeplab
    python bench/gpu_check.py --cpu-dry-run         # on the CPU: the checks that need no GPU's kernels

Checks (each with a time budget; a check over its budget fails):

  cuda     driver, compute capability, CUDA build and NCCL; a matmul on every visible GPU against the CPU
  peak     bf16 matmul of 8192^3: TFLOP/s, the reference of ``tflops``
  tflops   one TKP-PCL training step (ViT-B/16 at 384, batch 16, random weights, the fine-tuning phase):
           model TFLOP/s against the measured peak
  pseudo   pseudo masks at 960 of one model in bf16 autocast against fp32 (TF32 off): pixel agreement
  crf      the torch CRF on the GPU against pydensecrf (without it: against the torch CRF on the CPU) on
           VOC val images (generated ones without the VOC sample): argmax agreement and images/s
  deeplab  DeepLab-v2 ResNet-101 with MSC, channels_last and bf16: a few training steps and an evaluation
  ddp      ``tkpbench.train`` on 2 processes (NCCL) across the unfreeze with ET and LSTM dropout, tiny ViT
           on generated data: no DDP error, and every tensor of every unfrozen block moved
  sigterm  ``tkpbench.train`` stopped by SIGTERM after its first checkpoint exits 143; the same command
           resumes from the step it saved
  nan      ``tkpbench.train`` with lr 1e30: exactly one 'non-finite loss' error line and a diagnostic checkpoint

A check whose package is missing (rich, for the progress of tkpbench's stages) is skipped with the
package named; pydensecrf and pycocotools are not needed (the generated data is VOC-only). ``ddp``
needs two GPUs. Without a
usable GPU the script says why and exits 0. ``--cpu-dry-run`` runs ``ddp`` (gloo), ``sigterm`` and
``nan`` on the CPU. Exit status: 1 when a check failed, else 0. The record goes to
``bench/gpu-check-<gpu>-<commit>.json`` (``--out`` to choose).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the repository's bench package

from bench.common import bench_model, machine_record, matmul_peak_tflops, sync, timeit  # noqa: E402
from tkpbench.config import Config  # noqa: E402
from tkpbench.device import cuda_usable, driver_version  # noqa: E402
from tkpbench.io import atomic_write_json  # noqa: E402

SAMPLE_VOC = REPO.parent / "shared/data/voc2012-sample/VOC2012"
# the training stage shows progress with rich (the generated data is VOC-only: no pycocotools)
TRAINING = ("rich",)
# environment variables that make "fp32" matmuls run in TF32 whatever torch's switches say
TF32_OVERRIDES = ("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "NVIDIA_TF32_OVERRIDE")

# the tiny training runs: configs/demo.toml (4-block ViT-Tiny at 128, generated data) on a smaller set
TINY = ["train.batch_size=8", "train.eval_every=0", "train.keep=last", "data.workers=0"]
# --cpu-dry-run: budgets times this (a tiny training step on 2 shared CPU cores is ~10x a GPU's)
DRY_RUN_SLACK = 5
AGREEMENT_FLOOR = {"pseudo": 0.99, "crf": 0.999}  # below: fail (CPU CRF measured 1.0, bench/crf-agreement-cpu.json)


def tf32_env_overrides() -> dict[str, str]:
    """The ``TF32_OVERRIDES`` set in this environment, with their values."""
    return {k: os.environ[k] for k in TF32_OVERRIDES if k in os.environ}


@dataclass
class Result:
    status: str  # "pass", "fail" or "skip"
    figure: str = ""
    note: str = ""
    data: dict = field(default_factory=dict)


def verdict(ok: bool, figure: str, note: str = "", **data) -> Result:
    return Result("pass" if ok else "fail", figure, note, data)


@dataclass
class Context:
    device: torch.device
    gpus: int
    dry: bool
    work: Path  # scratch folder, removed at the end
    voc_root: Path | None
    peak_tflops: float | None = None
    _data: Path | None = None

    def synthetic_voc(self) -> Path:
        """Generated VOC-layout data (40 images, 32 of them train_aug), made once per check run."""
        if self._data is None:
            from tkpbench.data.synth import make_synthetic

            make_synthetic(self.work / "data", n=40, seed=0, coco=False)  # VOC only: no pycocotools needed
            self._data = self.work / "data" / "VOC2012"
        return self._data

    def train_command(self, name: str, overrides: list[str], nproc: int = 1) -> list[str]:
        """``tkpbench.train`` on the tiny demo model and generated data (torchrun with ``nproc`` > 1)."""
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
        sets = [f"data.root={self.synthetic_voc()}", *TINY, *overrides]
        return [
            sys.executable,
            *launch,
            "-m",
            "tkpbench.train",
            "--config",
            str(REPO / "configs" / "demo.toml"),
            *[x for s in sets for x in ("--set", s)],
            "--runs",
            str(self.work / "runs"),
            "--name",
            name,
            "--no-progress",
            "--device",
            self.device.type,
        ]


@dataclass
class Check:
    name: str
    budget_s: int
    run: Callable[[Context, int], Result]
    needs: tuple[str, ...] = ()  # importable packages it uses
    gpus: int = 1
    on_cpu: bool = False  # runs under --cpu-dry-run


def missing_packages(names: tuple[str, ...]) -> list[str]:
    missing = []
    for n in names:
        try:
            importlib.import_module(n)
        except ImportError:
            missing.append(n)
    return missing


def pixel_agreement(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor | None = None) -> float:
    """The fraction of pixels (of ``where``, when given) on which two label maps agree."""
    same = a == b
    if where is not None:
        same = same[where]
    return float(same.float().mean()) if same.numel() else 1.0


@contextmanager
def full_fp32():
    """fp32 matmuls and convolutions in full precision (no TF32) inside, the settings restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def run_logged(cmd: list[str], log: Path, timeout: float) -> tuple[int, str]:
    """Run ``cmd`` in its own process group with stdout+stderr to ``log``; (exit status, output).
    Past ``timeout`` the whole group is killed and the status is -9."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    return rc, log.read_text()


def last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1][:300] if lines else ""


# ------------------------------------------------------------------------------------------- checks


def check_cuda(ctx: Context, budget: int) -> Result:
    n = torch.cuda.device_count()
    cap = torch.cuda.get_device_capability(0)
    a = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    ref = a @ a
    errors = []
    for i in range(n):
        with full_fp32():
            got = (a.to(f"cuda:{i}") @ a.to(f"cuda:{i}")).cpu()
        errors.append(float((got - ref).abs().max() / ref.abs().max()))
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else ""
    figure = f"{n}x {torch.cuda.get_device_name(0)}, sm_{cap[0]}{cap[1]}, CUDA {torch.version.cuda}, driver {driver_version()}"
    overrides = tf32_env_overrides()
    return verdict(
        max(errors) < 1e-4,
        figure,
        f"NCCL {nccl or 'missing'}; bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}; "
        f"fp32 matmul vs CPU, worst relative error {max(errors):.1e}"
        + (f"; TF32 forced by {', '.join(f'{k}={v}' for k, v in overrides.items())}" if overrides else ""),
        tf32_env_overrides=overrides,
        capability=list(cap),
        nccl=nccl,
        matmul_rel_error=errors,
    )


def check_peak(ctx: Context, budget: int) -> Result:
    ctx.peak_tflops = matmul_peak_tflops(ctx.device)
    return verdict(ctx.peak_tflops > 0, f"{ctx.peak_tflops:.0f} TFLOP/s bf16", "8192^3, mean of 20", tflops=ctx.peak_tflops)


def check_tflops(ctx: Context, budget: int) -> Result:
    out: dict = {}
    cfg = Config()  # the paper's model: ViT-B/16 at 384, top-K + PCE, last 5 blocks fine-tuned
    bench_model(ctx.device, cfg, cfg.train.batch_size, out, peak=ctx.peak_tflops)
    m = out["model"]
    return verdict(
        m["loss_finite"],
        f"{m['model_tflops']} TFLOP/s = {m['fraction_of_peak']:.0%} of {m['bf16_matmul_peak_tflops']}",
        f"{m['images_per_s']} images/s, batch {m['batch']}, {m['peak_mem_gib']} GiB"
        + ("" if m["loss_finite"] else "; non-finite loss"),
        **m,
    )


@torch.no_grad()
def check_pseudo(ctx: Context, budget: int) -> Result:
    from tkpbench.model import TKPPCL, patch_masks

    cfg = Config()
    torch.manual_seed(0)
    model = TKPPCL(dataclasses.replace(cfg.model, weights="")).to(ctx.device).eval()
    size = cfg.pseudo.infer_size
    x = torch.randn(2, 3, size, size, device=ctx.device)
    tags = torch.zeros(2, cfg.model.num_classes, dtype=torch.bool, device=ctx.device)
    tags[:, [0, 3, 15]] = True
    with full_fp32():
        o = model(x)
        ref, probs = patch_masks(o.z, o.grid, tags, (size, size), return_probs=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        o = model(x)
    got, probs_bf16 = patch_masks(o.z, o.grid, tags, (size, size), return_probs=True)
    max_diff = float((probs - probs_bf16).abs().max())
    top2 = probs.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) >= 0.05
    compared = float(decided.float().mean())
    overall, firm = pixel_agreement(ref, got), pixel_agreement(ref, got, decided)
    return verdict(  # at least 5% of the pixels compared: an agreement over no pixels is no evidence
        firm >= AGREEMENT_FLOOR["pseudo"] and compared >= 0.05,
        f"{firm:.4f} agree",
        f"on pixels with an fp32 top-2 margin >= 0.05 ({compared:.0%}); all pixels {overall:.4f}; "
        f"max |p_bf16 - p_fp32| {max_diff:.3f}; random weights",
        agreement_decided=firm,
        agreement_all=overall,
        decided_fraction=compared,
        max_abs_prob_diff=max_diff,
    )


def check_crf(ctx: Context, budget: int) -> Result:
    import numpy as np

    from tkpbench.crf import dense_crf
    from tkpbench.data.synth import blurred_probs, render

    pairs = []
    if ctx.voc_root is not None:
        from tkpbench.data import VOCSegmentation

        ds = VOCSegmentation(ctx.voc_root, "val")
        for i in range(min(len(ds), 10)):
            keep = np.flatnonzero(ds.tags(i))
            pairs.append((ds.image(i), blurred_probs(ds.mask(i), ds.num_classes, sigma=4, offset=3, seed=i)[keep]))
        source = f"{len(pairs)} VOC val images"
    else:
        rng = np.random.default_rng(0)
        for i in range(10):
            img, mask, _ = render(rng, 375, 500, 20)
            keep = np.unique(mask[mask < 255])
            pairs.append((img, blurred_probs(mask, 21, sigma=4, offset=3, seed=i)[keep]))
        source = "10 generated images (no VOC sample; --voc-root)"
    pairs = [(img, p / p.sum(0, keepdims=True)) for img, p in pairs]
    # the reference: pydensecrf where installed, else the same torch backend on the CPU (so a machine
    # without pydensecrf still checks the CUDA path of the torch CRF against its CPU path)
    reference = "pydensecrf" if not missing_packages(("pydensecrf",)) else "torch on the CPU"
    ref_params = {} if reference == "pydensecrf" else {"backend": "torch", "device": "cpu"}
    agree, t_ours, t_ref = [], 0.0, 0.0
    dense_crf(*pairs[0], backend="torch", device=str(ctx.device))  # warm-up
    for img, p in pairs:
        t = time.perf_counter()
        ref = dense_crf(img, p, **ref_params)
        t_ref += time.perf_counter() - t
        t = time.perf_counter()
        ours = dense_crf(img, p, backend="torch", device=str(ctx.device))
        t_ours += time.perf_counter() - t
        agree.append(pixel_agreement(torch.from_numpy(ref.argmax(0)), torch.from_numpy(ours.argmax(0))))
    mean = float(np.mean(agree))
    return verdict(
        mean >= AGREEMENT_FLOOR["crf"],
        f"{mean:.5f} agree, {len(pairs) / t_ours:.3g} images/s",
        f"{source}; against {reference}: {len(pairs) / t_ref:.3g} images/s"
        + (" on one core" if reference == "pydensecrf" else "")
        + f"; worst image {min(agree):.5f}",
        agreement_mean=mean,
        agreement_min=min(agree),
        torch_images_per_s=len(pairs) / t_ours,
        reference=reference,
        reference_images_per_s=len(pairs) / t_ref,
        images=source,
    )


def check_deeplab(ctx: Context, budget: int) -> Result:
    from tkpbench.deeplab import DeepLabV2, predict_probs, resize_labels
    from tkpbench.metrics import ConfusionMatrix

    s = Config().seg
    torch.manual_seed(0)
    model = DeepLabV2(21, s.backbone, output_stride=s.output_stride).to(ctx.device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum)
    batch = 4
    x = torch.randn(batch, 3, s.crop, s.crop, device=ctx.device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 21, (batch, s.crop, s.crop), device=ctx.device)
    losses = []

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs = model(x, msc_scales=list(s.msc_scales)) if s.msc_scales else [model(x)]
        loss = sum(torch.nn.functional.cross_entropy(o.float(), resize_labels(y, o.shape[-2:])) for o in outs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    dt = timeit(step, warmup=1, reps=3, sync=sync(ctx.device))
    losses = [float(v) for v in losses]
    model.eval()
    img = torch.randn(1, 3, 375, 500, device=ctx.device).contiguous(memory_format=torch.channels_last)
    probs = predict_probs(model, img, list(s.eval_scales), s.eval_flip, True)
    cm = ConfusionMatrix(21)
    cm.update(probs.argmax(0), torch.randint(0, 21, (375, 500), device=ctx.device))
    sums_ok = bool(torch.allclose(probs.sum(0), torch.ones_like(probs[0]), atol=1e-3))
    ok = all(map(math.isfinite, losses)) and sums_ok and 0 <= cm.miou() <= 1
    return verdict(
        ok,
        f"{batch / dt:.1f} images/s",
        f"{s.backbone} crop {s.crop}, batch {batch}, MSC {list(s.msc_scales)}; evaluation at 375x500, "
        f"probabilities {'sum to 1' if sums_ok else 'do NOT sum to 1'}; losses {[round(v, 3) for v in losses]}",
        images_per_s=batch / dt,
        losses=losses,
    )


def check_ddp(ctx: Context, budget: int) -> Result:
    """Two processes across the unfreeze (epoch 1 frozen, epoch 2 the last 2 of 4 blocks trained) with
    ET and LSTM dropout. A parameter without a gradient on a rank is a DDP reduction error; one
    without a gradient on every rank does not move: each tensor of the unfrozen blocks and the final
    norm must differ between the end of epoch 1 and final.pt, and those of the frozen blocks not."""
    cmd = ctx.train_command(
        "ddp",
        ["model.et=true", "model.lstm_dropout=0.2", "train.epochs=2", "train.warmup_epochs=1", "train.unfreeze_blocks=2",
         "train.keep_checkpoints=10", "data.et_crop=64"],
        nproc=2,
    )  # fmt: skip
    rc, text = run_logged(cmd, ctx.work / "ddp.log", budget)
    if rc:
        return Result("fail", f"exit {rc}", last_line(text), {"log_tail": text[-3000:]})
    run = ctx.work / "runs" / "ddp"
    first = sorted((run / "checkpoints").glob("step_*.pt"))[0]  # the end of epoch 1, before the unfreeze
    before = torch.load(first, map_location="cpu", weights_only=True)["model"]
    after = torch.load(run / "final.pt", map_location="cpu", weights_only=True)["model"]
    moved = {k: not torch.equal(before[k], after[k]) for k in before if k.startswith("encoder.vit.")}
    blocks = sorted({int(m.group(1)) for k in moved if (m := re.match(r"encoder\.vit\.blocks\.(\d+)\.", k))})
    unfrozen = [f"encoder.vit.blocks.{b}." for b in blocks[-2:]] + ["encoder.vit.norm."]
    trained = [k for k in moved if k.startswith(tuple(unfrozen))]
    stuck = [k for k in trained if not moved[k]]
    leaked = [k for k in moved if moved[k] and k not in trained]
    return verdict(
        not stuck and not leaked,
        f"{len(trained) - len(stuck)}/{len(trained)} unfrozen tensors moved",
        f"{first.name} -> final.pt; "
        + (f"no gradient: {', '.join(stuck[:4])}; " if stuck else "")
        + (f"frozen but moved: {', '.join(leaked[:4])}" if leaked else "frozen blocks unchanged"),
        stuck=stuck,
        leaked=leaked,
    )


def check_sigterm(ctx: Context, budget: int) -> Result:
    """SIGTERM once the first checkpoint exists: exit 143 with a checkpoint of the step reached; the
    same command then logs that it resumed from that step (and is stopped the same way)."""
    cmd = ctx.train_command("sigterm", ["train.epochs=1000", "train.ckpt_every=2", "train.warmup_epochs=1"])
    ckpts = ctx.work / "runs" / "sigterm" / "checkpoints"
    deadline = time.perf_counter() + budget
    outcomes = []
    for attempt in ("first", "resumed"):
        log = ctx.work / f"sigterm-{attempt}.log"
        seen = {p.name for p in ckpts.glob("step_*.pt")}
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
            while proc.poll() is None and time.perf_counter() < deadline:
                if {p.name for p in ckpts.glob("step_*.pt")} - seen:
                    break
                time.sleep(0.2)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=max(deadline - time.perf_counter(), 5))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
        saved = sorted(ckpts.glob("step_*.pt"))
        outcomes.append((rc, log.read_text(), int(saved[-1].stem.split("_")[1]) if saved else None))
        if rc != 128 + signal.SIGTERM:
            return Result("fail", f"{attempt} run: exit {rc}, expected 143", last_line(outcomes[-1][1]))
    step = outcomes[0][2]
    resumed = re.search(r"resumed from .* step (\d+)", outcomes[1][1])
    ok = resumed is not None and int(resumed.group(1)) == step
    return verdict(
        ok,
        f"exit 143, resumed at step {resumed.group(1) if resumed else '?'}",
        f"saved step {step} at the stop; "
        + ("the resume continued from it" if ok else f"resume line: {resumed.group(0) if resumed else 'none'}"),
        saved_step=step,
    )


def check_nan(ctx: Context, budget: int) -> Result:
    cmd = ctx.train_command("nan", ["train.lr=1e30", "train.warmup_epochs=0", "train.epochs=2"])
    rc, text = run_logged(cmd, ctx.work / "nan.log", budget)
    lines = [x for x in text.splitlines() if "non-finite loss" in x]
    diag = sorted((ctx.work / "runs" / "nan" / "checkpoints").glob("diagnostic_nan_step*.pt"))
    ok = rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and len(diag) == 1
    return verdict(
        ok,
        f"exit {rc}, {len(lines)} error line(s), {len(diag)} diagnostic checkpoint(s)",
        lines[0][:200] if lines else last_line(text),
    )


CHECKS = [
    Check("cuda", 15, check_cuda),
    Check("peak", 20, check_peak),
    Check("tflops", 60, check_tflops),
    Check("pseudo", 45, check_pseudo),
    Check("crf", 60, check_crf, needs=("rich",)),  # tkpbench.data's progress bars; pydensecrf optional
    Check("deeplab", 60, check_deeplab),
    Check("ddp", 90, check_ddp, needs=TRAINING, gpus=2, on_cpu=True),
    Check("sigterm", 90, check_sigterm, needs=TRAINING, on_cpu=True),
    Check("nan", 60, check_nan, needs=TRAINING, on_cpu=True),
]


# ------------------------------------------------------------------------------------------- runner


def skip_reason(check: Check, ctx: Context, selected: set[str]) -> str | None:
    if check.name not in selected:
        return "not selected (--only / --skip)"
    if ctx.dry and not check.on_cpu:
        return "needs a GPU (--cpu-dry-run)"
    missing = missing_packages(check.needs)
    if missing:
        return f"{', '.join(missing)} not installed"
    if not ctx.dry and ctx.gpus < check.gpus:
        return f"needs {check.gpus} GPUs, this machine has {ctx.gpus}"
    return None


def run_checks(checks: list[Check], ctx: Context, selected: set[str]) -> list[dict]:
    rows = []
    for c in checks:
        t = time.perf_counter()
        budget = c.budget_s * (DRY_RUN_SLACK if ctx.dry else 1)
        why = skip_reason(c, ctx, selected)
        if why:
            r = Result("skip", note=why)
        else:
            print(f"[{c.name}] running (budget {budget} s)", file=sys.stderr, flush=True)
            try:
                r = c.run(ctx, budget)
            except Exception as e:  # one broken path must not hide the others
                traceback.print_exc()
                r = Result("fail", type(e).__name__, last_line(str(e)))
            took = time.perf_counter() - t
            if r.status == "pass" and took > budget:
                r = Result("fail", r.figure, f"took {took:.0f} s, over its budget of {budget} s; {r.note}", r.data)
        rows.append(
            {"check": c.name, "status": r.status, "figure": r.figure, "note": r.note}
            | {"seconds": round(time.perf_counter() - t, 1)}
            | ({"budget_s": budget, "data": r.data} if r.status != "skip" else {})
        )
    return rows


def print_table(rows: list[dict], title: str, footer: str) -> None:
    """A rich table when rich is installed, plain columns otherwise."""
    cols = ("check", "status", "figure", "note", "seconds")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for r in rows:
            print("  ".join(f"{r[c]}" for c in cols))
        print(footer)
        return
    t = Table(title=title, title_justify="left", caption=footer, caption_justify="left")
    for c in cols:
        t.add_column(c, overflow="fold", justify="right" if c == "seconds" else "left")
    colour = {"pass": "green", "fail": "bold red", "skip": "yellow"}
    for r in rows:
        t.add_row(*[f"[{colour[r['status']]}]{r['status']}[/]" if c == "status" else str(r[c]) for c in cols])
    Console().print(t)


def default_out(rec: dict, dry: bool) -> Path:
    gpu = "cpu-dry-run" if dry else re.sub(r"[^A-Za-z0-9]+", "-", rec["machine"]["gpu"]).strip("-").lower()
    return REPO / "bench" / f"gpu-check-{gpu}-{rec['commit']}.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench/gpu_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    names = [c.name for c in CHECKS]
    p.add_argument("--only", default=",".join(names), help=f"checks to run, comma-separated ({', '.join(names)})")
    p.add_argument("--skip", default="", help="checks not to run, comma-separated")
    p.add_argument("--out", type=Path, default=None, help="the JSON record (default bench/gpu-check-<gpu>-<commit>.json)")
    p.add_argument("--voc-root", type=Path, default=SAMPLE_VOC if SAMPLE_VOC.is_dir() else None, help="VOC2012 folder for crf")
    p.add_argument("--cpu-dry-run", action="store_true", help="run the checks that need no GPU kernels on the CPU")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (runs, logs) and print where")
    args = p.parse_args(argv)
    chosen = {x for x in args.only.split(",") if x} - {x for x in args.skip.split(",") if x}
    unknown = chosen - set(names)
    if unknown:
        print(f"error: unknown check(s) {', '.join(sorted(unknown))}; the checks are: {', '.join(names)}", file=sys.stderr)
        return 2
    ok, why = cuda_usable()
    if not ok and not args.cpu_dry_run:
        print(f"no usable GPU: {why}; nothing to check")
        return 0
    device = torch.device("cuda" if ok and not args.cpu_dry_run else "cpu")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    ctx = Context(device, torch.cuda.device_count() if device.type == "cuda" else 0, args.cpu_dry_run, work, args.voc_root)
    t0 = time.perf_counter()
    if device.type == "cuda":  # every GPU's context and cuBLAS handle, before any check's budget starts
        for i in range(ctx.gpus):
            (torch.ones(8, 8, device=f"cuda:{i}") @ torch.ones(8, 8, device=f"cuda:{i}")).sum().item()
    cuda_init_s = round(time.perf_counter() - t0, 1)
    try:
        rows = run_checks(CHECKS, ctx, chosen)
    finally:
        if args.keep:
            print(f"scratch folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    rec = machine_record()
    m, prec = rec["machine"], rec["precision"]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pass", "fail", "skip")}
    record = {
        "kind": "gpu-check",
        "command": " ".join(["python bench/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "cpu_dry_run": args.cpu_dry_run,
        "driver": driver_version() or "",
        "wall_s": round(time.perf_counter() - t0, 1),
        "cuda_init_s": cuda_init_s,
        "tf32_env_overrides": tf32_env_overrides(),
        "counts": counts,
        "checks": rows,
        **rec,
    }
    out = args.out or default_out(rec, args.cpu_dry_run)
    atomic_write_json(out, record)
    where = f"{m['gpus']}x {m['gpu']}" if m["gpus"] else f"CPU ({m['cpu']})"
    print_table(
        rows,
        f"gpu-check on {where}, {m['cores']} usable cores, torch {m['torch']} (CUDA {m['cuda'] or 'none'}), "
        f"commit {rec['commit']}",
        f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped in {record['wall_s']} s. "
        f"TF32: matmul {'on' if prec['tf32_matmul'] else 'off'}, cuDNN {'on' if prec['tf32_cudnn'] else 'off'}, "
        f"float32 matmul precision {prec['float32_matmul_precision']} (pseudo's fp32 reference runs with TF32 off). "
        f"Record: {out}",
    )
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
