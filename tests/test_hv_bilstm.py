import torch

from tkpbench.hv_bilstm import HVBiLSTM


def test_output_shape_is_four_times_hidden():
    m = HVBiLSTM(in_dim=12, hidden=5, dropout=0.2)
    assert m(torch.randn(2, 3, 4, 12)).shape == (2, 3, 4, 20)


def test_each_output_cell_depends_on_its_own_row_and_column_only():
    torch.manual_seed(0)
    h, w = 4, 5
    m = HVBiLSTM(in_dim=6, hidden=3, dropout=0.0).eval()
    x = torch.randn(1, h, w, 6, requires_grad=True)
    r, c = 2, 1
    m(x)[0, r, c].sum().backward()
    reach = x.grad[0].abs().sum(-1) > 0  # (h, w)
    expected = torch.zeros(h, w, dtype=torch.bool)
    expected[r, :] = True
    expected[:, c] = True
    assert torch.equal(reach, expected)


def test_images_of_a_batch_do_not_mix():
    m = HVBiLSTM(in_dim=4, hidden=2, dropout=0.0).eval()
    x = torch.randn(3, 2, 2, 4, requires_grad=True)
    m(x)[1].sum().backward()
    assert x.grad[0].abs().sum() == 0 and x.grad[2].abs().sum() == 0 and x.grad[1].abs().sum() > 0


def _grads(m, x):
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(7)  # the same dropout draws for both implementations
    out = m(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), x.grad, {k: p.grad for k, p in m.named_parameters()}


import pytest  # noqa: E402


@pytest.mark.parametrize("shape", [(2, 5, 5), (3, 4, 6)])
def test_packed_cpu_training_path_equals_nn_lstm_in_outputs_and_gradients(shape):
    """CPU training runs the four recurrences packed (two GEMMs, one batched step); it must be the
    same function as the two nn.LSTM calls, with the same sequence-dropout draws, square grid or not."""
    b, h, w = shape
    torch.manual_seed(0)
    m = HVBiLSTM(in_dim=10, hidden=6, dropout=0.0, lstm_dropout=0.3).train()
    x = torch.randn(b, h, w, 10)
    out_p, gx_p, g_p = _grads(m, x)
    m.packed = False
    out_r, gx_r, g_r = _grads(m, x)
    torch.testing.assert_close(out_p, out_r, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(gx_p, gx_r, atol=2e-6, rtol=1e-5)
    for k in g_r:
        torch.testing.assert_close(g_p[k], g_r[k], atol=5e-6, rtol=1e-5, msg=k)
    assert not torch.equal(out_p, HVBiLSTM(10, 6, 0.0, 0.0)(x).detach())  # a different model differs
