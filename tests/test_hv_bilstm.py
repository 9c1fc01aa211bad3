import pytest
import torch

from tkpbench.hv_bilstm import HVBiLSTM


def test_output_shape_is_four_times_hidden():
    m = HVBiLSTM(in_dim=12, hidden=5, dropout=0.2)
    assert m(torch.randn(2, 3, 4, 12)).shape == (2, 3, 4, 20)


@pytest.mark.parametrize("lstm_dropout", [0.0, 0.2])
def test_each_output_cell_depends_on_its_own_row_and_column_only(lstm_dropout):
    """Also in training with LSTM dropout, where each direction runs in its own call (the backward
    one over the reversed sequences): the reshapes, reversals and transpositions must keep every
    cell on its own row and column."""
    torch.manual_seed(0)
    h, w = 4, 5
    m = HVBiLSTM(in_dim=6, hidden=3, dropout=0.0, lstm_dropout=lstm_dropout).train(lstm_dropout > 0)
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


def _keras_reference(m, x, masks_rows, masks_cols):
    """ViT-PCM's layer on the documented draws: per orientation, two full bidirectional nn.LSTM
    calls (one per direction's masked input), each keeping its direction's half."""
    b, h, w, e = x.shape
    hid = m.hidden
    rows, cols = x.reshape(b * h, w, e), x.transpose(1, 2).reshape(b * w, h, e)
    rf, rb = m.horizontal(rows * masks_rows[0])[0][..., :hid], m.horizontal(rows * masks_rows[1])[0][..., hid:]
    cf, cb = m.vertical(cols * masks_cols[0])[0][..., :hid], m.vertical(cols * masks_cols[1])[0][..., hid:]
    as_cols = lambda t: t.reshape(b, w, h, hid).transpose(1, 2)  # noqa: E731
    return torch.cat([rf.reshape(b, h, w, hid), rb.reshape(b, h, w, hid), as_cols(cf), as_cols(cb)], dim=-1)


def _out_and_grads(fn, x, params):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    weight = torch.linspace(-1, 1, out.numel()).reshape(out.shape)  # every output element its own weight
    grads = torch.autograd.grad((out * weight).sum(), [x, *params])
    return out.detach(), grads


@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 4, 4), (1, 1, 3)])
def test_lstm_dropout_draws_one_mask_per_sequence_and_direction_as_keras_bidirectional(shape):
    """ViT-PCM's Bidirectional(LSTM(dropout=)) is two Keras LSTM layers, each drawing its own mask
    per sequence (shared by the time steps). The layer (each direction run once on its own input)
    must equal, in outputs and in the gradients to the input and to every parameter, a reference
    built from the documented draws (rows forward, rows backward, columns forward, columns backward)
    and two full bidirectional nn.LSTM calls per orientation, on non-square and square grids and a
    one-step sequence. The reference with the directions' masks swapped, or with one mask shared by
    both directions, must not match."""
    b, h, w = shape
    e, hid, p = 8, 3, 0.5
    torch.manual_seed(0)
    m = HVBiLSTM(in_dim=e, hidden=hid, dropout=0.0, lstm_dropout=p).train()
    params = list(m.parameters())
    x = torch.randn(b, h, w, e)

    def layer(x):
        torch.manual_seed(5)
        return m(x)

    torch.manual_seed(5)
    mr = torch.empty(2, b * h, 1, e).bernoulli_(1 - p).div_(1 - p)
    mc = torch.empty(2, b * w, 1, e).bernoulli_(1 - p).div_(1 - p)
    assert not torch.equal(mr[0], mr[1]) and not torch.equal(mc[0], mc[1])  # the directions' masks differ

    out, grads = _out_and_grads(layer, x, params)
    ref, ref_grads = _out_and_grads(lambda x: _keras_reference(m, x, mr, mc), x, params)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    for name, g, r in zip(["input", *(n for n, _ in m.named_parameters())], grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-6, msg=name)

    for wrong in (mr.flip(0), mc.flip(0)), (mr[:1].expand(2, -1, -1, -1), mc[:1].expand(2, -1, -1, -1)):
        with torch.no_grad():
            assert (_keras_reference(m, x, *wrong) - out).abs().max() > 1e-2  # swapped or shared masks
