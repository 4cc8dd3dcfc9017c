"""GRU4Rec as the paper's code builds it: one GRU layer over item embeddings, tied output.

The paper passes dropout=0.1 to a one-layer nn.GRU, where PyTorch applies no dropout at
all, so this model has none. The GRU itself runs in fp32 whatever autocast asks: PyTorch's
autocast casts cuDNN RNNs to fp16 (not bf16) on CUDA, with no loss scaling here, and runs them
in fp32 on the CPU; fp32 everywhere is one truth to record (`FP32_PARTS`).
"""

from __future__ import annotations

import torch
from torch import nn


class GRU4Rec(nn.Module):
    FP32_PARTS = "GRU in fp32"

    def __init__(self, num_items: int, hidden: int = 64):
        super().__init__()
        from raysweep.core.models import init_normal

        self.num_items = num_items
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.gru = nn.GRU(hidden, hidden, num_layers=1, batch_first=True)
        init_normal(self.item_emb)

    def item_weights(self) -> torch.Tensor:
        """The output layer: the tied item embeddings of padding and items 1..num_items."""
        return self.item_emb.weight[: self.num_items + 1]

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        with torch.autocast(items.device.type, enabled=False):
            hidden, _ = self.gru(self.item_emb(items).float())
        return hidden
