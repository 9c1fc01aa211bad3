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
