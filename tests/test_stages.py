"""One declaration per config key: what it changes, and that the pipeline redoes exactly that.

Every field of ``tkpbench.config`` is declared with ``key(default, stages, check)``; the stage
settings, the runtime keys, the training and DeepLab resume views and the checks are derived from
it. These tests tie the declarations to what the pipeline does: changing any one declared key of
a stage redoes that stage and every stage after it, and nothing else.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from tkpbench import config as C
from tkpbench.config import RUNTIME_KEYS, STAGES, Config, ConfigError, declarations, downstream, validate
from tkpbench.pipeline import Chain, PipelineError, check_same_config, steps
from tkpbench.records import SCHEMA_VERSION
from tkpbench.runs import ResultsDir, RunDir, chain_settings, mark_done, model_digest, training_view

# strings a choice key may take (its check says which of them it allows)
WORDS = [
    "max",
    "avg",
    "topk",
    "torch",
    "keras",
    "coco",
    "xml",
    "vit_pcm",
    "keep",
    "last",
    "best",
    "resnet50",
    "cpu",
    "input",
    "x",
]


def _get(cfg: Config, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set(cfg: Config, dotted: str, value) -> None:
    *path, name = dotted.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, name, value)


def changed(cfg: Config, dotted: str) -> Config:
    """A copy of ``cfg`` with ``dotted`` set to another value that the config accepts."""
    v = _get(cfg, dotted)
    if isinstance(v, bool):
        cands = [not v]
    elif isinstance(v, int):
        cands = [v * 2, v + 1, 16, 0]
    elif isinstance(v, float):
        cands = [v * 0.9, v / 2, 0.5, 0.6]
    elif isinstance(v, str):
        cands = [w for w in WORDS if w != v] + [v + "x"]
    elif isinstance(v, list):
        cands = [[], [0.3], [0.4, 0.9], v[:1], [*v, v[-1]], [1.0, 2.0], [0.1, 0.2, 0.3, 0.0]]
    else:
        cands = [{"depth": 2}]
    for c in cands:
        out = copy.deepcopy(cfg)
        _set(out, dotted, c)
        if c == v:
            continue
        try:
            return validate(out)
        except ConfigError:
            continue
    raise AssertionError(f"no other valid value found for {dotted} (value {v!r})")


DECLARED = declarations()


# classes at module level: the annotations are strings (``from __future__ import annotations``)
@dataclasses.dataclass
class Undeclared:
    fine: int = C.key(1, C.TRAIN)
    forgotten: int = 3


@dataclasses.dataclass
class Root:
    fine: int = C.key(1, C.TRAIN)
    part: Undeclared = dataclasses.field(default_factory=Undeclared)


@dataclasses.dataclass
class CRF2(C.CRFConfig):  # a new CRF key, declared in the one place a key is declared
    smoothness: float = C.key(1.0, C.CRF, C.POS)


@dataclasses.dataclass
class Config2(Config):
    crf: CRF2 = dataclasses.field(default_factory=CRF2)


STAGE_KEYS = sorted(k for k, d in DECLARED.items() if d["stages"])


def test_every_field_is_declared_and_an_undeclared_one_is_refused():
    fields = []

    def walk(cls, prefix=""):
        for f in dataclasses.fields(cls):
            t = C.typing.get_type_hints(cls)[f.name]
            walk(t, f"{f.name}.") if dataclasses.is_dataclass(t) else fields.append(prefix + f.name)

    walk(Config)
    assert sorted(DECLARED) == sorted(fields)
    assert set(C.RULES) <= set(DECLARED) and set(RUNTIME_KEYS) <= set(DECLARED)

    with pytest.raises(TypeError, match=r"part\.forgotten is not declared"):
        declarations(Root)
    with pytest.raises(ValueError, match="unknown stages"):
        C.key(1, ("trian",))


def test_the_defects_of_the_hand_written_lists_are_declared():
    for k in ("seg.msc_scales", "seg.head_bias_lr_mult", "seg.bias_decay"):
        assert "seg" in DECLARED[k]["stages"]
    assert "seg_eval" in DECLARED["data.val_split"]["stages"]
    assert "train" in DECLARED["train.eval_every"]["stages"]  # with keep = best it picks final.pt's epoch
    assert "mask" in DECLARED["data.mask_split"]["stages"]
    for k in ("data.workers", "seg.workers", "crf.workers", "train.log_every", "train.ckpt_every", "name"):
        assert k in RUNTIME_KEYS


@pytest.mark.parametrize("dotted", sorted(DECLARED))
def test_changing_a_key_changes_exactly_the_settings_of_its_stages_and_those_after(dotted):
    base = Config()
    new = changed(base, dotted)
    declared = DECLARED[dotted]["stages"]
    affected = {s for st in declared for s in downstream(st)}
    assert (training_view(base) != training_view(new)) == ("train" in declared)
    for stage in STAGES:
        if stage == "train":
            continue
        differs = chain_settings(stage, base) != chain_settings(stage, new)
        # training's keys reach the later stages through final.pt's digest, not their settings
        expect = stage in affected and any(s != "train" for s in declared)
        expect = expect and any(stage in downstream(s) for s in declared if s != "train")
        assert differs == expect, (dotted, stage)


def _finished_chain(tmp_path: Path, cfg: Config) -> tuple[Chain, ResultsDir]:
    """A run folder and results that say every stage is done for ``cfg`` (markers and records)."""
    run = RunDir(tmp_path / "runs" / cfg.name)
    (run.root / "seg").mkdir(parents=True)
    run.final.write_bytes(b"tkp weights")
    run.seg.final.write_bytes(b"deeplab weights")
    run.config.write_text(C.dumps(cfg))
    chain = Chain(cfg, [], run, seg=True)
    for split in chain.splits():
        mark_done(run, "pseudo", cfg, split)
        mark_done(run, "crf", cfg, split)
    mark_done(run, "seg", cfg)
    results = ResultsDir(tmp_path / "results")
    records = {
        "mask": {"model_sha256": model_digest(run.final), "settings": chain_settings("mask", cfg)},
        "seg": {"model_sha256": model_digest(run.seg.final), "settings": chain_settings("seg_eval", cfg)},
    }
    results.summary(cfg.name).parent.mkdir(parents=True)
    results.summary(cfg.name).write_text(json.dumps({"schema": SCHEMA_VERSION, "run": cfg.name, "stages": records}))
    return chain, results


def _to_redo(chain: Chain, results: ResultsDir, cfg: Config) -> list[str]:
    chain = Chain(cfg, [], chain.run, seg=True)
    return sorted({s.stage for s in steps(chain, results, [], lambda *_: None) if not s.done()})


@pytest.mark.parametrize("stage", [s for s in STAGES if s != "train"])
def test_the_pipeline_redoes_a_stage_whose_key_changed_and_every_stage_after_it(tmp_path, stage):
    cfg = Config(name="r")
    chain, results = _finished_chain(tmp_path, cfg)
    assert _to_redo(chain, results, cfg) == []  # everything is done for the config it was made with
    own = [k for k, d in DECLARED.items() if stage in d["stages"] and "train" not in d["stages"]]
    assert own, stage
    for k in own:
        chain, results = _finished_chain(tmp_path / k, cfg)
        want = set(downstream(stage))
        if k in ("data.mask_split", "data.seg_train_split"):
            want |= {"pseudo", "crf"}  # a split of its own: its pseudo masks and CRF are made too
        assert _to_redo(chain, results, changed(cfg, k)) == sorted(want), k


def test_a_training_key_stops_the_chain_and_a_runtime_key_changes_nothing(tmp_path):
    cfg = Config(name="r")
    chain, results = _finished_chain(tmp_path, cfg)
    for k in [k for k, d in DECLARED.items() if "train" in d["stages"]][:8]:
        with pytest.raises(PipelineError, match=f"(?s)another config.*{k}"):
            check_same_config(changed(cfg, k), chain.run)
    for k in RUNTIME_KEYS:
        if k == "name":
            continue
        new = changed(cfg, k)
        check_same_config(new, chain.run)
        assert _to_redo(chain, results, new) == [], k


def test_a_new_key_goes_in_one_place():
    """ARCHITECTURE.md's "where a new thing goes": one declaration beside the default makes a key
    checked, part of its stage's settings (markers, records) and so a reason to redo that stage."""

    assert declarations(Config2)["crf.smoothness"]["stages"] == ("crf",)
    cfg = Config2()
    assert chain_settings("crf", cfg)["crf.smoothness"] == 1.0 and "crf.smoothness" in chain_settings("seg_eval", cfg)
    assert "crf.smoothness" not in training_view(cfg) and "crf.smoothness" not in chain_settings("pseudo", cfg)
    cfg.crf.smoothness = -1.0
    with pytest.raises(ConfigError, match=r"crf\.smoothness = -1\.0 is not allowed"):
        validate(cfg)
