"""ViT-PCM's equivariance loss ("ET", ``compute_cce_loss`` in its ``model.py``), reimplemented.

A second view of every training image (its own colour jitter, with probability ``data.et_crop_p``
a patch-aligned ``data.et_crop`` px crop, resized to half the training size, its own flips and
transposition) is tiled 2 x 2 into mosaics of the training size and classified. Each tile's patch
predictions must match, by categorical cross-entropy, the main view's predictions carried into
that tile's frame: the main view's flips undone, the ET view's crop, resize, flips and
transposition applied on the patch grid, then merged with the image's tags and detached. The
main view's predictions come from a forward pass in eval mode without gradient (ViT-PCM runs it
outside its gradient tape with ``training=False``).

A view's geometry is an int tensor ``(fliplr, flipud, transpose, y1, x1, y2, x2)``: the flags in
the order ViT-PCM applies them (left-right flip, up-down flip, then transposition, its "rot90"),
then the crop box in pixels of the square training-size image (the whole image when uncropped).
Everything here is batched: no Python loop over images, classes or patches.
"""

from __future__ import annotations

import torch
from torch import Tensor

KERAS_EPS = 1e-7  # Keras's categorical cross-entropy clips probabilities to [eps, 1 - eps]


def _where(flag: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(flag.reshape(-1, *([1] * (a.dim() - 1))).bool(), a, b)


def dihedral(x: Tensor, flags: Tensor, inverse: bool = False) -> Tensor:
    """Apply (or undo) per-sample flips and transposition to square maps.

    x: (B, ..., N, N); flags: (B, 3) as (fliplr, flipud, transpose). Forward order is ViT-PCM's:
    left-right flip, up-down flip, transpose; ``inverse`` undoes them in reverse order.
    """
    lr, ud, tr = flags[:, 0], flags[:, 1], flags[:, 2]
    steps = [(lr, lambda t: t.flip(-1)), (ud, lambda t: t.flip(-2)), (tr, lambda t: t.transpose(-1, -2))]
    for flag, op in reversed(steps) if inverse else steps:
        x = _where(flag, op(x), x)
    return x


def _lerp_along(x: Tensor, pos: Tensor, dim: int) -> Tensor:
    """Linear interpolation of x (B, C, H, W) along ``dim`` (2 or 3) at per-sample positions pos (B, size)."""
    xt = x.transpose(dim, -1)  # the interpolated axis last
    n = xt.shape[-1]
    lo = pos.floor().clamp(0, n - 1)
    frac = (pos - lo)[:, None, None, :]
    lo = lo.long()
    hi = (lo + 1).clamp(max=n - 1)
    shape = (*xt.shape[:-1], pos.shape[1])
    pick = lambda i: xt.gather(-1, i[:, None, None, :].expand(shape))  # noqa: E731
    return (pick(lo) * (1 - frac) + pick(hi) * frac).transpose(dim, -1)


def crop_resize(x: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Per-sample crop and bilinear resize with align_corners=True (ViT-PCM's ``resize``).

    x: (B, C, N, N) maps; boxes: (B, 4) float (y1, x1, y2, x2) in cells of x, end exclusive;
    returns (B, C, size, size). Output cell j samples input position y1 + j (h - 1) / (size - 1),
    exactly what ``tf.image.resize(..., align_corners=True)`` of the crop computes; positions are
    computed in cell units, so a crop resized to its own size is copied exactly.
    """
    j = torch.arange(size, device=x.device, dtype=torch.float32) / max(size - 1, 1)
    boxes = boxes.float()
    ys = boxes[:, 0:1] + j * (boxes[:, 2:3] - boxes[:, 0:1] - 1)  # (B, size) input rows
    xs = boxes[:, 1:2] + j * (boxes[:, 3:4] - boxes[:, 1:2] - 1)
    return _lerp_along(_lerp_along(x.float(), ys, 2), xs, 3)


def realign(z_grid: Tensor, main_geom: Tensor, et_geom: Tensor, patch: int, out_cells: int) -> Tensor:
    """The main view's patch scores carried into each ET view's frame (before the tag merge).

    z_grid: (B, C, N, N) main-view patch scores; main_geom, et_geom: (B, 7) view geometries;
    returns (B, C, out_cells, out_cells) in fp32.
    """
    p = dihedral(z_grid.float(), main_geom[:, :3], inverse=True)  # back to the image's own frame
    p = crop_resize(p, et_geom[:, 3:].float() / patch, out_cells)  # the ET view's crop, on the grid
    return dihedral(p, et_geom[:, :3])


def mosaic(views: Tensor) -> Tensor:
    """(4M, 3, s, s) ET views -> (M, 3, 2s, 2s): views 4m..4m+3 fill mosaic m's quarters in reading
    order (top-left, top-right, bottom-left, bottom-right)."""
    n, c, s, _ = views.shape
    if n % 4:
        raise ValueError(f"the equivariance view needs a multiple of 4 images, got {n}")
    return views.reshape(n // 4, 2, 2, c, s, s).permute(0, 3, 1, 4, 2, 5).reshape(n // 4, c, 2 * s, 2 * s)


def tiles(grid: Tensor) -> Tensor:
    """Inverse of ``mosaic`` on prediction maps: (M, C, 2g, 2g) -> (4M, C, g, g)."""
    m, c, h, w = grid.shape
    g = h // 2
    return grid.reshape(m, c, 2, g, 2, g).permute(0, 2, 4, 1, 3, 5).reshape(4 * m, c, g, g)


def equivariance_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Keras ``CategoricalCrossentropy`` averaged over images and patches, in fp32.

    pred, target: (B, C, g, g) class distributions (pred: softmax scores; target: ``realign`` merged with the tags, detached).
    """
    p = pred.float()
    p = p / p.sum(1, keepdim=True)
    p = p.clamp(KERAS_EPS, 1.0 - KERAS_EPS)
    return -(target.float() * p.log()).sum(1).mean()
