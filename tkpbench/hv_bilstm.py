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

    Dropout (p = ``dropout``) is applied to the input grid, as in SPEC.md Sec. 1.
    """

    def __init__(self, in_dim: int = 768, hidden: int = 192, dropout: float = 0.2) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.hidden = hidden
        self.out_dim = 4 * hidden
        self.dropout = nn.Dropout(dropout)
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

    def _forward(self, x: Tensor, b: int, h: int, w: int, e: int) -> Tensor:
        rows, _ = self.horizontal(x.reshape(b * h, w, e))  # (B*H, W, 2*hidden)
        rows = rows.reshape(b, h, w, 2 * self.hidden)
        cols_in = x.transpose(1, 2).reshape(b * w, h, e)
        cols, _ = self.vertical(cols_in)  # (B*W, H, 2*hidden)
        cols = cols.reshape(b, w, h, 2 * self.hidden).transpose(1, 2)
        return torch.cat([rows, cols], dim=-1)
