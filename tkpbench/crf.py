"""Dense CRF (Kraehenbuehl & Koltun 2011): the component. ``dense_crf`` through pydensecrf (the
reference) or ``tkpbench.permutohedral`` (``backend="torch"``, GPU-capable); ``crf_labels`` refines
a pseudo mask's merged probabilities; ``crf_device`` is the one place that says where the torch
backend runs. The stage that runs it over a run folder is ``tkpbench.refine`` (``tkpbench crf``).

Defaults are ViT-PCM's and deeplab-pytorch's VOC values: 10 iterations, Gaussian (sxy 1,
compat 3), bilateral (sxy 67, srgb 3, compat 4). The unary is -log of the merged softmax.
Only the tagged classes enter the CRF (absent classes have probability 0 and could never win);
a single-class image is left as is.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any

import numpy as np
import torch

from tkpbench.config import CRFConfig
from tkpbench.device import cuda_usable
from tkpbench.errors import ConfigError, UserError
from tkpbench.permutohedral import mean_field


class CRFInputError(UserError, ValueError):
    """An image or probabilities that the CRF cannot take (wrong dtype, shape or values)."""


class CRFDeviceError(UserError, RuntimeError):
    """A device (``crf.device`` or a command's ``--device``) that this machine does not have."""


def crf_device(device: str = "", local_rank: int | None = None) -> torch.device:
    """Where the torch backend runs, from ``crf.device`` (or a command's ``--device``).

    "" = this process's GPU when CUDA is available, else the CPU; "cuda" = this process's GPU;
    "cuda:N" = GPU N as given; "cpu". This process's GPU is ``cuda:<local_rank>`` (torchrun's
    LOCAL_RANK: one GPU per rank of a node, never all ranks on GPU 0); with ``local_rank`` None it
    is the current CUDA device (which ``distributed.setup`` sets to the same)."""
    if not re.fullmatch(r"|cpu|cuda(:\d+)?", device):
        raise CRFDeviceError(f"device {device!r} (crf.device or --device): use '' (the GPU if any), cpu, cuda or cuda:N")
    if device == "cpu" or (device == "" and not torch.cuda.is_available()):
        return torch.device("cpu")
    usable, why = cuda_usable()
    if not usable:
        raise CRFDeviceError(f"device {device!r}: no usable GPU: {why}; or use crf.device=cpu (--device cpu)")
    dev = torch.device(device or "cuda")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if local_rank is None else local_rank)
    if dev.index >= torch.cuda.device_count():
        raise CRFDeviceError(
            f"device {dev}, but this process sees {torch.cuda.device_count()} GPU(s): start at most one rank "
            "per GPU (torchrun --nproc_per_node), or choose one with crf.device=cuda:N (or --device cuda:N)"
        )
    return dev


def _check(image: np.ndarray, probs: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise CRFInputError(f"the CRF's image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise CRFInputError(
            f"the CRF's probs must be (C, H, W) with H, W = {image.shape[:2]} (the image's size), got {probs.shape}"
        )
    if probs.shape[0] < 2:
        raise CRFInputError(f"the CRF needs at least 2 labels, got {probs.shape[0]}")
    if not np.isfinite(probs).all():
        raise CRFInputError("the CRF's probs contain NaN or inf")
    s = probs.sum(0)
    if np.abs(s - 1).max() > 1e-2:
        raise CRFInputError(f"the CRF's probs must sum to 1 over classes (found sums in [{s.min():.3f}, {s.max():.3f}])")


def crf_config(cfg: CRFConfig | None = None, **params: Any) -> CRFConfig:
    """``cfg`` (default: the paper's values) with ``params`` replacing its fields; a keyword that is
    not a CRF setting (a misspelling) is an error, never silently ignored."""
    cfg = cfg or CRFConfig()
    unknown = sorted(set(params) - {f.name for f in dataclasses.fields(CRFConfig)})
    if unknown:
        known = ", ".join(f.name for f in dataclasses.fields(CRFConfig))
        raise TypeError(f"unknown CRF setting(s) {unknown}; the settings are: {known}")
    return dataclasses.replace(cfg, **params)


def dense_crf(image: np.ndarray, probs: np.ndarray, cfg: CRFConfig | None = None, **params: Any) -> np.ndarray:
    """Mean-field inference. image: uint8 (H, W, 3); probs: float32 (C, H, W) summing to 1 over C.
    Returns the refined marginals, float32 (C, H, W). Settings: ``cfg`` (a ``CRFConfig``) and/or
    keywords of the same names (iters, gauss_sxy, ..., backend "pydensecrf" | "torch", device)."""
    c = crf_config(cfg, **params)
    _check(image, probs)
    if c.backend == "torch":
        return dense_crf_batch(image[None], probs[None], c)[0]
    if c.backend != "pydensecrf":
        raise ConfigError(f"crf.backend: unknown CRF backend {c.backend!r}; use 'pydensecrf' or 'torch'")
    # imported here: a machine without pydensecrf still runs the torch backend (make gpu-check)
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError:
        raise ConfigError(
            "crf.backend = 'pydensecrf' but pydensecrf is not installed here. Fix: pip install pydensecrf2, "
            "or --set crf.backend=torch (the same CRF in PyTorch)"
        ) from None

    n, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, n)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    d.addPairwiseGaussian(sxy=c.gauss_sxy, compat=c.gauss_compat)
    d.addPairwiseBilateral(sxy=c.bi_sxy, srgb=c.bi_srgb, rgbim=np.ascontiguousarray(image), compat=c.bi_compat)
    return np.asarray(d.inference(c.iters), dtype=np.float32).reshape(n, h, w)


def dense_crf_batch(images: np.ndarray, probs: np.ndarray, cfg: CRFConfig | None = None, **params: Any) -> np.ndarray:
    """The torch backend on several images of one size at once, on ``crf_device(cfg.device)``.
    images: uint8 (B, H, W, 3); probs: float32 (B, C, H, W). Returns float32 (B, C, H, W)."""
    c = crf_config(cfg, **params)
    for im, p in zip(images, probs):
        _check(im, p)
    device = crf_device(c.device)
    img = torch.as_tensor(np.ascontiguousarray(images), device=device)
    unary = -torch.log(torch.as_tensor(probs, device=device).float().clamp_min(1e-5))  # as unary_from_softmax
    q = mean_field(img, unary, c.iters, c.gauss_sxy, c.gauss_compat, c.bi_sxy, c.bi_srgb, c.bi_compat)
    return q.cpu().numpy()


def crf_labels(image: np.ndarray, probs: np.ndarray, cfg: CRFConfig) -> np.ndarray:
    """The CRF-refined label map (uint8 (H, W)) of merged probabilities (C, H, W): only the classes
    present (non-zero somewhere) enter the CRF; with fewer than two the map is that class."""
    present = np.flatnonzero(probs.reshape(probs.shape[0], -1).max(1) > 0)
    if len(present) < 2:
        return np.full(probs.shape[1:], present[0] if len(present) else 0, dtype=np.uint8)
    sub = probs[present]
    sub = sub / np.clip(sub.sum(0, keepdims=True), 1e-12, None)
    return present[dense_crf(image, sub, cfg).argmax(0)].astype(np.uint8)


if __name__ == "__main__":  # an old command line: say where the stage is rather than exit 0 having done nothing
    print("error: tkpbench.crf is the CRF component; the CRF stage is python -m tkpbench.refine (tkpbench crf)", file=sys.stderr)
    sys.exit(2)
