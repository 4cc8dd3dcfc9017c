"""GRU4Rec as the paper's code builds it: one GRU layer over item embeddings, tied output.

The paper passes dropout=0.1 to a one-layer nn.GRU, where PyTorch applies no dropout at
all, so this model has none.
"""

from __future__ import annotations

import torch
from torch import nn


class GRU4Rec(nn.Module):
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
        hidden, _ = self.gru(self.item_emb(items))
        return hidden
