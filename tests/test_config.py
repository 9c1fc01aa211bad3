from pathlib import Path

import pytest

from tkpbench.config import Config, ConfigError, diff_configs, dumps, load_config

BASELINES = Path(__file__).resolve().parents[1] / "baselines"


def test_defaults_are_the_papers_values():
    c = Config()
    assert (c.model.k, c.model.eps, c.model.alpha, c.model.pooling, c.model.pce) == (6, 0.85, 0.01, "topk", True)
    assert (c.train.batch_size, c.train.epochs, c.train.warmup_epochs, c.train.unfreeze_blocks) == (16, 50, 2, 5)
    assert (c.train.lr_warmup, c.train.lr, c.pseudo.infer_size) == (1e-3, 1e-4, 960)
    assert (c.crf.gauss_sxy, c.crf.gauss_compat, c.crf.bi_sxy, c.crf.bi_srgb, c.crf.bi_compat) == (1, 3, 67, 3, 4)


def test_baselines_are_the_four_table4_variants():
    got = {p.stem: load_config(p).model for p in BASELINES.glob("*.toml")}
    assert (got["avg"].pooling, got["avg"].pce) == ("avg", False)
    assert (got["vit_pcm_max"].pooling, got["vit_pcm_max"].pce) == ("max", False)
    assert (got["topk"].pooling, got["topk"].k, got["topk"].pce) == ("topk", 6, False)
    assert (got["topk_pce"].pooling, got["topk_pce"].pce) == ("topk", True)


def test_unknown_key_is_an_error_naming_key_and_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[model]\ntopk = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*model\.topk"):
        load_config(p)


def test_wrong_type_is_an_error_naming_key_and_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[model]\nk = "six"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml.*model\.k.*int"):
        load_config(p)


def test_round_trip_base_chain_and_overrides(tmp_path):
    (tmp_path / "parent.toml").write_text("[model]\nk = 3\neps = 0.9\n")
    (tmp_path / "child.toml").write_text('base = "parent.toml"\n[model]\nk = 4\n')
    c = load_config(tmp_path / "child.toml", ["data.root=/x/VOC2012", "train.epochs=3"])
    assert (c.model.k, c.model.eps, c.data.root, c.train.epochs, c.name) == (4, 0.9, "/x/VOC2012", 3, "child")
    (tmp_path / "dump.toml").write_text(dumps(c))
    again = load_config(tmp_path / "dump.toml")
    assert diff_configs(again.to_dict(), c.to_dict()) == []
    assert diff_configs({"a": {"b": 1}}, {"a": {"b": 2}}) == ["a.b: 1 -> 2"]
