"""Permutohedral-lattice Gaussian filtering and dense-CRF mean field in PyTorch tensor ops.

A port of the lattice in Kraehenbuehl's densecrf (``permutohedral.cpp``, after Adams, Baek and
Davis 2010) as pydensecrf uses it: elevate the features onto the hyperplane, find the enclosing
simplex by rounding and ranking, splat with barycentric weights, blur once along each of the
d + 1 lattice directions with the [1/2, 1, 1/2] kernel, slice, and scale by 1 / (1 + 2^-d).
Lattice keys are packed into one int64 per vertex (image index included), de-duplicated with
``torch.unique`` and looked up with ``torch.searchsorted``; splat, blurs and slice are then
sparse CSR matrices, so a filtering is d + 3 sparse-dense products. Nothing loops over pixels
or lattice points. Loops run over the mean-field iterations and the d + 1 blur directions only.
The kernel is normalised symmetrically (densecrf's default NORMALIZE_SYMMETRIC) and the
compatibility is Potts, so one mean-field step is Q <- softmax(-U + sum_k w_k N_k K_k N_k Q).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from tkpbench.errors import ConfigError


def _too_wide(b: int, n: int) -> ConfigError:
    return ConfigError(
        f"the CRF's features span too many lattice points for {b} image(s) of {n} pixels: raise crf.gauss_sxy, "
        "crf.bi_sxy or crf.bi_srgb (the smaller they are, the more points), or use crf.backend=pydensecrf"
    )


class Lattice:
    """A permutohedral lattice over the features of B images. features: (B, N, d)."""

    def __init__(self, features: Tensor) -> None:
        b, n, d = features.shape
        dev = features.device
        self.b, self.n, self.d = b, n, d
        f = features.reshape(b * n, d).float()
        inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
        scale = torch.tensor([inv_std / math.sqrt((i + 1) * (i + 2)) for i in range(d)], device=dev)
        cf = f * scale  # (P, d)
        # elevated[0] = sum cf; elevated[j] = sum_{i >= j} cf_i - j * cf_{j-1} (j = 1..d)
        suffix = torch.cat([cf.flip(1).cumsum(1).flip(1), torch.zeros_like(cf[:, :1])], dim=1)  # (P, d+1)
        j = torch.arange(1, d + 1, device=dev, dtype=cf.dtype)
        elevated = torch.cat([suffix[:, :1], suffix[:, 1:] - j * cf], dim=1)
        if float(elevated.abs().max()) >= 2**22:  # beyond, float32 keeps too little of the fraction to find the simplex
            raise _too_wide(b, n)
        # closest remainder-0 point
        v = elevated / (d + 1)
        up, down = torch.ceil(v) * (d + 1), torch.floor(v) * (d + 1)
        rem0 = torch.where(up - elevated < elevated - down, up, down)
        total = torch.round(rem0.sum(1) / (d + 1)).long()
        # rank of each coordinate of the residual (ties broken as densecrf does)
        di = elevated - rem0
        idx = torch.arange(d + 1, device=dev)
        later = idx[None, :] > idx[:, None]  # [a, j]: j > a
        gt = di[:, None, :] > di[:, :, None]  # [p, a, j]: di_j > di_a
        ge_before = (di[:, :, None] >= di[:, None, :]) & later[None]  # [p, i, a]: i < a and di_i >= di_a
        rank = (gt & later[None]).sum(2) + ge_before.sum(1)
        rank = rank + total[:, None]
        neg, over = rank < 0, rank > d
        rank = torch.where(neg, rank + d + 1, torch.where(over, rank - d - 1, rank))
        rem0 = torch.where(neg, rem0 + d + 1, torch.where(over, rem0 - d - 1, rem0))
        # barycentric coordinates
        vb = (elevated - rem0) / (d + 1)
        bary = torch.zeros(b * n, d + 2, device=dev)
        bary.scatter_add_(1, d - rank, vb)
        bary.scatter_add_(1, d - rank + 1, -vb)
        bary[:, 0] += 1.0 + bary[:, d + 1]
        self.weights = bary[:, : d + 1]  # (P, d+1)
        # the d+1 vertices of each point's simplex: key_i = rem0_i + canonical[r, rank_i], first d coords
        r = torch.arange(d + 1, device=dev)
        canonical = torch.where(idx[None, :] <= d - r[:, None], r[:, None], r[:, None] - (d + 1))  # (d+1, d+1)
        keys = rem0.long()[:, None, :d] + canonical[:, rank[:, :d]].permute(1, 0, 2)  # (P, d+1, d)
        # pack (image, key) into one int64
        lo = keys.amin(dim=(0, 1)) - (d + 2)
        span = keys.amax(dim=(0, 1)) - lo + (d + 2) + 1
        if float(span.double().prod()) * b >= 2**62:  # in float64: the int64 product itself would wrap around
            raise _too_wide(b, n)
        radix = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.long, device=dev), span]), 0)
        self._lo, self._radix = lo, radix
        image = torch.arange(b, device=dev).repeat_interleave(n)[:, None].expand(-1, d + 1)
        packed = self._pack(keys, image)
        self.keys_sorted, inverse = torch.unique(packed, return_inverse=True)  # sorted lattice points
        self.offsets = inverse  # (P, d+1) lattice index of each vertex
        self.m = self.keys_sorted.numel()
        # neighbours of every lattice point along each of the d+1 directions: the key minus 1 in
        # every coordinate but +d in coordinate j (j < d), or minus 1 in all (j = d), and the
        # opposite. The margins in lo/span keep every neighbour's coordinates inside their radix
        # digit, so packing is linear there and a neighbour's packed key is the point's plus a constant.
        # Each direction's pair is (lower, upper) in key order, so a blur row [lower, i, upper] is sorted.
        all_minus = -radix[:d].sum()
        self.neighbours = []
        for jdir in range(d + 1):
            step = (all_minus + (d + 1) * radix[jdir] if jdir < d else all_minus).abs()
            self.neighbours.append((self._find(self.keys_sorted - step), self._find(self.keys_sorted + step)))
        self.alpha = 1.0 / (1.0 + 2.0 ** (-d))
        self._build_operators(dev)
        self._grids: tuple[Tensor, Tensor] | None = None

    def _build_operators(self, dev: torch.device) -> None:
        """Splat, the d + 1 blurs and slice as sparse CSR matrices, built row-sorted directly
        (no coalesce). A filtering is then d + 3 sparse-dense products."""
        p, m, d = self.b * self.n, self.m, self.d
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            # slice: row = point, its d+1 vertices (columns sorted within the row)
            cols, order = self.offsets.sort(dim=1)
            vals = self.weights.gather(1, order) * self.alpha
            crow = torch.arange(0, p * (d + 1) + 1, d + 1, device=dev)
            self.slice = torch.sparse_csr_tensor(crow, cols.reshape(-1), vals.reshape(-1), (p, m))
            # splat: the transpose, rows = lattice points
            flat_rows = self.offsets.reshape(-1)
            by_row = torch.argsort(flat_rows * p + torch.arange(p, device=dev).repeat_interleave(d + 1))
            crow = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), torch.bincount(flat_rows, minlength=m).cumsum(0)])
            point = torch.arange(p, device=dev).repeat_interleave(d + 1)[by_row]
            self.splat = torch.sparse_csr_tensor(crow, point, self.weights.reshape(-1)[by_row], (m, p))
            # blurs: row i holds i (weight 1) and its two neighbours along the direction (1/2 each)
            ar = torch.arange(m, device=dev)
            self.blurs = []
            v = torch.tensor([0.5, 1.0, 0.5], device=dev).expand(m, 3)
            for lower, upper in self.neighbours:
                c = torch.stack([lower, ar, upper], 1)  # sorted within each row; m marks an absent neighbour
                keep = c < m
                crow = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), keep.sum(1).cumsum(0)])
                self.blurs.append(torch.sparse_csr_tensor(crow, c[keep], v[keep], (m, m)))

    def _pack(self, keys: Tensor, image: Tensor) -> Tensor:
        k = keys - self._lo
        return (k * self._radix[:-1]).sum(-1) + image * self._radix[-1]

    def _find(self, packed: Tensor) -> Tensor:
        """Index of each packed key among the lattice points, ``m`` where absent."""
        pos = torch.searchsorted(self.keys_sorted, packed).clamp_max(self.m - 1)
        return torch.where(self.keys_sorted[pos] == packed, pos, self.m)

    def filter(self, values: Tensor) -> Tensor:
        """Gaussian-filter per-point values: slice(blur_d(...blur_0(splat(values)))). (B*N, C) -> (B*N, C)."""
        values = values.float()
        c = values.shape[1]
        if self._grids is None or self._grids[0].shape[1] != c:  # two (M, C) buffers the blurs ping-pong between
            self._grids = (values.new_empty(self.m, c), values.new_empty(self.m, c))
        grid, spare = self._grids
        _spmm(self.splat, values, grid)
        for blur in self.blurs:  # [1/2, 1, 1/2] along each lattice direction; absent neighbours count 0
            _spmm(blur, grid, spare)
            grid, spare = spare, grid
        return _spmm(self.slice, grid, values.new_empty(self.b * self.n, c))


def _spmm(sparse: Tensor, dense: Tensor, out: Tensor) -> Tensor:
    """out = sparse @ dense. ``addmm`` with beta=0 into a preallocated ``out`` (beta=0: out's old
    contents are ignored, NaN included): on CPU 5-8x faster than ``sparse @ dense``, which
    zero-fills a fresh result and copies it between layouts (measured on a 500x375 bilateral lattice)."""
    return torch.addmm(out, sparse, dense, beta=0, out=out)


class _Kernel:
    def __init__(self, features: Tensor, weight: float) -> None:
        self.lattice = Lattice(features)
        ones = features.new_ones(features.shape[0] * features.shape[1], 1)
        self.norm = 1.0 / torch.sqrt(self.lattice.filter(ones) + 1e-20)  # (P, 1), symmetric normalisation
        self.weight = weight

    def message(self, q: Tensor) -> Tensor:
        return self.weight * self.norm * self.lattice.filter(q * self.norm)


def _features(images: Tensor, sxy: float, srgb: float | None) -> Tensor:
    b, h, w, _ = images.shape
    yy, xx = torch.meshgrid(
        torch.arange(h, device=images.device, dtype=torch.float32),
        torch.arange(w, device=images.device, dtype=torch.float32),
        indexing="ij",
    )
    pos = torch.stack([xx / sxy, yy / sxy], -1).reshape(1, h * w, 2).expand(b, -1, -1)
    if srgb is None:
        return pos
    return torch.cat([pos, images.reshape(b, h * w, 3).float() / srgb], -1)


def mean_field(
    images: Tensor,
    unary: Tensor,
    iters: int,
    gauss_sxy: float,
    gauss_compat: float,
    bi_sxy: float,
    bi_srgb: float,
    bi_compat: float,
) -> Tensor:
    """images: uint8 (B, H, W, 3); unary: (B, C, H, W) energies. Returns Q (B, C, H, W)."""
    b, c, h, w = unary.shape
    kernels = [_Kernel(_features(images, gauss_sxy, None), gauss_compat), _Kernel(_features(images, bi_sxy, bi_srgb), bi_compat)]
    u = unary.float().permute(0, 2, 3, 1).reshape(b * h * w, c)
    q = torch.softmax(-u, dim=1)
    for _ in range(iters):
        logits = -u
        for k in kernels:
            logits = logits + k.message(q)
        q = torch.softmax(logits, dim=1)
    return q.reshape(b, h, w, c).permute(0, 3, 1, 2)
