"""What the stage benchmarks (``bench/stages.py``) and the GPU check (``bench/gpu_check.py``) share:
timing, the bf16 matmul peak, the FLOPs and the timed step of TKP-PCL training, and the machine
record. Imports nothing optional (no pydensecrf, pycocotools or rich): the GPU check runs where
those are missing."""

from __future__ import annotations

import dataclasses
import time

import torch

from tkpbench.config import Config
from tkpbench.distributed import autocast, precision_settings
from tkpbench.model import TKPPCL, tkp_loss
from tkpbench.records import git_commit, machine_info


def timeit(fn, warmup: int = 1, reps: int = 3, sync=None) -> float:
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if sync:
        sync()
    return (time.perf_counter() - t) / reps


def sync(device):
    return torch.cuda.synchronize if device.type == "cuda" else None


def matmul_peak_tflops(device: torch.device, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    dt = timeit(lambda: a @ b, warmup=3, reps=20, sync=sync(device))
    return 2 * n**3 / dt / 1e12


def train_flops(
    batch: int,
    tokens: int = 577,
    dim: int = 768,
    depth: int = 12,
    trainable: int = 5,
    mlp: int = 3072,
    hidden: int = 192,
    classes: int = 21,
) -> float:
    """Matmul FLOPs of one training step: ViT forward over all blocks, backward (2x forward)
    through the trainable blocks; HV-BiLSTM and classifier forward + backward."""
    per_block = 2 * tokens * (4 * dim * dim + 2 * dim * mlp) + 2 * 2 * tokens * tokens * dim
    vit = batch * per_block * (depth + 2 * trainable)
    s = tokens - 1
    lstm = batch * 2 * 2 * (2 * s * 4 * hidden * (dim + hidden))  # 2 LSTMs x 2 directions
    head = batch * 2 * s * 4 * hidden * classes
    return vit + 3 * (lstm + head)


def bench_model(device: torch.device, cfg: Config, batch: int, out: dict, peak: float | None = None) -> None:
    """One optimiser step of the fine-tuning phase (the last ``train.unfreeze_blocks`` encoder blocks,
    the final norm, HV-BiLSTM and classifier train; Adam as the training's), random weights, under the
    recipe's autocast. ``peak``: the bf16 matmul peak when already measured (else measured here on CUDA)."""
    mcfg = dataclasses.replace(cfg.model, weights="", et=False)  # ET's extra forwards are the task's, not measured
    model = TKPPCL(mcfg).to(device)
    model.encoder.unfreeze(min(cfg.train.unfreeze_blocks, len(model.encoder.vit.blocks)))
    params = [q for q in model.parameters() if q.requires_grad]
    # Adam as the training's; fused on CUDA as tkpbench.engine.fused_optimizer (whose module needs rich)
    fused = True if device.type == "cuda" else None
    opt = torch.optim.Adam(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused)
    size = mcfg.img_size
    x = torch.randn(batch, 3, size, size, device=device)
    tags = torch.zeros(batch, mcfg.num_classes, dtype=torch.bool, device=device)
    tags[:, [0, 3, 15]] = True
    weight = model.classifier.weight if mcfg.reg else None
    losses = []

    def step():
        with autocast(device, cfg.train.amp):
            o = model(x)
        loss = tkp_loss(o, tags, mcfg, classifier_weight=weight)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # this step's memory, not an earlier check's
    dt = timeit(step, warmup=2 if device.type == "cuda" else 1, reps=10 if device.type == "cuda" else 1, sync=sync(device))
    vit = model.encoder.vit
    r = {
        "encoder": mcfg.encoder,
        "img_size": size,
        "batch": batch,
        "trainable_blocks": sum(any(q.requires_grad for q in b.parameters()) for b in vit.blocks),
        "s_per_step": round(dt, 4),
        "images_per_s": round(batch / dt, 2),
        "loss_finite": bool(torch.isfinite(torch.stack(losses)).all()),
    }
    if device.type == "cuda":
        peak = peak or matmul_peak_tflops(device)
        flops = train_flops(
            batch,
            tokens=(size // model.encoder.patch_size) ** 2 + model.encoder.num_prefix_tokens,
            dim=model.encoder.embed_dim,
            depth=len(vit.blocks),
            trainable=r["trainable_blocks"],
            mlp=vit.blocks[0].mlp.fc1.out_features,
            hidden=mcfg.hidden,
            classes=mcfg.num_classes,
        )
        achieved = flops / dt / 1e12
        r.update(
            bf16_matmul_peak_tflops=round(peak, 1),
            model_tflops=round(achieved, 1),
            fraction_of_peak=round(achieved / peak, 3),
            peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        )
    out["model"] = r


def machine_record() -> dict:
    """What every benchmark record holds about where it ran: the machine and versions
    (``machine_info``: CPU model, usable cores, GPU, torch, CUDA), the float settings
    (``precision_settings``: TF32 in matmuls and cuDNN, float32 matmul precision) and the commit."""
    return {"machine": machine_info(), "precision": precision_settings(), "commit": git_commit()}


def tf32_in_use(device: torch.device) -> bool:
    """Whether fp32 matmuls or convolutions on ``device`` may run in TF32 (CUDA only)."""
    p = precision_settings()
    return device.type == "cuda" and (p["tf32_matmul"] or p["tf32_cudnn"] or p["float32_matmul_precision"] != "highest")
