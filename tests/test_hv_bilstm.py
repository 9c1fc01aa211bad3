import pytest
import torch

from tkpbench.hv_bilstm import HVBiLSTM, _tanh


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


def _grads(m, x, input_grad=True):
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(input_grad)
    torch.manual_seed(7)  # the same dropout draws for both implementations
    out = m(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), x.grad, {k: p.grad for k, p in m.named_parameters()}


@pytest.mark.parametrize(
    "shape,trained",
    [((2, 5, 5), "all"), ((3, 4, 6), "all"), ((2, 5, 5), "input only"), ((2, 5, 5), "weights only"), ((1, 1, 3), "all")],
)
def test_packed_cpu_training_path_equals_nn_lstm_in_outputs_and_gradients(shape, trained):
    """CPU training runs the four recurrences packed (one batched step); it must be the same
    function as the two nn.LSTM calls, with the same sequence-dropout draws, square grid or not,
    with frozen LSTM weights (only the input's gradient), a frozen encoder (only the weights'), and
    a one-step sequence."""
    b, h, w = shape
    torch.manual_seed(0)
    m = HVBiLSTM(in_dim=10, hidden=6, dropout=0.0, lstm_dropout=0.3).train()
    if trained == "input only":
        m.requires_grad_(False)
    x = torch.randn(b, h, w, 10)
    out_p, gx_p, g_p = _grads(m, x, input_grad=trained != "weights only")
    m.packed = False
    out_r, gx_r, g_r = _grads(m, x, input_grad=trained != "weights only")
    torch.testing.assert_close(out_p, out_r, atol=2e-6, rtol=1e-5)
    if trained == "weights only":
        assert gx_p is None and gx_r is None
    else:
        torch.testing.assert_close(gx_p, gx_r, atol=2e-6, rtol=1e-5)
    for k in g_r:
        if trained == "input only":
            assert g_p[k] is None and g_r[k] is None
        else:
            torch.testing.assert_close(g_p[k], g_r[k], atol=5e-6, rtol=1e-5, msg=k)
    assert not torch.equal(out_p, HVBiLSTM(10, 6, 0.0, 0.0)(x).detach())  # a different model differs


def test_packed_path_refuses_a_second_backward_through_the_same_graph():
    """Its backward writes the gates' gradients over the saved activations, so a second backward
    (retain_graph) would be silently wrong: it must stop with an error instead."""
    m = HVBiLSTM(in_dim=4, hidden=3, dropout=0.0).train()
    out = m(torch.randn(1, 3, 3, 4)).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward twice"):
        out.backward()


def test_tanh_through_sigmoid_matches_torch_tanh():
    x = torch.cat([torch.linspace(-30, 30, 200_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-4])])
    y = _tanh(x.clone(), out=torch.empty_like(x))
    assert torch.equal(_tanh(y0 := x.clone(), out=y0), y)  # in place, the same
    assert (y - torch.tanh(x)).abs().max() <= 2e-7
    assert y.abs().max() <= 1.0 and torch.equal(torch.sign(y[x.abs() > 1e-3]), torch.sign(x[x.abs() > 1e-3]))


@pytest.mark.parametrize("packed", [True, False])
def test_lstm_dropout_draws_one_mask_per_sequence_and_direction_as_keras_bidirectional(packed):
    """ViT-PCM's Bidirectional(LSTM(dropout=)) is two Keras LSTM layers, each drawing its own mask
    per sequence (shared by the time steps). The layer must equal that reference, built from the
    documented draws (rows forward, rows backward, columns forward, columns backward) and each
    direction's half of an nn.LSTM output, on both implementations."""
    b, h, w, e, hid, p = 2, 3, 4, 8, 3, 0.5
    m = HVBiLSTM(in_dim=e, hidden=hid, dropout=0.0, lstm_dropout=p).train()
    m.packed = packed
    x = torch.randn(b, h, w, e)
    torch.manual_seed(5)
    out = m(x).detach()

    torch.manual_seed(5)
    rows, cols = x.reshape(b * h, w, e), x.transpose(1, 2).reshape(b * w, h, e)
    mr = rows.new_empty(2, b * h, 1, e).bernoulli_(1 - p).div_(1 - p)
    mc = cols.new_empty(2, b * w, 1, e).bernoulli_(1 - p).div_(1 - p)
    assert not torch.equal(mr[0], mr[1]) and not torch.equal(mc[0], mc[1])  # the directions' masks differ
    with torch.no_grad():
        rf, rb = m.horizontal(rows * mr[0])[0][..., :hid], m.horizontal(rows * mr[1])[0][..., hid:]
        cf, cb = m.vertical(cols * mc[0])[0][..., :hid], m.vertical(cols * mc[1])[0][..., hid:]
    as_cols = lambda t: t.reshape(b, w, h, hid).transpose(1, 2)  # noqa: E731
    ref = torch.cat([rf.reshape(b, h, w, hid), rb.reshape(b, h, w, hid), as_cols(cf), as_cols(cb)], dim=-1)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
