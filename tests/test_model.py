import pytest
import torch

from tkpbench.config import ModelConfig
from tkpbench.encoder import PatchEncoder, WeightsError
from tkpbench.model import TKPPCL, merge_with_tags, tkp_loss

TINY = dict(weights="", encoder="vit_tiny_patch16_224", encoder_kwargs={"depth": 2}, img_size=64, hidden=8, num_classes=5, k=2)


def tiny_model(**kw):
    torch.manual_seed(0)
    return TKPPCL(ModelConfig(**{**TINY, **kw}))


def test_forward_backward_on_a_tiny_config():
    m = tiny_model()
    x = torch.randn(2, 3, 64, 64)
    out = m(x)
    assert out.z.shape == (2, 16, 5) and out.y.shape == (2, 5) and out.features.shape == (2, 16, 32)
    torch.testing.assert_close(out.z.sum(-1), torch.ones(2, 16))
    tags = torch.tensor([[1, 0, 1, 0, 0], [1, 1, 0, 0, 1]], dtype=torch.bool)
    losses = tkp_loss(out, tags, m.cfg)
    assert losses["pce"].requires_grad
    losses["loss"].backward()
    assert m.classifier.weight.grad.abs().sum() > 0


def test_frozen_encoder_parameters_get_no_gradient():
    m = tiny_model()
    m.encoder.unfreeze(1)
    out = m(torch.randn(2, 3, 64, 64))
    tkp_loss(out, torch.ones(2, 5, dtype=torch.bool), m.cfg)["loss"].backward()
    blocks = m.encoder.vit.blocks
    assert all(p.grad is None for p in blocks[0].parameters())
    assert all(p.grad is None for p in m.encoder.vit.patch_embed.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks[1].parameters())
    assert all(p.grad is not None for p in m.encoder.vit.norm.parameters())


def test_encoder_runs_at_two_input_sizes():
    enc = PatchEncoder("vit_tiny_patch16_224", img_size=64, depth=1)
    t1, g1 = enc(torch.randn(1, 3, 64, 64))
    t2, g2 = enc(torch.randn(1, 3, 96, 160))
    assert g1 == (4, 4) and t1.shape == (1, 16, 192)
    assert g2 == (6, 10) and t2.shape == (1, 60, 192)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        enc(torch.randn(1, 3, 70, 64))


def test_encoder_uses_fused_attention():
    enc = PatchEncoder("vit_tiny_patch16_224", img_size=64, depth=1)
    assert all(b.attn.fused_attn for b in enc.vit.blocks)


def test_weights_round_trip_and_clear_errors(tmp_path):
    src = PatchEncoder("vit_tiny_patch16_224", img_size=64, depth=2)
    path = tmp_path / "w.pth"
    torch.save(src.vit.state_dict(), path)
    dst = PatchEncoder("vit_tiny_patch16_224", weights=path, img_size=64, depth=2)
    torch.testing.assert_close(dst.vit.blocks[1].mlp.fc1.weight, src.vit.blocks[1].mlp.fc1.weight)
    # weights saved at another size are resampled by timm's position-embedding filter
    bigger = PatchEncoder("vit_tiny_patch16_224", weights=path, img_size=96, depth=2)
    assert bigger.vit.pos_embed.shape[1] == 1 + 36
    from safetensors.torch import save_file

    st_path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.vit.state_dict().items()}, str(st_path))
    PatchEncoder("vit_tiny_patch16_224", weights=st_path, img_size=64, depth=2)
    with pytest.raises(WeightsError, match="does not exist.*vit_tiny_patch16_224"):
        PatchEncoder("vit_tiny_patch16_224", weights=tmp_path / "missing.pth", img_size=64, depth=2)
    with pytest.raises(WeightsError, match="w.pth.*vit_tiny_patch16_224"):
        PatchEncoder("vit_tiny_patch16_224", weights=path, img_size=64, depth=3)


def test_merge_zeroes_absent_classes_and_renormalises():
    z = torch.rand(2, 4, 3, 3).softmax(1)
    tags = torch.tensor([[0, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    m = merge_with_tags(z, tags)
    torch.testing.assert_close(m.sum(1), torch.ones(2, 3, 3))
    assert torch.all(m[0, [1, 3]] == 0) and torch.all(m[1, 2] == 0)
    assert torch.all(m[0, 0] > 0)  # background is always kept


def test_classifier_softmax_and_pooling_run_in_fp32_under_bf16_autocast():
    """As ViT-PCM: the head's logits are not rounded to bf16 even when the encoder runs in bf16."""
    from tkpbench.config import ModelConfig
    from tkpbench.model import TKPPCL

    torch.manual_seed(0)
    m = TKPPCL(
        ModelConfig(encoder="vit_tiny_patch16_224", encoder_kwargs={"depth": 1}, weights="", img_size=32, hidden=8, k=2)
    ).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(2, 3, 32, 32))
    expected = torch.softmax(out.features.float() @ m.classifier.weight.float().T, dim=-1)
    assert out.z.dtype == torch.float32
    torch.testing.assert_close(out.z, expected, rtol=0, atol=1e-6)


def _scores_out(y):
    from tkpbench.model import TKPOutput

    b, c = y.shape
    return TKPOutput(z=torch.full((b, 4, c), 1.0 / c), y=y, features=torch.randn(b, 4, 8), grid=(2, 2))


def test_mce_equals_torch_bce_on_valid_scores_values_and_gradients():
    cfg = ModelConfig(**TINY, pce=False)
    g = torch.Generator().manual_seed(0)
    # scores across (0, 1) and at the clamp's edges on both sides, with any tags
    y = torch.cat([torch.rand(6, 5, generator=g), torch.tensor([[0.0, 1.0, 1e-7, 1 - 1e-7, 0.5]])]).double()
    tags = torch.rand(7, 5, generator=g) > 0.5
    y1, y2 = y.clone().requires_grad_(True), y.clone().requires_grad_(True)
    ours = tkp_loss(_scores_out(y1), tags, cfg)["mce"]
    t = tags.float()
    t[:, 0] = 1.0
    ref = torch.nn.functional.binary_cross_entropy(y2.float().clamp(cfg.clamp, 1 - cfg.clamp), t)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(y1.grad, y2.grad, rtol=1e-5, atol=1e-7)


def test_nan_scores_give_a_nan_loss_not_an_exception():
    """F.binary_cross_entropy raises on a NaN score ('between 0 and 1'); the NaN guard needs the NaN."""
    cfg = ModelConfig(**TINY)
    y = torch.rand(2, 5)
    y[1, 3] = float("nan")
    losses = tkp_loss(_scores_out(y), torch.ones(2, 5, dtype=torch.bool), cfg)
    assert torch.isnan(losses["mce"]) and torch.isnan(losses["loss"])


def test_img_size_that_is_not_a_multiple_of_the_patch_is_a_config_error():
    from tkpbench.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.img_size = 72 is not a multiple of the patch size 16 .* e\.g\. 64"):
        tiny_model(img_size=72)
