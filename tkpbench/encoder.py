"""Patch encoder: a timm Vision Transformer whose patch tokens feed the HV-BiLSTM (paper Sec. 3.2).

The class token (and any other prefix token) is dropped; the output is the final norm's output
for the patch tokens, ``(B, S, E)`` with ``S = (H / 16) * (W / 16)``. The ViT is created with
``dynamic_img_size=True`` so timm resamples its position embeddings to any input that is a
multiple of the patch size (pseudo masks are inferred at 960). Attention uses timm's fused
scaled-dot-product path.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from safetensors.torch import load_file as load_safetensors
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import Tensor, nn

from tkpbench.errors import WeightsError


def load_state_dict_file(path: Path) -> dict[str, Tensor]:
    """Read a ``.pth``/``.pt``/``.bin`` (torch) or ``.safetensors`` file into a flat state dict."""
    if path.suffix == ".safetensors":
        return load_safetensors(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_state"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def encoder_mean_std(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation of timm model ``name`` (its pretrained config; 0.5/0.5 when it has none)."""
    cfg = timm.models.get_pretrained_cfg(name)
    mean = getattr(cfg, "mean", None) or (0.5, 0.5, 0.5)
    std = getattr(cfg, "std", None) or (0.5, 0.5, 0.5)
    return tuple(mean), tuple(std)


class PatchEncoder(nn.Module):
    """ViT patch encoder. ``forward(x: (B, 3, H, W)) -> (tokens (B, S, E), grid (H/p, W/p))``."""

    def __init__(
        self,
        name: str = "vit_base_patch16_384.orig_in21k_ft_in1k",
        weights: str | Path | None = None,
        img_size: int = 384,
        **kwargs,
    ) -> None:
        super().__init__()
        self.name = name
        self.vit = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, img_size=img_size, **kwargs)
        self.patch_size = self.vit.patch_embed.patch_size[0]
        self.embed_dim = self.vit.embed_dim
        self.num_prefix_tokens = self.vit.num_prefix_tokens
        self.mean, self.std = encoder_mean_std(name)
        if weights:
            self.load_weights(Path(weights))

    def load_weights(self, path: Path) -> None:
        """Load a local ``.pth``/``.safetensors`` state dict or Google's original ``.npz``."""
        if not path.is_file():
            raise WeightsError(
                f"encoder weights file {path} does not exist. Expected the timm model '{self.name}' "
                "(e.g. the original ViT-B/16 384 in21k->in1k file jx_vit_base_p16_384-83fb41ba.pth or "
                "the timm hub's model.safetensors for this name). Put it there or set model.weights."
            )
        if path.suffix == ".npz":
            try:
                self.vit.load_pretrained(str(path))
            except Exception as e:  # timm raises KeyError/ValueError on a foreign npz
                raise WeightsError(f"{path}: not a Google ViT checkpoint for '{self.name}': {e}") from e
            return
        try:
            sd = load_state_dict_file(path)
        except Exception as e:
            raise WeightsError(f"{path}: cannot be read as a state dict ({e})") from e
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        try:
            sd = checkpoint_filter_fn(sd, self.vit)  # resamples pos_embed to this img_size
            missing, unexpected = self.vit.load_state_dict(sd, strict=False)
        except Exception as e:
            raise WeightsError(f"{path}: keys or shapes do not fit the timm model '{self.name}': {e}") from e
        missing = [k for k in missing if not k.startswith("head")]
        if missing or unexpected:
            raise WeightsError(
                f"{path}: does not fit the timm model '{self.name}': "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
            )

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input size {h}x{w} is not a multiple of the patch size {p}")
        tokens = self.vit.forward_features(x)  # (B, prefix + S, E), after the final norm
        return tokens[:, self.num_prefix_tokens :], (h // p, w // p)

    def freeze(self) -> None:
        """Freeze every encoder parameter (warm-up epochs)."""
        for prm in self.vit.parameters():
            prm.requires_grad_(False)

    def unfreeze(self, last_n_blocks: int) -> None:
        """Unfreeze the last ``last_n_blocks`` transformer blocks and the final norm only."""
        self.freeze()
        n = len(self.vit.blocks)
        if not 0 <= last_n_blocks <= n:
            raise ValueError(f"unfreeze needs 0 <= last_n_blocks <= {n}, got {last_n_blocks}")
        for blk in list(self.vit.blocks)[n - last_n_blocks :]:
            for prm in blk.parameters():
                prm.requires_grad_(True)
        for prm in self.vit.norm.parameters():
            prm.requires_grad_(True)
