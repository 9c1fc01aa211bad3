"""HV-BiLSTM (paper Sec. 3.1, from ViT-PCM): refine the patch grid with bidirectional LSTMs
running along every row and every column.

All rows of all images form one batch of sequences and all columns another, so there is no
Python loop over rows or columns. Two implementations, the same parameters (two ``nn.LSTM``):

* ``nn.LSTM`` (cuDNN on the GPU, oneDNN on the CPU): inference, and training on the GPU;
* CPU training (``_forward_packed``): the input projections of all four recurrences (rows and
  columns, both directions) are two large GEMMs, and on a square grid the four recurrences step
  together in one batched matmul per time step, with a hand-written backward. At the paper's
  shapes (2 x 24 x 24 x 768 -> 4 x 192, one thread) forward + backward is about 10% faster than
  through ``nn.LSTM`` and still about 13% slower than Keras 2.15's layer (``bench/hv-bilstm-cpu.md``);
  outputs and gradients agree with ``nn.LSTM`` to about 2e-6 (``tests/test_hv_bilstm.py``).
  Inference stays on ``nn.LSTM``: oneDNN's forward is faster than the packed one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class HVBiLSTM(nn.Module):
    """(B, H, W, E) -> (B, H, W, 4 * hidden): [horizontal BiLSTM, vertical BiLSTM] concatenated.

    Dropout (p = ``dropout``) is applied to the input grid, as in SPEC.md Sec. 1. ``lstm_dropout``
    is Keras's ``LSTM(dropout=)`` as ViT-PCM uses it: in training, each row's (column's) input
    sequence is multiplied by one Bernoulli mask for all its time steps. Keras draws separate
    masks for the two directions of a Bidirectional layer; here both directions of a row share
    one, so that each orientation stays one fused cuDNN/oneDNN call (README, Faithfulness).
    """

    def __init__(self, in_dim: int = 768, hidden: int = 192, dropout: float = 0.2, lstm_dropout: float = 0.0) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.hidden = hidden
        self.out_dim = 4 * hidden
        self.dropout = nn.Dropout(dropout)
        self.lstm_dropout = lstm_dropout
        self.packed = True  # CPU training through _forward_packed (False: always nn.LSTM; tests, benchmarks)
        self.horizontal = nn.LSTM(in_dim, hidden, batch_first=True, bidirectional=True)
        self.vertical = nn.LSTM(in_dim, hidden, batch_first=True, bidirectional=True)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-1] != self.in_dim:
            raise ValueError(f"HVBiLSTM expects (B, H, W, {self.in_dim}), got {tuple(x.shape)}")
        b, h, w, e = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            # the LSTMs run in fp32 even under bf16 autocast: cuDNN's bf16 RNN support varies by
            # version and GPU, and the recurrences are a small share of the step's FLOPs
            return self._forward(self.dropout(x.float()), b, h, w, e)

    def _sequence_dropout(self, seqs: Tensor) -> Tensor:
        """(N, T, E): one dropout mask per sequence, shared by its time steps (Keras LSTM dropout)."""
        p = self.lstm_dropout
        if not (self.training and p):
            return seqs
        keep = torch.empty_like(seqs[:, :1]).bernoulli_(1.0 - p) / (1.0 - p)
        return seqs * keep

    def _forward(self, x: Tensor, b: int, h: int, w: int, e: int) -> Tensor:
        rows_in = self._sequence_dropout(x.reshape(b * h, w, e))  # (B*H, W, E), time = W
        cols_in = self._sequence_dropout(x.transpose(1, 2).reshape(b * w, h, e))  # (B*W, H, E), time = H
        if self.packed and x.device.type == "cpu" and torch.is_grad_enabled():
            return self._forward_packed(rows_in, cols_in, b, h, w)
        rows, _ = self.horizontal(rows_in)  # (B*H, W, 2*hidden)
        rows = rows.reshape(b, h, w, 2 * self.hidden)
        cols, _ = self.vertical(cols_in)  # (B*W, H, 2*hidden)
        cols = cols.reshape(b, w, h, 2 * self.hidden).transpose(1, 2)
        return torch.cat([rows, cols], dim=-1)

    def _forward_packed(self, rows_in: Tensor, cols_in: Tensor, b: int, h: int, w: int) -> Tensor:
        """The same function as the two ``nn.LSTM`` calls on the same (dropped-out) sequences, faster
        to train on the CPU."""
        hid = self.hidden
        # time-major input gates (T, N, 4 hidden) of each direction; the backward ones reversed in time
        rf, rb = _input_gates(self.horizontal, rows_in)
        cf, cb = _input_gates(self.vertical, cols_in)
        if h == w:  # one recurrence for all four (rows and columns have the same length and count)
            o = _recurrence(torch.stack([rf, rb.flip(0), cf, cb.flip(0)], 1), _recurrent_weights(self.horizontal, self.vertical))
            fr, br, fc, bc = o.unbind(1)
        else:
            fr, br = _recurrence(torch.stack([rf, rb.flip(0)], 1), _recurrent_weights(self.horizontal)).unbind(1)
            fc, bc = _recurrence(torch.stack([cf, cb.flip(0)], 1), _recurrent_weights(self.vertical)).unbind(1)
        as_rows = lambda t: t.reshape(w, b, h, hid).permute(1, 2, 0, 3)  # noqa: E731  (W, B*H, .) -> (B, H, W, .)
        as_cols = lambda t: t.reshape(h, b, w, hid).permute(1, 0, 2, 3)  # noqa: E731  (H, B*W, .) -> (B, H, W, .)
        return torch.cat([as_rows(fr), as_rows(br.flip(0)), as_cols(fc), as_cols(bc.flip(0))], dim=-1)


def _input_gates(lstm: nn.LSTM, seqs: Tensor) -> tuple[Tensor, Tensor]:
    """(N, T, E) -> the forward and backward directions' input gates (T, N, 4h), both biases
    included, from one GEMM over the time-major input."""
    n, t, e = seqs.shape
    weight = torch.cat([lstm.weight_ih_l0, lstm.weight_ih_l0_reverse])
    bias = torch.cat([lstm.bias_ih_l0 + lstm.bias_hh_l0, lstm.bias_ih_l0_reverse + lstm.bias_hh_l0_reverse])
    g = torch.addmm(bias, seqs.transpose(0, 1).reshape(t * n, e), weight.t()).view(t, n, 2, -1)
    fwd, bwd = g.unbind(2)  # unbind: one backward stack, no zero-filled gradients
    return fwd, bwd


def _recurrent_weights(*lstms: nn.LSTM) -> Tensor:
    """(S, h, 4h): the recurrent kernels of the forward and backward direction of each LSTM."""
    return torch.stack([w for m in lstms for w in (m.weight_hh_l0, m.weight_hh_l0_reverse)]).transpose(1, 2)


def _recurrence(gates_in: Tensor, w_hh: Tensor) -> Tensor:
    """LSTM recurrences stepped together: gates_in (T, S, N, 4h) (PyTorch's gate order i, f, g, o),
    w_hh (S, h, 4h); zero initial state. Returns the hidden states (T, S, N, h)."""
    return _Recurrence.apply(gates_in, w_hh)


class _Recurrence(torch.autograd.Function):
    """The LSTM recurrence with a hand-written backward: the loop runs over time steps only, as any
    recurrence must; per step one batched matmul forward and one backward; the recurrent kernels'
    gradient is a single matmul over all steps after the loop, and the input gates' gradient is
    written in place, step by step (no per-step autograd graph, no concatenations)."""

    @staticmethod
    def forward(ctx, gates_in: Tensor, w_hh: Tensor) -> Tensor:
        t_len, s, n, four_h = gates_in.shape
        h = four_h // 4
        acts = torch.empty_like(gates_in)  # i, f, g, o after their nonlinearities
        cells = gates_in.new_empty(t_len, s, n, h)
        hidden = gates_in.new_empty(t_len + 1, s, n, h)  # hidden[0] is the zero initial state
        hidden[0].zero_()
        c = gates_in.new_zeros(s, n, h)
        for t in range(t_len):
            a = torch.baddbmm(gates_in[t], hidden[t], w_hh, out=acts[t])
            torch.sigmoid(a[..., : 2 * h], out=a[..., : 2 * h])
            torch.tanh(a[..., 2 * h : 3 * h], out=a[..., 2 * h : 3 * h])
            torch.sigmoid(a[..., 3 * h :], out=a[..., 3 * h :])
            i, f, g, o = a.split(h, dim=-1)
            c = torch.addcmul(f * c, i, g, out=cells[t])
            torch.mul(o, torch.tanh(c), out=hidden[t + 1])
        ctx.save_for_backward(acts, cells, hidden, w_hh)
        return hidden[1:]

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        acts, cells, hidden, w_hh = ctx.saved_tensors
        t_len, s, n, h = cells.shape
        d_gates = torch.empty_like(acts)
        dh = grad_out.new_zeros(s, n, h)
        dc = grad_out.new_zeros(s, n, h)
        w_t = w_hh.transpose(1, 2)
        for t in reversed(range(t_len)):
            i, f, g, o = acts[t].split(h, dim=-1)
            dh = dh + grad_out[t]
            tc = torch.tanh(cells[t])
            dc = dc + dh * o * (1 - tc * tc)
            c_prev = cells[t - 1] if t > 0 else torch.zeros_like(dc)
            di, df, dg, do = d_gates[t].split(h, dim=-1)
            torch.mul(dc * g, i * (1 - i), out=di)
            torch.mul(dc * c_prev, f * (1 - f), out=df)
            torch.mul(dc * i, 1 - g * g, out=dg)
            torch.mul(dh * tc, o * (1 - o), out=do)
            dh = torch.bmm(d_gates[t], w_t)  # to the previous step's hidden state
            dc = dc * f
        # dL/dW_hh = sum over steps of h_{t-1}^T dgates_t: one matmul over all steps and sequences
        prev = hidden[:-1].permute(1, 3, 0, 2).reshape(s, h, t_len * n)
        d_w = torch.bmm(prev, d_gates.permute(1, 0, 2, 3).reshape(s, t_len * n, 4 * h))
        return d_gates, d_w


def keras_init_(lstm: nn.LSTM) -> None:
    """Keras's LSTM initialisation: Glorot-uniform input kernels, orthogonal recurrent kernels (per
    direction, over the (hidden, 4 hidden) matrix), zero biases with the forget gate's at 1
    (``unit_forget_bias``). PyTorch's two bias vectors sum, so the 1 goes to ``bias_ih`` only."""
    for name, prm in lstm.named_parameters():
        with torch.no_grad():
            if name.startswith("weight_ih"):
                nn.init.xavier_uniform_(prm)
            elif name.startswith("weight_hh"):
                q = torch.empty(prm.shape[1], prm.shape[0])  # Keras's (hidden, 4 hidden) recurrent kernel
                prm.copy_(nn.init.orthogonal_(q).T)
            elif name.startswith("bias"):
                prm.zero_()
                if name.startswith("bias_ih"):
                    h = lstm.hidden_size
                    prm[h : 2 * h] = 1.0  # gate order i, f, g, o: the forget gate
