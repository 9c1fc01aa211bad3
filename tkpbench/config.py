"""One typed configuration for every stage, with the paper's values as defaults.

Configs are TOML files whose tables mirror the dataclasses below (``[model]``, ``[data]``,
``[train]``, ``[pseudo]``, ``[crf]``, ``[seg]``). A file may name a parent with
``base = "other.toml"`` (resolved relative to the file); its keys override the parent's.
Unknown keys, wrong types and values out of range are errors that name the key, the value, what
is allowed and the file or ``--set`` the value came from; every stage checks the whole config
when it loads it.

**Every field is declared once, beside its default** (``key(default, stages, check)``): which
stages' outputs it changes (``TRAIN``, ``PSEUDO``, ``CRF``, ``MASK``, ``SEG``, ``SEG_EVAL``; a
change redoes that stage and every stage after it) or ``RUNTIME`` (speed or bookkeeping only),
and the check of its value. ``RULES``, ``stage_keys`` (what the run folder's markers and the
records store) and ``RUNTIME_KEYS`` are derived from these declarations; nothing else lists keys.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tkpbench.errors import ConfigError
from tkpbench.io import atomic_write_text

__all__ = ["Config", "ConfigError", "load_config", "apply_overrides", "config_from_dict", "validate", "dumps"]

# ---------------------------------------------------------------------------------------------- stages

# The stages of one chain and the stages each one reads the outputs of. Training's outputs are
# named by final.pt's digest; every later stage's marker or record also stores the values of its
# own keys and those of the stages it reads (``chain_keys``).
STAGES: dict[str, tuple[str, ...]] = {
    "train": (),  # final.pt
    "pseudo": ("train",),  # pseudo masks (and probabilities) of a split
    "crf": ("pseudo",),  # the CRF-refined masks
    "mask": ("crf",),  # Table 1: the masks' mIoU on data.mask_split (results/<run>/summary.json "mask")
    "seg": ("crf",),  # DeepLab trained on the (refined) pseudo masks
    "seg_eval": ("seg",),  # Tables 2-3: DeepLab's mIoU on data.val_split ("seg")
}
TRAIN, PSEUDO, CRF, MASK, SEG, SEG_EVAL = (("train",), ("pseudo",), ("crf",), ("mask",), ("seg",), ("seg_eval",))
RUNTIME: tuple[str, ...] = ()  # changes only speed or bookkeeping, never an output

Check = Callable[[Any], "str | None"]  # None when the value is allowed, else what is allowed

# ---------------------------------------------------------------------------------------------- checks


def _num(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and (v > hi or (hi_open and v == hi))):
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            return f"a number in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        return None

    return check


def _choice(*options: Any) -> Check:
    return lambda v: None if v in options else "one of " + ", ".join(repr(o) for o in options)


def _pair(lo: float, hi: float | None) -> Check:
    def check(v: Any) -> str | None:
        ok = (
            len(v) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            and lo < v[0] <= v[1]
            and (hi is None or v[1] <= hi)
        )
        return None if ok else f"two numbers [a, b] with {lo} < a <= b" + (f" <= {hi}" if hi is not None else "")

    return check


def _numbers(n: int | None, lo: float) -> Check:
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


def _device(v: Any) -> str | None:
    return None if v in ("", "cpu") or v.startswith("cuda") else "'', 'cpu' or 'cuda[:N]'"


def _msc(v: Any) -> str | None:
    return None if all(isinstance(x, (int, float)) and 0 < x < 1 for x in v) else "scales in (0, 1), or []"


POS, NONNEG, PROB = _num(0, lo_open=True), _num(0), _num(0, 1)
AT_LEAST_1 = _num(1)
DROPOUT = _num(0, 1, hi_open=True)


def key(default: Any, stages: tuple[str, ...], check: Check | None = None) -> Any:
    """A config field: its default, the stages whose outputs it changes (``RUNTIME``: none), and the
    check of its value (types are checked from the annotation)."""
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)} (known: {list(STAGES)})")
    meta = {"stages": tuple(stages), "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------- the config


@dataclass
class ModelConfig:
    # timm name; ".orig_in21k_ft_in1k" is the original Google in21k->in1k ViT-B/16 384 that
    # ViT-PCM used (mean = std = 0.5).
    encoder: str = key("vit_base_patch16_384.orig_in21k_ft_in1k", TRAIN)
    encoder_kwargs: dict = key({}, TRAIN)  # e.g. {depth = 2} for tiny demo encoders
    # local .pth / .safetensors / .npz (python -m tkpbench.data download weights --root weights);
    # "" = random init, for the demo and tests only
    weights: str = key("weights/jx_vit_base_p16_384-83fb41ba.pth", TRAIN)
    img_size: int = key(384, TRAIN, _num(16))
    num_classes: int = key(21, TRAIN, _num(2))
    hidden: int = key(192, TRAIN, AT_LEAST_1)  # per LSTM direction; output 4 * hidden
    dropout: float = key(0.2, TRAIN, DROPOUT)  # before the HV-BiLSTM and before the classifier
    # The paper is silent on the four below; tkpbench takes ViT-PCM's choices (its authors built on
    # ViT-PCM's code); README, Faithfulness. 0 / "torch" give PyTorch's plain modules.
    # on each LSTM's inputs, one mask per sequence and direction (Keras LSTM(dropout=))
    lstm_dropout: float = key(0.2, TRAIN, DROPOUT)
    encoder_dropout: float = key(0.1, TRAIN, DROPOUT)  # ViT block dropout after attention and in the MLP (vit-keras 0.1)
    # "keras": Glorot / orthogonal LSTMs with forget bias 1, classifier N(0, 0.05); "torch"
    init: str = key("keras", TRAIN, _choice("keras", "torch"))
    pooling: str = key("topk", TRAIN, _choice("topk", "max", "avg"))
    k: int = key(6, TRAIN, AT_LEAST_1)
    pce: bool = key(True, TRAIN)
    eps: float = key(0.85, TRAIN, _num(0.5, 1, lo_open=True, hi_open=True))
    alpha: float = key(0.01, TRAIN, NONNEG)
    clamp: float = key(1e-5, TRAIN, _num(0, 0.5, lo_open=True, hi_open=True))  # y is clamped to [clamp, 1 - clamp] in the BCE
    # ViT-PCM's two further loss terms (its voc12.yaml: LOSS_ET, LOSS_REG). The paper's Eq. 6 is
    # MCE + alpha * PCE, so TKP-PCL leaves them off; baselines/vit_pcm.toml turns them on.
    et: bool = key(False, TRAIN)  # equivariance loss on a 2 x 2 mosaic of second views (tkpbench.equivariance)
    reg: float = key(0.0, TRAIN, NONNEG)  # L2 penalty reg * sum(W^2) on the classifier (ViT-PCM: 0.01)


@dataclass
class DataConfig:
    dataset: str = key("voc", TRAIN + PSEUDO, _choice("voc", "coco"))
    # VOC: the VOC2012 folder; COCO: holds train2014/, annotations/. A relative path is relative to
    # the folder a command runs in (the repository for reproduce.sh and make)
    root: str = key("data/VOCdevkit/VOC2012", TRAIN + PSEUDO)
    train_split: str = key("train_aug", TRAIN)
    val_split: str = key("val", TRAIN + SEG_EVAL)  # training: per-epoch val mIoU (train.keep = "best")
    mask_split: str = key("train", MASK)  # the split whose pseudo masks Table 1 scores
    seg_train_split: str = key("train_aug", SEG)  # pseudo masks DeepLab trains on
    # VOC: "mask" (class set of the mask, like cls_labels.npy) or "xml"
    tags: str = key("mask", TRAIN + PSEUDO, _choice("mask", "xml"))
    # COCO masks and images: "tkpbench" (every image, largest instance first, crowd 255) or
    # "vit_pcm" (its parse_coco.py: images >= 256 px with annotations, first annotation wins,
    # crowd keeps its class); the report names the protocol of every COCO figure
    coco_protocol: str = key("tkpbench", TRAIN + PSEUDO, _choice("tkpbench", "vit_pcm"))
    workers: int = key(4, RUNTIME, NONNEG)
    cache_images: bool = key(False, RUNTIME)  # keep resized uint8 images in memory
    # training augmentation of the main view: ViT-PCM's dataloader.py (SPEC Sec. 1; data.transforms.TKPViews)
    hflip: float = key(0.5, TRAIN, PROB)
    vflip: float = key(0.5, TRAIN, PROB)
    rot90: float = key(0.5, TRAIN, PROB)  # a transposition, as ViT-PCM's "rot90"
    # torchvision ColorJitter (brightness, contrast, saturation, hue), each a number or a [lo, hi]
    # range: ViT-PCM's color_transform (its brightness delta of 0.2 on 0-255 pixel values is a no-op)
    color_jitter: list = key([0.0, [0.5, 2.0], [0.5, 1.5], 0.1], TRAIN, _jitter)
    grayscale: float = key(0.1, TRAIN, PROB)  # ViT-PCM's color_transform default (its yaml's PROB_COLOR_GRAY is never read)
    rrc_p: float = key(0.0, TRAIN, PROB)  # random resized crop of the main view; ViT-PCM: none ("a crop could change the labels")
    rrc_scale: list = key([0.5, 1.0], TRAIN, _pair(0, 1))
    # with rrc_p > 0: "visible" = a crop only where every tagged class stays visible, "keep" = keep
    # the whole image's tags even when the crop cut an object away (tkpbench before #15)
    crop_tags: str = key("visible", TRAIN, _choice("visible", "keep"))
    # the equivariance view (model.et): a patch-aligned crop of et_crop px with p = et_crop_p, then
    # half the training size (ViT-PCM: IMAGE.SIZE.CROP 128, SCALE 192, PROB_CROP 0.3 at 384)
    et_crop: int = key(128, TRAIN, _num(16))
    et_crop_p: float = key(0.3, TRAIN, PROB)


@dataclass
class TrainConfig:
    epochs: int = key(50, TRAIN, AT_LEAST_1)
    batch_size: int = key(16, TRAIN, AT_LEAST_1)  # global, whatever the number of processes
    micro_batch: int = key(0, TRAIN, NONNEG)  # per-rank forward size; 0 = whole per-rank batch (no accumulation)
    warmup_epochs: int = key(2, TRAIN, NONNEG)  # encoder frozen, lr_warmup
    lr_warmup: float = key(1e-3, TRAIN, POS)
    lr: float = key(1e-4, TRAIN, POS)
    unfreeze_blocks: int = key(5, TRAIN, NONNEG)  # after warm-up: last N encoder blocks + final norm
    weight_decay: float = key(0.0, TRAIN, NONNEG)
    seed: int = key(0, TRAIN + SEG, NONNEG)  # training's, and DeepLab's
    # bf16 autocast on CUDA (training, pseudo-mask inference, DeepLab); always fp32 on CPU
    amp: bool = key(True, TRAIN + PSEUDO + SEG + SEG_EVAL)
    # deterministic kernels (torch.use_deterministic_algorithms, cuDNN deterministic,
    # CUBLAS_WORKSPACE_CONFIG): bit-for-bit resume on CUDA. Other kernels than the default ones:
    # equal to float rounding, not bit for bit, so declared RUNTIME (a resume may switch it on);
    # README, "Resume and determinism"
    deterministic: bool = key(False, RUNTIME)
    ckpt_every: int = key(500, RUNTIME, AT_LEAST_1)  # steps; plus one at each epoch's end
    keep_checkpoints: int = key(2, RUNTIME, AT_LEAST_1)
    log_every: int = key(20, RUNTIME, AT_LEAST_1)
    # epochs; 0 = never. Not runtime-only: with keep = "best" it decides which epoch becomes final.pt
    eval_every: int = key(1, TRAIN, NONNEG)
    max_steps: int = key(0, TRAIN, NONNEG)  # 0 = run all epochs; >0 stops early (smoke runs)
    # which weights become final.pt: "best" (the evaluated epoch with the best val mIoU, as ViT-PCM's
    # save_best_only; the paper's "a maximum of 50 epochs" reads like it) or "last"
    keep: str = key("best", TRAIN, _choice("last", "best"))
    # a fresh Adam when the encoder is unfrozen (ViT-PCM compiles a new optimiser there) or False to keep its state
    reset_optimizer_at_unfreeze: bool = key(True, TRAIN)
    # early stopping: stop after this many evaluated epochs without a better val mIoU (ViT-PCM: 60); 0 = never
    patience: int = key(0, TRAIN, NONNEG)


@dataclass
class PseudoConfig:
    infer_size: int = key(960, PSEUDO, _num(16))
    batch_size: int = key(4, RUNTIME, AT_LEAST_1)  # per process
    save_probs: bool = key(True, PSEUDO)
    # bilinear upsampling of the patch predictions: True (ViT-PCM's tf resize) or False (PyTorch's
    # default); also used by the per-epoch val mIoU, hence training's too
    align_corners: bool = key(True, TRAIN + PSEUDO)


@dataclass
class CRFConfig:
    iters: int = key(10, CRF, AT_LEAST_1)
    gauss_sxy: float = key(1.0, CRF, POS)
    gauss_compat: float = key(3.0, CRF, NONNEG)
    bi_sxy: float = key(67.0, CRF, POS)
    bi_srgb: float = key(3.0, CRF, POS)
    bi_compat: float = key(4.0, CRF, NONNEG)
    workers: int = key(0, RUNTIME, NONNEG)  # pydensecrf processes; 0 = this process's share of the CPUs it may use
    # "pydensecrf" (reference) | "torch" (tkpbench.permutohedral, GPU-capable)
    backend: str = key("pydensecrf", CRF, _choice("pydensecrf", "torch"))
    device: str = key("", RUNTIME, _device)  # torch backend: "" = this process's CUDA device when there is one, else cpu


@dataclass
class SegConfig:
    backbone: str = key("resnet101", SEG, _choice("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"))
    # DeepLab-v2's 8; 16 (about 3x cheaper) only for the CPU demo
    output_stride: int = key(8, SEG, lambda v: None if v in (8, 16) else "8 (DeepLab-v2) or 16")
    weights: str = key("weights/resnet101-63fe2227.pth", SEG)  # torchvision ImageNet ResNet; "" = random init (demo/tests)
    crop: int = key(321, SEG, _num(16))
    batch_size: int = key(10, SEG, AT_LEAST_1)  # global, whatever the number of processes
    lr: float = key(2.5e-4, SEG, POS)
    head_lr_mult: float = key(10.0, SEG, POS)  # the ASPP's weights (deeplab-pytorch "10x")
    head_bias_lr_mult: float = key(20.0, SEG, POS)  # the ASPP's biases (deeplab-pytorch "20x")
    # weight decay on biases and BatchNorm affines (deeplab-pytorch: none on the 20x group)
    bias_decay: bool = key(False, SEG)
    # multi-scale (MSC) training, DeepLab-v2 / deeplab-pytorch: the loss sums the logits at scale 1,
    # at each of these input scales and their max fusion; [] = single scale
    msc_scales: list = key([0.5, 0.75], SEG, _msc)
    # where each (MSC) output meets its labels: "output_stride" = deeplab-pytorch's (logits kept at
    # the output stride, labels resized down to each with PIL nearest) or "input" = tkpbench before
    # 0.x (logits upsampled to the input size, labels resized with F.interpolate nearest)
    loss_at: str = key("output_stride", SEG, _choice("output_stride", "input"))
    momentum: float = key(0.9, SEG, _num(0, 1, hi_open=True))
    weight_decay: float = key(5e-4, SEG, NONNEG)
    poly_power: float = key(0.9, SEG, NONNEG)
    iters: int = key(20000, SEG, AT_LEAST_1)
    scale_range: list = key([0.5, 1.5], SEG, _pair(0, None))
    eval_scales: list = key([1.0], SEG_EVAL, _numbers(None, 0.05))
    eval_flip: bool = key(False, SEG_EVAL)
    eval_crf: bool = key(False, SEG_EVAL)
    use_crf_masks: bool = key(True, SEG)  # train on CRF-refined pseudo masks
    freeze_bn: bool = key(True, SEG)  # DeepLab-v2 practice at batch 10: BatchNorm statistics and affine frozen
    workers: int = key(4, RUNTIME, NONNEG)
    ckpt_every: int = key(1000, RUNTIME, AT_LEAST_1)
    log_every: int = key(20, RUNTIME, AT_LEAST_1)


@dataclass
class Config:
    name: str = key("", RUNTIME)  # run name; "" = derived from the config file name
    synthetic: bool = key(False, TRAIN)  # generated demo data: never reported as a reproduction
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)
    seg: SegConfig = field(default_factory=SegConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- derived from the declarations


@functools.cache
def declarations(root: type = Config) -> dict[str, dict[str, Any]]:
    """Every key of the config class ``root`` ("section.name", or "name" at the top) -> its
    declaration {"stages", "check"}. A field defined without ``key(...)`` is an error: every key
    says what it changes."""
    out: dict[str, dict[str, Any]] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{f.name}.")
            elif "stages" not in f.metadata:
                raise TypeError(f"config key {prefix}{f.name} is not declared with config.key(default, stages, check)")
            else:
                out[prefix + f.name] = dict(f.metadata)

    walk(root, "")
    return out


def stage_keys(stage: str, root: type = Config) -> tuple[str, ...]:
    """The keys whose value changes ``stage``'s own outputs, in declaration order."""
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r} (known: {list(STAGES)})")
    return tuple(k for k, d in declarations(root).items() if stage in d["stages"])


def rules(root: type = Config) -> dict[str, Check]:
    """The check of every key that has one."""
    return {k: d["check"] for k, d in declarations(root).items() if d["check"] is not None}


def upstream(stage: str) -> list[str]:
    """``stage`` and every stage whose outputs it reads, directly or not, in chain order."""
    seen: list[str] = []

    def visit(s: str) -> None:
        for parent in STAGES[s]:
            visit(parent)
        if s not in seen:
            seen.append(s)

    visit(stage)
    return seen


def downstream(stage: str) -> list[str]:
    """``stage`` and every stage that reads its outputs, directly or not, in chain order."""
    return [s for s in STAGES if stage in upstream(s)]


RULES: dict[str, Check] = rules()
RUNTIME_KEYS: tuple[str, ...] = tuple(k for k, d in declarations().items() if not d["stages"])


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
    for key, rule in rules(type(cfg)).items():
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
