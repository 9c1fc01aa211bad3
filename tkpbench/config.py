"""One typed configuration for every stage, with the paper's values as defaults.

Configs are TOML files whose tables mirror the dataclasses below (``[model]``, ``[data]``,
``[train]``, ``[pseudo]``, ``[crf]``, ``[seg]``). A file may name a parent with
``base = "other.toml"`` (resolved relative to the file); its keys override the parent's.
Unknown keys, wrong types and values out of range (``RULES``) are errors that name the key, the
value, what is allowed and the file or ``--set`` the value came from; every stage checks the
whole config when it loads it.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tkpbench.errors import ConfigError
from tkpbench.io import atomic_write_text

__all__ = ["Config", "ConfigError", "load_config", "apply_overrides", "config_from_dict", "validate", "dumps"]


@dataclass
class ModelConfig:
    # timm name; ".orig_in21k_ft_in1k" is the original Google in21k->in1k ViT-B/16 384 that
    # ViT-PCM used (mean = std = 0.5).
    encoder: str = "vit_base_patch16_384.orig_in21k_ft_in1k"
    encoder_kwargs: dict = field(default_factory=dict)  # e.g. {depth = 2} for tiny demo encoders
    # local .pth / .safetensors / .npz (python -m tkpbench.data download weights --root weights);
    # "" = random init, for the demo and tests only
    weights: str = "weights/jx_vit_base_p16_384-83fb41ba.pth"
    img_size: int = 384
    num_classes: int = 21
    hidden: int = 192  # per LSTM direction; output 4 * hidden
    dropout: float = 0.2  # before the HV-BiLSTM and before the classifier
    # The paper is silent on the four below; tkpbench takes ViT-PCM's choices (its authors built on
    # ViT-PCM's code); README, Faithfulness. 0 / "torch" give PyTorch's plain modules.
    lstm_dropout: float = 0.2  # on each LSTM's inputs, one mask per sequence and direction (Keras LSTM(dropout=))
    encoder_dropout: float = 0.1  # ViT block dropout after attention and in the MLP (vit-keras 0.1)
    init: str = "keras"  # "keras": Glorot / orthogonal LSTMs with forget bias 1, classifier N(0, 0.05); "torch"
    pooling: str = "topk"  # "topk" | "max" | "avg"
    k: int = 6
    pce: bool = True
    eps: float = 0.85
    alpha: float = 0.01
    clamp: float = 1e-5  # y is clamped to [clamp, 1 - clamp] inside the BCE
    # ViT-PCM's two further loss terms (its voc12.yaml: LOSS_ET, LOSS_REG). The paper's Eq. 6 is
    # MCE + alpha * PCE, so TKP-PCL leaves them off; baselines/vit_pcm.toml turns them on.
    et: bool = False  # equivariance loss on a 2 x 2 mosaic of second views (tkpbench.equivariance)
    reg: float = 0.0  # L2 penalty reg * sum(W^2) on the classifier (ViT-PCM: 0.01)


@dataclass
class DataConfig:
    dataset: str = "voc"  # "voc" | "coco"
    root: str = "data/VOCdevkit/VOC2012"  # VOC: the VOC2012 folder; COCO: holds train2014/, annotations/
    train_split: str = "train_aug"
    val_split: str = "val"
    mask_split: str = "train"  # the split whose pseudo masks Table 1 scores
    seg_train_split: str = "train_aug"  # pseudo masks DeepLab trains on
    tags: str = "mask"  # VOC: "mask" (class set of the mask, like cls_labels.npy) or "xml"
    # COCO masks and images: "tkpbench" (every image, largest instance first, crowd 255) or
    # "vit_pcm" (its parse_coco.py: images >= 256 px with annotations, first annotation wins,
    # crowd keeps its class); the report names the protocol of every COCO figure
    coco_protocol: str = "tkpbench"
    workers: int = 4
    cache_images: bool = False  # keep resized uint8 images in memory
    # training augmentation of the main view: ViT-PCM's dataloader.py (SPEC Sec. 1; data.transforms.TKPViews)
    hflip: float = 0.5
    vflip: float = 0.5
    rot90: float = 0.5  # a transposition, as ViT-PCM's "rot90"
    # torchvision ColorJitter (brightness, contrast, saturation, hue), each a number or a [lo, hi]
    # range: ViT-PCM's color_transform (its brightness delta of 0.2 on 0-255 pixel values is a no-op)
    color_jitter: list = field(default_factory=lambda: [0.0, [0.5, 2.0], [0.5, 1.5], 0.1])
    grayscale: float = 0.1  # ViT-PCM's color_transform default (its yaml's PROB_COLOR_GRAY is never read)
    rrc_p: float = 0.0  # random resized crop of the main view; ViT-PCM: none ("a crop could change the labels")
    rrc_scale: list = field(default_factory=lambda: [0.5, 1.0])
    # with rrc_p > 0: "visible" = a crop only where every tagged class stays visible, "keep" = keep
    # the whole image's tags even when the crop cut an object away (tkpbench before #15)
    crop_tags: str = "visible"
    # the equivariance view (model.et): a patch-aligned crop of et_crop px with p = et_crop_p, then
    # half the training size (ViT-PCM: IMAGE.SIZE.CROP 128, SCALE 192, PROB_CROP 0.3 at 384)
    et_crop: int = 128
    et_crop_p: float = 0.3


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 16  # global, whatever the number of processes
    micro_batch: int = 0  # per-rank forward size; 0 = whole per-rank batch (no accumulation)
    warmup_epochs: int = 2  # encoder frozen, lr_warmup
    lr_warmup: float = 1e-3
    lr: float = 1e-4
    unfreeze_blocks: int = 5  # after warm-up: last N encoder blocks + final norm
    weight_decay: float = 0.0
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA; always fp32 on CPU
    ckpt_every: int = 500  # steps; plus one at each epoch's end
    keep_checkpoints: int = 2
    log_every: int = 20
    eval_every: int = 1  # epochs; 0 = never
    max_steps: int = 0  # 0 = run all epochs; >0 stops early (smoke runs)
    # which weights become final.pt: "best" (the evaluated epoch with the best val mIoU, as ViT-PCM's
    # save_best_only; the paper's "a maximum of 50 epochs" reads like it) or "last"
    keep: str = "best"
    # a fresh Adam when the encoder is unfrozen (ViT-PCM compiles a new optimiser there) or False to keep its state
    reset_optimizer_at_unfreeze: bool = True
    # early stopping: stop after this many evaluated epochs without a better val mIoU (ViT-PCM: 60); 0 = never
    patience: int = 0


@dataclass
class PseudoConfig:
    infer_size: int = 960
    batch_size: int = 4
    save_probs: bool = True
    # bilinear upsampling of the patch predictions: True (ViT-PCM's tf resize) or False (PyTorch's
    # default); also used by the per-epoch val mIoU
    align_corners: bool = True


@dataclass
class CRFConfig:
    iters: int = 10
    gauss_sxy: float = 1.0
    gauss_compat: float = 3.0
    bi_sxy: float = 67.0
    bi_srgb: float = 3.0
    bi_compat: float = 4.0
    workers: int = 0  # 0 = all cores (pydensecrf backend)
    backend: str = "pydensecrf"  # "pydensecrf" (reference) | "torch" (tkpbench.permutohedral, GPU-capable)
    device: str = ""  # torch backend: "" = cuda when available, else cpu


@dataclass
class SegConfig:
    backbone: str = "resnet101"
    output_stride: int = 8  # DeepLab-v2's 8; 16 (about 3x cheaper) only for the CPU demo
    weights: str = "weights/resnet101-63fe2227.pth"  # torchvision ImageNet ResNet; "" = random init (demo/tests)
    crop: int = 321
    batch_size: int = 10
    lr: float = 2.5e-4
    head_lr_mult: float = 10.0  # the ASPP's weights (deeplab-pytorch "10x")
    head_bias_lr_mult: float = 20.0  # the ASPP's biases (deeplab-pytorch "20x")
    bias_decay: bool = False  # weight decay on biases and BatchNorm affines (deeplab-pytorch: none on the 20x group)
    # multi-scale (MSC) training, DeepLab-v2 / deeplab-pytorch: the loss sums the logits at scale 1,
    # at each of these input scales and their max fusion; [] = single scale
    msc_scales: list = field(default_factory=lambda: [0.5, 0.75])
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    iters: int = 20000
    scale_range: list = field(default_factory=lambda: [0.5, 1.5])
    eval_scales: list = field(default_factory=lambda: [1.0])
    eval_flip: bool = False
    eval_crf: bool = False
    use_crf_masks: bool = True  # train on CRF-refined pseudo masks
    freeze_bn: bool = True  # DeepLab-v2 practice at batch 10: BatchNorm statistics and affine frozen
    workers: int = 4
    ckpt_every: int = 1000
    log_every: int = 20


@dataclass
class Config:
    name: str = ""  # run name; "" = derived from the config file name
    synthetic: bool = False  # generated demo data: never reported as a reproduction
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)
    seg: SegConfig = field(default_factory=SegConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {k: v for k, v in hints.items() if dataclasses.is_dataclass(v)}


def _check_type(value: Any, expected: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(expected) or expected
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif origin in (list, dict, str, float):
        ok = isinstance(value, origin)
    else:
        ok = True
    if not ok:
        raise ConfigError(
            f"{source}: key '{key}' must be of type {getattr(expected, '__name__', expected)}, "
            f"got {type(value).__name__} ({value!r})"
        )
    return value


def _merge(cfg: Config, raw: dict[str, Any], source: str) -> None:
    sections = _section_types()
    top_hints = typing.get_type_hints(Config)
    for key, value in raw.items():
        if key == "base":
            continue
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{key}' must be a table ([{key}]), got {value!r}")
            sub = getattr(cfg, key)
            hints = typing.get_type_hints(type(sub))
            for k2, v2 in value.items():
                if k2 not in hints:
                    known = ", ".join(hints)
                    raise ConfigError(f"{source}: unknown key '{key}.{k2}' (known keys of [{key}]: {known})")
                setattr(sub, k2, _check_type(v2, hints[k2], f"{key}.{k2}", source))
                _sources(cfg)[f"{key}.{k2}"] = source
        elif key in top_hints:
            setattr(cfg, key, _check_type(value, top_hints[key], key, source))
            _sources(cfg)[key] = source
        else:
            raise ConfigError(f"{source}: unknown key '{key}' (known: {', '.join(top_hints)}, base)")


def _sources(cfg: Config) -> dict[str, str]:
    """Where each key's value came from (a file or an override); not part of the config's data."""
    return cfg.__dict__.setdefault("_sources", {})


def _num(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    def check(v: Any) -> str | None:
        if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and (v > hi or (hi_open and v == hi))):
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            return f"a number in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        return None

    return check


def _choice(*options: str):
    return lambda v: None if v in options else "one of " + ", ".join(repr(o) for o in options)


def _pair(lo: float, hi: float | None):
    def check(v: Any) -> str | None:
        ok = (
            len(v) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            and lo < v[0] <= v[1]
            and (hi is None or v[1] <= hi)
        )
        return None if ok else f"two numbers [a, b] with {lo} < a <= b" + (f" <= {hi}" if hi is not None else "")

    return check


def _numbers(n: int | None, lo: float):
    def check(v: Any) -> str | None:
        ok = (
            (n is None or len(v) == n)
            and len(v) > 0
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= lo for x in v)
        )
        return None if ok else f"a list of {n or 'one or more'} numbers >= {lo}"

    return check


def _jitter(v: Any) -> str | None:
    ok = len(v) == 4 and all(
        (isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0)
        or (isinstance(x, list) and len(x) == 2 and all(isinstance(y, (int, float)) for y in x) and 0 <= x[0] <= x[1])
        for x in v
    )
    return None if ok else "four entries (brightness, contrast, saturation, hue), each a number >= 0 or a range [lo, hi]"


POS, NONNEG, PROB = _num(0, lo_open=True), _num(0), _num(0, 1)
AT_LEAST_1 = _num(1)
# The allowed values of every key that has limits; checked whenever a config is loaded.
RULES: dict[str, Any] = {
    "model.img_size": _num(16),
    "model.num_classes": _num(2),
    "model.hidden": AT_LEAST_1,
    "model.dropout": _num(0, 1, hi_open=True),
    "model.pooling": _choice("topk", "max", "avg"),
    "model.k": AT_LEAST_1,
    "model.eps": _num(0.5, 1, lo_open=True, hi_open=True),
    "model.alpha": NONNEG,
    "model.clamp": _num(0, 0.5, lo_open=True, hi_open=True),
    "model.lstm_dropout": _num(0, 1, hi_open=True),
    "model.encoder_dropout": _num(0, 1, hi_open=True),
    "model.init": _choice("keras", "torch"),
    "model.reg": NONNEG,
    "data.dataset": _choice("voc", "coco"),
    "data.tags": _choice("mask", "xml"),
    "data.coco_protocol": _choice("tkpbench", "vit_pcm"),
    "data.workers": NONNEG,
    "data.hflip": PROB,
    "data.vflip": PROB,
    "data.rot90": PROB,
    "data.grayscale": PROB,
    "data.rrc_p": PROB,
    "data.crop_tags": _choice("visible", "keep"),
    "data.et_crop": _num(16),
    "data.et_crop_p": PROB,
    "data.color_jitter": _jitter,
    "data.rrc_scale": _pair(0, 1),
    "train.epochs": AT_LEAST_1,
    "train.batch_size": AT_LEAST_1,
    "train.micro_batch": NONNEG,
    "train.warmup_epochs": NONNEG,
    "train.lr_warmup": POS,
    "train.lr": POS,
    "train.unfreeze_blocks": NONNEG,
    "train.weight_decay": NONNEG,
    "train.seed": NONNEG,
    "train.ckpt_every": AT_LEAST_1,
    "train.keep_checkpoints": AT_LEAST_1,
    "train.log_every": AT_LEAST_1,
    "train.eval_every": NONNEG,
    "train.max_steps": NONNEG,
    "train.keep": _choice("last", "best"),
    "train.patience": NONNEG,
    "pseudo.infer_size": _num(16),
    "pseudo.batch_size": AT_LEAST_1,
    "crf.iters": AT_LEAST_1,
    "crf.gauss_sxy": POS,
    "crf.gauss_compat": NONNEG,
    "crf.bi_sxy": POS,
    "crf.bi_srgb": POS,
    "crf.bi_compat": NONNEG,
    "crf.workers": NONNEG,
    "crf.backend": _choice("pydensecrf", "torch"),
    "crf.device": lambda v: None if v in ("", "cpu") or v.startswith("cuda") else "'', 'cpu' or 'cuda[:N]'",
    "seg.backbone": _choice("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"),
    "seg.output_stride": lambda v: None if v in (8, 16) else "8 (DeepLab-v2) or 16",
    "seg.crop": _num(16),
    "seg.batch_size": AT_LEAST_1,
    "seg.lr": POS,
    "seg.head_lr_mult": POS,
    "seg.head_bias_lr_mult": POS,
    "seg.msc_scales": lambda v: None if all(isinstance(x, (int, float)) and 0 < x < 1 for x in v) else "scales in (0, 1), or []",
    "seg.momentum": _num(0, 1, hi_open=True),
    "seg.weight_decay": NONNEG,
    "seg.poly_power": NONNEG,
    "seg.iters": AT_LEAST_1,
    "seg.scale_range": _pair(0, None),
    "seg.eval_scales": _numbers(None, 0.05),
    "seg.workers": NONNEG,
    "seg.ckpt_every": AT_LEAST_1,
    "seg.log_every": AT_LEAST_1,
}


def validate(cfg: Config) -> Config:
    """Check every key of ``RULES``; raise ConfigError naming the key, value, what is allowed and its source."""
    d = cfg.to_dict()
    if d["train"]["keep"] == "best" and d["train"]["eval_every"] < 1:
        src = _sources(cfg).get("train.keep", "the config")
        raise ConfigError(
            f"{src}: train.keep = 'best' needs an evaluation every epoch; set train.eval_every = 1 (or keep = 'last')"
        )
    if d["model"]["et"] and (d["model"]["img_size"] % 32 or d["data"]["et_crop"] > d["model"]["img_size"]):
        src = _sources(cfg).get("model.et", "the config")
        raise ConfigError(
            f"{src}: model.et needs model.img_size divisible by 32 (its mosaic tiles are img_size / 2 and whole "
            f"patches) and data.et_crop <= img_size; got img_size {d['model']['img_size']}, et_crop {d['data']['et_crop']}"
        )
    for key, rule in RULES.items():
        sec, name = key.split(".")
        value = d[sec][name]
        allowed = rule(value)
        if allowed:
            src = _sources(cfg).get(key, "the defaults of tkpbench/config.py")
            raise ConfigError(f"{src}: {key} = {value!r} is not allowed; expected {allowed}")
    return cfg


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a TOML file such as baselines/topk_pce.toml")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config (following ``base`` chains) and apply ``key.sub=value`` overrides."""
    cfg = Config()
    if path is not None:
        chain: list[tuple[Path, dict]] = []
        p: Path | None = Path(path)
        seen: set[Path] = set()
        while p is not None:
            p = p.resolve()
            if p in seen:
                raise ConfigError(f"{p}: 'base' chain loops back to itself")
            seen.add(p)
            raw = _read_toml(p)
            chain.append((p, raw))
            base = raw.get("base")
            p = (p.parent / base) if base else None
        for p, raw in reversed(chain):
            _merge(cfg, raw, str(p))
        if not cfg.name:
            cfg.name = Path(path).stem
    return apply_overrides(cfg, overrides or [])


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (values parsed as TOML, bare words as strings)."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like section.key=value (e.g. data.root=/data/VOC2012)")
        key, text = ov.split("=", 1)
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # bare strings need no quotes on the command line
        parts = key.strip().split(".")
        raw: dict[str, Any] = {parts[-1]: value}
        for part in reversed(parts[:-1]):
            raw = {part: raw}
        _merge(cfg, raw, f"--set {ov}")
    return validate(cfg)


def config_from_dict(d: dict[str, Any], source: str = "checkpoint") -> Config:
    cfg = Config()
    _merge(cfg, d, source)
    return validate(cfg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps(cfg: Config) -> str:
    d = cfg.to_dict()
    lines = []
    for k, v in d.items():
        if not isinstance(v, dict):
            lines.append(f"{k} = {_toml_value(v)}")
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines.extend(f"{k2} = {_toml_value(v2)}" for k2, v2 in v.items())
    return "\n".join(lines) + "\n"


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(Path(path), dumps(cfg))


def diff_configs(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ between two config dicts, as 'key: a -> b' lines."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and k != "encoder_kwargs":
            out.extend(diff_configs(va, vb, f"{prefix}{k}."))
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out
