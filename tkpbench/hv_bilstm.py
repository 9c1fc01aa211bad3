"""HV-BiLSTM (paper Sec. 3.1, from ViT-PCM): refine the patch grid with bidirectional LSTMs
running along every row and every column.

All rows of all images form one batch of sequences and all columns another, so there is no
Python loop over rows or columns. Two implementations, the same parameters (two ``nn.LSTM``):

* ``nn.LSTM`` (cuDNN on the GPU, oneDNN on the CPU): inference, and training on the GPU;
* CPU training (``_forward_packed``, ``_BiLSTMs``): on a square grid the four recurrences (rows
  and columns, both directions) step together in one batched matmul per time step, with a
  hand-written backward, all in one (S, T, N, .) layout with few temporaries. At the paper's
  shapes (2 x 24 x 24 x 768 -> 4 x 192, one thread) forward + backward takes about 0.17 s against
  0.18 s for ViT-PCM's Keras 2.15 layer and 0.24 s through ``nn.LSTM`` (``bench/hv-bilstm-cpu.md``);
  the GEMMs are ~90% of it, at this core's matmul peak. Outputs and gradients agree with
  ``nn.LSTM`` to about 2e-6 (``tests/test_hv_bilstm.py``) and with Keras to 1.5e-6 (outputs) and
  5e-7 (relative, gradients). Inference stays on ``nn.LSTM``: oneDNN's forward is faster.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class HVBiLSTM(nn.Module):
    """(B, H, W, E) -> (B, H, W, 4 * hidden): [horizontal BiLSTM, vertical BiLSTM] concatenated.

    Dropout (p = ``dropout``) is applied to the input grid, as in SPEC.md Sec. 1. ``lstm_dropout``
    is Keras's ``LSTM(dropout=)`` as ViT-PCM uses it: in training, each row's (column's) input
    sequence is multiplied by one Bernoulli mask for all its time steps, and, as in Keras's
    ``Bidirectional`` (two LSTM layers, each drawing its own), the forward and the backward
    direction draw separate masks. Four draws per call, in this order: rows forward, rows backward,
    columns forward, columns backward. Through ``nn.LSTM`` (GPU training) each orientation then
    takes two calls, one per direction's input, keeping that direction's half of the output.
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

    def _sequence_dropout(self, seqs: Tensor) -> tuple[Tensor, Tensor]:
        """(N, T, E) -> the forward and the backward direction's inputs: each with one dropout mask
        per sequence, shared by its time steps (Keras LSTM dropout), drawn separately for each
        direction (Keras Bidirectional). Without dropout both are ``seqs`` itself."""
        p = self.lstm_dropout
        if not (self.training and p):
            return seqs, seqs
        masks = seqs.new_empty(2, seqs.shape[0], 1, seqs.shape[2]).bernoulli_(1.0 - p).div_(1.0 - p)
        return seqs * masks[0], seqs * masks[1]

    def _forward(self, x: Tensor, b: int, h: int, w: int, e: int) -> Tensor:
        rows_in = self._sequence_dropout(x.reshape(b * h, w, e))  # 2 x (B*H, W, E), time = W
        cols_in = self._sequence_dropout(x.transpose(1, 2).reshape(b * w, h, e))  # 2 x (B*W, H, E), time = H
        if self.packed and x.device.type == "cpu" and torch.is_grad_enabled():
            return self._forward_packed(rows_in, cols_in, b, h, w)
        rows = _bidirectional(self.horizontal, *rows_in).reshape(b, h, w, 2 * self.hidden)
        cols = _bidirectional(self.vertical, *cols_in).reshape(b, w, h, 2 * self.hidden).transpose(1, 2)
        return torch.cat([rows, cols], dim=-1)

    def _forward_packed(self, rows_in: tuple[Tensor, Tensor], cols_in: tuple[Tensor, Tensor], b: int, h: int, w: int) -> Tensor:
        """The same function as the ``nn.LSTM`` calls on the same (dropped-out) sequences, faster
        to train on the CPU."""
        hid = self.hidden
        if h == w:  # one call for all four recurrences (rows and columns have the same length and count)
            fr, br, fc, bc = _BiLSTMs.apply(2, *_weights(self.horizontal, self.vertical), *rows_in, *cols_in).unbind(0)
        else:
            fr, br = _BiLSTMs.apply(1, *_weights(self.horizontal), *rows_in).unbind(0)
            fc, bc = _BiLSTMs.apply(1, *_weights(self.vertical), *cols_in).unbind(0)
        as_rows = lambda t: t.reshape(w, b, h, hid).permute(1, 2, 0, 3)  # noqa: E731  (W, B*H, .) -> (B, H, W, .)
        as_cols = lambda t: t.reshape(h, b, w, hid).permute(1, 0, 2, 3)  # noqa: E731  (H, B*W, .) -> (B, H, W, .)
        return torch.cat([as_rows(fr), as_rows(br.flip(0)), as_cols(fc), as_cols(bc.flip(0))], dim=-1)


def _bidirectional(lstm: nn.LSTM, fwd_in: Tensor, bwd_in: Tensor) -> Tensor:
    """A bidirectional ``nn.LSTM`` whose two directions read different inputs (their own dropout
    masks): two calls, each keeping its direction's half. One call when the inputs are the same."""
    out, _ = lstm(fwd_in)
    if bwd_in is fwd_in:
        return out
    out_b, _ = lstm(bwd_in)
    return torch.cat([out[..., : lstm.hidden_size], out_b[..., lstm.hidden_size :]], dim=-1)


def _weights(*lstms: nn.LSTM) -> list[Tensor]:
    """For the forward and backward direction of each LSTM, in that order (S of them): the recurrent
    kernels stacked (S, 4h, h), then the S input kernels (4h, E), then the S summed biases (4h)."""
    dirs = [(m, d) for m in lstms for d in ("l0", "l0_reverse")]
    w_hh = torch.stack([getattr(m, f"weight_hh_{d}") for m, d in dirs])
    w_ih = [getattr(m, f"weight_ih_{d}") for m, d in dirs]
    bias = [getattr(m, f"bias_ih_{d}") + getattr(m, f"bias_hh_{d}") for m, d in dirs]
    return [w_hh, *w_ih, *bias]


class _BiLSTMs(torch.autograd.Function):
    """K bidirectional LSTMs, run as S = 2K recurrences stepped together, zero initial state,
    PyTorch's gate order (i, f, g, o).

    Arguments: K, then ``_weights``'s list, then S sets of sequences (each (N, T, E), all the same
    shape; the two directions of one LSTM may be given the same tensor). Returns the hidden states
    (S, T, N, h); recurrence 2k runs over its set forward in time, recurrence 2k + 1 over its set
    backward (its time axis reversed). Layout (S, T, N, .) throughout: the input projection is one
    GEMM per recurrence into one buffer (the input kernels are not copied into a stack), each time
    step one batched matmul on (S, N, .) slices, and the kernels' gradients are computed after the
    loop, each with one matmul over all steps. The gate activations are computed in place in the projection's
    buffer, and the backward writes the gates' gradients over them, step by step (no per-step
    autograd graph, no concatenation, few temporaries: at these sizes each fresh buffer costs page
    faults). Hence one backward per forward: a second one (``retain_graph``) raises."""

    @staticmethod
    def forward(ctx, k: int, w_hh: Tensor, *args: Tensor) -> Tensor:
        s = 2 * k
        w_ih, bias, seqs = args[:s], args[s : 2 * s], args[2 * s :]
        n, t_len, e = seqs[0].shape
        four_h = w_hh.shape[1]
        h = four_h // 4
        x = _time_major(seqs).view(s, t_len * n, e)  # (S, T * N, E), row t * N + n
        gates = x.new_empty(s, t_len, n, four_h)
        for r in range(s):  # S = 2 or 4 recurrences: one GEMM each
            torch.addmm(bias[r], x[r], w_ih[r].t(), out=gates[r].view(t_len * n, four_h))
        cells = gates.new_empty(s, t_len, n, h)
        tanh_c = torch.empty_like(cells)
        hidden = gates.new_empty(s, t_len + 1, n, h)  # hidden[:, 0] is the zero initial state
        hidden[:, 0].zero_()
        w_hh_t = w_hh.transpose(1, 2)
        for t in range(t_len):
            a = gates[:, t]  # (S, N, 4h): becomes the activations i, f, g, o
            if t:
                a.baddbmm_(hidden[:, t], w_hh_t)
            i, f, g, o = a.split(h, dim=-1)
            g.mul_(2)
            a.sigmoid_()  # i, f, o, and sigmoid(2 z) for g ...
            g.mul_(2).sub_(1)  # ... so that g = tanh(z) (as in _tanh)
            c = cells[:, t]
            if t:
                torch.mul(f, cells[:, t - 1], out=c).addcmul_(i, g)
            else:
                torch.mul(i, g, out=c)
            torch.mul(o, _tanh(c, out=tanh_c[:, t]), out=hidden[:, t + 1])
        ctx.save_for_backward(x, w_hh, gates, cells, tanh_c, hidden, *w_ih)
        ctx.used = False
        return hidden[:, 1:]

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.used:  # the gates' buffer holds their gradients now
            raise RuntimeError("HVBiLSTM's packed CPU path cannot run backward twice (retain_graph)")
        ctx.used = True
        x, w_hh, acts, cells, tanh_c, hidden, *w_ih = ctx.saved_tensors
        s, t_len, n, h = cells.shape
        needs = ctx.needs_input_grad[2:]  # the input kernels', the biases', the sequence sets'
        dh = grad_out.new_zeros(s, n, h)
        dc = grad_out.new_zeros(s, n, h)
        prods = acts.new_empty(s, n, 4 * h)  # dL/d(activation) of i, f, g, o
        deriv = torch.empty_like(prods)  # the activations' derivatives
        tmp = dc.new_empty(s, n, h)
        for t in reversed(range(t_len)):
            a = acts[:, t]
            i, f, g, o = a.split(h, dim=-1)
            di, df, dg, do = prods.split(h, dim=-1)
            dh += grad_out[:, t]
            tc = tanh_c[:, t]
            torch.mul(tc, tc, out=tmp).neg_().add_(1).mul_(o)  # o * tanh'(c)
            dc.addcmul_(dh, tmp)
            torch.mul(dc, g, out=di)
            if t:
                torch.mul(dc, cells[:, t - 1], out=df)
            else:
                df.zero_()
            torch.mul(dc, i, out=dg)
            torch.mul(dh, tc, out=do)
            torch.sub(1, a, out=deriv).mul_(a)  # sigmoid' = s (1 - s) for i, f, o
            dgd = deriv[..., 2 * h : 3 * h]
            torch.mul(g, g, out=dgd).neg_().add_(1)  # tanh' = 1 - g^2
            dc.mul_(f)  # to the previous step's cell
            torch.mul(prods, deriv, out=a)  # a now holds dL/d(gates) of step t
            if t:
                torch.bmm(a, w_hh, out=dh)  # to the previous step's hidden state
        d_gates = acts.view(s, t_len * n, 4 * h)
        d_w_hh = None
        if ctx.needs_input_grad[1]:  # sum over steps of dgates_t^T h_{t-1}: one matmul (h_0 = 0 adds nothing)
            d_w_hh = torch.bmm(d_gates[:, n:].transpose(1, 2), hidden[:, 1:t_len].reshape(s, (t_len - 1) * n, h))
        d_w_ih = [d_gates[r].t().mm(x[r]) if needs[r] else None for r in range(s)]
        d_bias = [d_gates[r].sum(0) if needs[s + r] else None for r in range(s)]
        d_seqs = [None] * s
        for r in range(s):
            if needs[2 * s + r]:
                d = d_gates[r].mm(w_ih[r]).view(t_len, n, -1)
                d_seqs[r] = (d.flip(0) if r % 2 else d).transpose(0, 1)
        return None, d_w_hh, *d_w_ih, *d_bias, *d_seqs


def _tanh(x: Tensor, out: Tensor) -> Tensor:
    """tanh as 2 sigmoid(2 x) - 1 into ``out`` (may be ``x``): about 3x faster than ``torch.tanh``
    on the CPU here (its vectorised sigmoid against a slower tanh), within 2e-7 of it."""
    return torch.mul(x, 2, out=out).sigmoid_().mul_(2).sub_(1)


def _time_major(seqs: tuple[Tensor, ...]) -> Tensor:
    """S sets of sequences (N, T, E) -> (S, T, N, E): time-major, the odd ones time-reversed."""
    n, t_len, e = seqs[0].shape
    x = seqs[0].new_empty(len(seqs), t_len, n, e)
    rev = torch.arange(t_len - 1, -1, -1, device=x.device)
    for r, seq in enumerate(seqs):  # S = 2 or 4
        if r % 2:
            torch.index_select(seq.transpose(0, 1), 0, rev, out=x[r])
        else:
            x[r].copy_(seq.transpose(0, 1))
    return x


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
