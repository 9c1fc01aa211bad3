"""ViT-PCM's recipe (#15): the equivariance loss, the L2 term, the training views and vit_pcm.toml."""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from tkpbench import distributed as D
from tkpbench.config import DataConfig, load_config
from tkpbench.data.transforms import TKPViews
from tkpbench.engine import fit
from tkpbench.equivariance import crop_resize, dihedral, equivariance_loss, mosaic, realign, tiles
from tkpbench.model import TKPPCL, merge_with_tags, tkp_loss
from tkpbench.train import TKPTask

REPO = Path(__file__).resolve().parents[1]
CPU = D.DistInfo()


# ---------------------------------------------------------------- the pieces, by hand
def test_mosaic_places_views_in_reading_order_and_tiles_undo_it():
    views = torch.arange(8.0).reshape(8, 1, 1, 1).expand(8, 3, 2, 2)
    m = mosaic(views)
    assert m.shape == (2, 3, 4, 4)
    assert m[0, 0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert torch.equal(tiles(m), views)
    with pytest.raises(ValueError, match="multiple of 4"):
        mosaic(views[:6])


def test_realign_by_hand():
    """Main view flipped left-right; ET view = the top-left 2 x 2 patches of the image, transposed."""
    image_frame = torch.arange(16.0).reshape(1, 1, 4, 4)  # (B, C, N, N), patch (r, c) holds 4r + c
    main = image_frame.flip(-1)  # what the model saw
    main_geom = torch.tensor([[1, 0, 0, 0, 0, 64, 64]])  # fliplr; 16-px patches of a 64-px image
    et_geom = torch.tensor([[0, 0, 1, 0, 0, 32, 32]])  # transposed; crop rows 0-1, cols 0-1
    out = realign(main, main_geom, et_geom, patch=16, out_cells=2)
    assert out[0, 0].tolist() == [[0.0, 4.0], [1.0, 5.0]]


def test_crop_resize_is_tf_resize_with_align_corners():
    """Resizing a 3-cell ramp to 5 cells with align_corners=True puts samples at 0, .5, 1, 1.5, 2."""
    x = torch.tensor([0.0, 10.0, 20.0]).reshape(1, 1, 1, 3).expand(1, 1, 3, 3)
    out = crop_resize(x, torch.tensor([[0.0, 0.0, 3.0, 3.0]]), 5)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 15.0, 20.0]))


def test_equivariance_loss_by_hand():
    # (B, C, 1, 2): cell 0 predicts (0.8, 0.2) for target (1, 0), cell 1 (0.5, 0.5) for (0.25, 0.75)
    pred = torch.tensor([[0.8, 0.5], [0.2, 0.5]]).reshape(1, 2, 1, 2)
    target = torch.tensor([[1.0, 0.25], [0.0, 0.75]]).reshape(1, 2, 1, 2)
    expected = (-math.log(0.8) - (0.25 * math.log(0.5) + 0.75 * math.log(0.5))) / 2
    assert equivariance_loss(pred, target).item() == pytest.approx(expected, rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    flags=st.lists(st.integers(0, 1), min_size=6, max_size=6),
    y=st.integers(0, 4),
    x=st.integers(0, 4),
    seed=st.integers(0, 2**16),
)
def test_exactly_equivariant_predictions_cost_nothing_and_any_other_costs(flags, y, x, seed):
    """Property: the model's patch predictions on the ET view equal the main view's, carried into
    that view's frame, one-hot => ET = 0; change one patch's prediction => ET > 0."""
    g = torch.Generator().manual_seed(seed)
    c, n, cells = 4, 8, 4
    labels = torch.randint(0, c, (1, n, n), generator=g)
    scene = torch.nn.functional.one_hot(labels, c).permute(0, 3, 1, 2).float()  # the image's own frame
    main_geom = torch.tensor([flags[:3] + [0, 0, 16 * n, 16 * n]])
    et_geom = torch.tensor([flags[3:] + [16 * y, 16 * x, 16 * (y + cells), 16 * (x + cells)]])
    seen_main = dihedral(scene, main_geom[:, :3])
    seen_et = dihedral(scene[:, :, y : y + cells, x : x + cells], et_geom[:, :3])
    tags = torch.ones(1, c, dtype=torch.bool)
    target = merge_with_tags(realign(seen_main, main_geom, et_geom, 16, cells), tags)
    assert equivariance_loss(seen_et, target).item() < 1e-5
    wrong = seen_et.clone()
    wrong[0, :, 0, 0] = wrong[0, :, 0, 0].roll(1)
    assert equivariance_loss(wrong, target).item() > 1.0


# ---------------------------------------------------------------- the views
def _patch_coded_image(n: int = 4, patch: int = 16) -> torch.Tensor:
    """uint8 (3, n*patch, n*patch): patch (r, c) is filled with 10 * (n r + c)."""
    ids = torch.arange(n * n, dtype=torch.uint8).reshape(n, n) * 10
    return ids.repeat_interleave(patch, 0).repeat_interleave(patch, 1).expand(3, -1, -1).contiguous()


def _patch_ids(img: torch.Tensor, patch: int = 16) -> torch.Tensor:
    centres = img[0, patch // 2 :: patch, patch // 2 :: patch]  # normalised with mean 0, std 1
    return (centres * 255 / 10).round().long()


@pytest.mark.parametrize("seed", range(12))
def test_the_views_geometry_is_what_realign_undoes(seed):
    """The dataset's flips, transposition and crop and ``realign`` on the patch grid agree: a
    model that outputs each patch's position one-hot is exactly equivariant."""
    cfg = DataConfig(color_jitter=[0, 0, 0, 0], grayscale=0.0, et_crop=32, et_crop_p=1.0)
    views = TKPViews(cfg, 64, (0.0,) * 3, (1.0,) * 3, et=True)
    torch.manual_seed(seed)
    main, et, geom, et_geom = views(_patch_coded_image())
    main_ids, et_ids = _patch_ids(main), _patch_ids(et)
    onehot = torch.nn.functional.one_hot(main_ids, 16).permute(2, 0, 1)[None].float()
    carried = realign(onehot, geom[None], et_geom[None], 16, 2).argmax(1)[0]
    assert torch.equal(carried, et_ids)
    assert sorted(main_ids.flatten().tolist()) == list(range(16))  # the main view is never cropped


def _two_objects() -> tuple[torch.Tensor, torch.Tensor]:
    """A 96 x 96 image: class 3 (red) in the top-left corner, class 7 (green) bottom-right."""
    img = torch.zeros(3, 96, 96, dtype=torch.uint8)
    mask = torch.zeros(96, 96, dtype=torch.uint8)
    img[0, :20, :20], mask[:20, :20] = 255, 3
    img[1, -20:, -20:], mask[-20:, -20:] = 255, 7
    return img, mask


def _visible(view: torch.Tensor) -> set[int]:
    r, g = view[0], view[1]
    return ({3} if ((r > 0.8) & (g < 0.2)).any() else set()) | ({7} if ((g > 0.8) & (r < 0.2)).any() else set())


def _views_that_lose_a_tag(crop_tags: str, n: int = 40) -> int:
    cfg = DataConfig(color_jitter=[0, 0, 0, 0], grayscale=0.0, rrc_p=1.0, rrc_scale=[0.1, 0.3], crop_tags=crop_tags)
    views = TKPViews(cfg, 32, (0.0,) * 3, (1.0,) * 3)
    img, mask = _two_objects()
    lost = 0
    for seed in range(n):
        torch.manual_seed(seed)
        (view,) = views(img, mask if views.needs_mask else None)
        lost += _visible(view) != {3, 7}
    return lost


def test_the_mce_view_shows_every_tagged_class():
    """The tags the MCE loss gets (the whole image's) describe the view it sees: with ViT-PCM's
    views (no crop) and with crop_tags = "visible"; "keep" crops objects away and still claims them."""
    cfg = DataConfig(color_jitter=[0, 0, 0, 0], grayscale=0.0)
    img, _ = _two_objects()
    for seed in range(20):
        torch.manual_seed(seed)
        (view,) = TKPViews(cfg, 32, (0.0,) * 3, (1.0,) * 3)(img)
        assert _visible(view) == {3, 7}
    assert _views_that_lose_a_tag("visible") == 0
    assert _views_that_lose_a_tag("keep") > 10


# ---------------------------------------------------------------- the loss terms
def test_reg_is_keras_l2_on_the_classifier_and_off_terms_are_absent():
    cfg = load_config(REPO / "baselines" / "vit_pcm.toml").model
    cfg.encoder, cfg.encoder_kwargs, cfg.weights, cfg.img_size, cfg.hidden = "vit_tiny_patch16_224", {"depth": 1}, "", 32, 8
    m = TKPPCL(cfg).train()
    out = m(torch.randn(2, 3, 32, 32))
    tags = torch.zeros(2, 21, dtype=torch.bool)
    terms = tkp_loss(out, tags, cfg, et=torch.tensor(0.5), classifier_weight=m.classifier.weight)
    assert set(terms) == {"loss", "mce", "et", "reg"}
    w = m.classifier.weight.detach()
    assert terms["reg"].item() == pytest.approx(0.01 * (w**2).sum().item(), rel=1e-6)
    assert 0.05 * 0.8 < w.std().item() < 0.05 * 1.2  # RandomNormal(0, 0.05)
    assert terms["loss"].item() == pytest.approx(terms["mce"].item() + 0.5 + terms["reg"].item(), rel=1e-6)
    cfg.et, cfg.reg, cfg.pce = False, 0.0, False
    assert set(tkp_loss(out, tags, cfg)) == {"loss", "mce"}


def test_keras_init_has_forget_bias_one_and_orthogonal_recurrence():
    m = TKPPCL(tiny_config(Path("unused")).model)
    lstm = m.hv_bilstm.horizontal
    h = lstm.hidden_size
    b = lstm.bias_ih_l0 + lstm.bias_hh_l0
    assert b[h : 2 * h].eq(1).all() and b[:h].eq(0).all() and b[2 * h :].eq(0).all()
    w = lstm.weight_hh_l0  # (4h, h): orthonormal columns
    torch.testing.assert_close(w.T @ w, torch.eye(h), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- vit_pcm.toml end to end
def test_vit_pcm_config_trains_and_logs_mce_et_reg(synth_root, tmp_path):
    base = load_config(REPO / "baselines" / "vit_pcm.toml")
    cfg = tiny_config(
        synth_root / "VOC2012",
        model__pooling="max",
        model__pce="false",
        model__et="true",
        model__reg="0.01",
        data__et_crop="16",
        train__epochs="2",
        train__warmup_epochs="1",
    )
    assert (base.model.et, base.model.reg, base.model.pce, base.model.pooling) == (True, 0.01, False, "max")
    assert (base.train.keep, base.train.reset_optimizer_at_unfreeze, base.train.patience) == ("best", True, 60)
    assert (base.data.rrc_p, base.data.vflip, base.data.rot90, base.pseudo.align_corners) == (0.0, 0.5, 0.5, True)
    fit(TKPTask(cfg), cfg.to_dict(), tmp_path / "v", CPU, progress=False)
    steps = [json.loads(ln) for ln in (tmp_path / "v" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert steps and all({"mce", "et", "reg"} <= r.keys() and "pce" not in r for r in steps)
    for r in steps:
        assert r["loss"] == pytest.approx(r["mce"] + r["et"] + r["reg"], abs=1e-5)
        assert r["et"] > 0.1  # a real cross-entropy over 21 classes, not a placeholder


def test_patience_stops_the_run_and_a_rerun_stays_stopped(synth_root, tmp_path):
    """train.patience (Keras EarlyStopping): scripted val mIoU 0.5, 0.4, 0.3, ... stops after epoch 2
    with patience 1; the same command again trains no further."""

    class Falling(TKPTask):
        def evaluate(self, model, dist):
            self.seen = getattr(self, "seen", 0) + 1
            return {"miou": 0.6 - 0.1 * self.seen}

    cfg = tiny_config(synth_root / "VOC2012", train__epochs="5", train__eval_every="1", train__patience="1")
    fit(Falling(cfg), cfg.to_dict(), tmp_path / "p", CPU, progress=False)
    evals = [json.loads(ln) for ln in (tmp_path / "p" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in evals if "val_miou" in r] == [1, 2]
    step = torch.load(tmp_path / "p" / "final.pt", weights_only=True)["step"]
    fit(Falling(cfg), cfg.to_dict(), tmp_path / "p", CPU, progress=False, resume="auto")
    assert torch.load(tmp_path / "p" / "final.pt", weights_only=True)["step"] == step
