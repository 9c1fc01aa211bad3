"""HV-BiLSTM (paper Sec. 3.1, from ViT-PCM): refine the patch grid with bidirectional LSTMs
running along every row and every column.

All rows of all images form one batch of sequences and all columns another, so there is no
Python loop over rows or columns. The recurrences are PyTorch's LSTM kernels (cuDNN on the GPU,
the CPU kernels otherwise) on the parameters of two bidirectional ``nn.LSTM``, one per orientation.
"""

from __future__ import annotations

import torch
from torch import _VF, Tensor, nn


class HVBiLSTM(nn.Module):
    """(B, H, W, E) -> (B, H, W, 4 * hidden): [horizontal BiLSTM, vertical BiLSTM] concatenated.

    Dropout (p = ``dropout``) is applied to the input grid, as in SPEC.md Sec. 1. ``lstm_dropout``
    is Keras's ``LSTM(dropout=)`` as ViT-PCM uses it: in training, each row's (column's) input
    sequence is multiplied by one Bernoulli mask for all its time steps, and, as in Keras's
    ``Bidirectional`` (two LSTM layers, each drawing its own), the forward and the backward
    direction draw separate masks. Four draws per call, in this order: rows forward, rows backward,
    columns forward, columns backward. Each direction then runs once, on its own input, with its
    own weights (``_bidirectional``).
    """

    def __init__(self, in_dim: int = 768, hidden: int = 192, dropout: float = 0.2, lstm_dropout: float = 0.0) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.hidden = hidden
        self.out_dim = 4 * hidden
        self.dropout = nn.Dropout(dropout)
        self.lstm_dropout = lstm_dropout
        self.horizontal = nn.LSTM(in_dim, hidden, batch_first=True, bidirectional=True)
        self.vertical = nn.LSTM(in_dim, hidden, batch_first=True, bidirectional=True)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-1] != self.in_dim:
            raise ValueError(f"HVBiLSTM expects (B, H, W, {self.in_dim}), got {tuple(x.shape)}")
        b, h, w, e = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            # the LSTMs run in fp32 even under bf16 autocast: cuDNN's bf16 RNN support varies by
            # version and GPU, and the recurrences are a small share of the step's FLOPs
            x = self.dropout(x.float())
            rows_in = self._sequence_dropout(x.reshape(b * h, w, e))  # 2 x (B*H, W, E), time = W
            cols_in = self._sequence_dropout(x.transpose(1, 2).reshape(b * w, h, e))  # 2 x (B*W, H, E), time = H
            rows = _bidirectional(self.horizontal, *rows_in).reshape(b, h, w, 2 * self.hidden)
            cols = _bidirectional(self.vertical, *cols_in).reshape(b, w, h, 2 * self.hidden).transpose(1, 2)
            return torch.cat([rows, cols], dim=-1)

    def _sequence_dropout(self, seqs: Tensor) -> tuple[Tensor, Tensor]:
        """(N, T, E) -> the forward and the backward direction's inputs: each with one dropout mask
        per sequence, shared by its time steps (Keras LSTM dropout), drawn separately for each
        direction (Keras Bidirectional). Without dropout both are ``seqs`` itself."""
        p = self.lstm_dropout
        if not (self.training and p):
            return seqs, seqs
        masks = seqs.new_empty(2, seqs.shape[0], 1, seqs.shape[2]).bernoulli_(1.0 - p).div_(1.0 - p)
        return seqs * masks[0], seqs * masks[1]


def _bidirectional(lstm: nn.LSTM, fwd_in: Tensor, bwd_in: Tensor) -> Tensor:
    """A one-layer bidirectional ``nn.LSTM`` whose two directions may read different inputs (their
    own dropout masks), (N, T, E) -> (N, T, 2 h): one call of the module when the inputs are the
    same tensor, else each direction once, as a unidirectional LSTM on the module's parameters of
    that direction (the backward one over the time-reversed input, its output reversed back)."""
    if bwd_in is fwd_in:
        return lstm(fwd_in)[0]
    fwd = _one_direction(lstm, fwd_in, "")
    bwd = _one_direction(lstm, bwd_in.flip(1), "_reverse").flip(1)
    return torch.cat([fwd, bwd], dim=-1)


def _one_direction(lstm: nn.LSTM, seqs: Tensor, suffix: str) -> Tensor:
    """(N, T, E) -> (N, T, h): ``lstm``'s layer-0 direction ``suffix`` ("" forward, "_reverse"),
    run forward in time from a zero state, through the same LSTM kernel ``nn.LSTM`` calls, so that
    the gradients reach the module's own parameters."""
    weights = [getattr(lstm, f"{name}_l0{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    h0 = seqs.new_zeros(1, seqs.shape[0], lstm.hidden_size)
    # (input, (h0, c0), weights, has_biases, num_layers, dropout, train, bidirectional, batch_first)
    return _VF.lstm(seqs, (h0, h0), weights, True, 1, 0.0, lstm.training, False, True)[0]


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
