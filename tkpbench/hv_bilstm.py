"""HV-BiLSTM (paper Sec. 3.1, from ViT-PCM): refine the patch grid with bidirectional LSTMs
running along every row and every column.

All rows of all images form one batch of sequences and all columns another, so there is no
Python loop over rows or columns.
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
        rows, _ = self.horizontal(self._sequence_dropout(x.reshape(b * h, w, e)))  # (B*H, W, 2*hidden)
        rows = rows.reshape(b, h, w, 2 * self.hidden)
        cols_in = self._sequence_dropout(x.transpose(1, 2).reshape(b * w, h, e))
        cols, _ = self.vertical(cols_in)  # (B*W, H, 2*hidden)
        cols = cols.reshape(b, w, h, 2 * self.hidden).transpose(1, 2)
        return torch.cat([rows, cols], dim=-1)


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
