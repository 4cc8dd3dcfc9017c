"""SASRec (Kang & McAuley, 2018) with pmixer's block, as the paper's code builds it."""

from __future__ import annotations

import math

import torch
from torch import nn


class SASRecBlock(nn.Module):
    """Q = LN(x), K = V = x; x = Q + MHA; then x = LN(x); x = x + FFN(x). (pmixer's layout)"""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, hidden),
            nn.Dropout(dropout),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        q = self.attn_norm(x)
        out, _ = self.attn(q, x, x, attn_mask=causal, need_weights=False)
        x = self.ffn_norm(q + out)
        return x + self.ffn(x)


class SASRec(nn.Module):
    def __init__(
        self,
        num_items: int,
        hidden: int = 64,
        blocks: int = 2,
        heads: int = 1,
        max_len: int = 200,
        dropout: float = 0.1,
    ):
        super().__init__()
        from raysweep.core.models import init_normal

        self.num_items = num_items
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(SASRecBlock(hidden, heads, dropout) for _ in range(blocks))
        self.final_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.scale = math.sqrt(hidden)
        init_normal(self)

    def item_weights(self) -> torch.Tensor:
        """The output layer: the tied item embeddings of padding and items 1..num_items."""
        return self.item_emb.weight[: self.num_items + 1]

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        length = items.shape[1]
        # Right padding and absolute positions from the window start: the causal mask alone
        # keeps real steps from attending to the padding that follows them.
        positions = torch.arange(length, device=items.device)
        real = (items > 0).unsqueeze(-1)
        x = self.emb_dropout(self.item_emb(items) * self.scale + self.pos_emb(positions)) * real
        causal = torch.ones(length, length, dtype=torch.bool, device=items.device).triu(1)
        for block in self.blocks:
            x = block(x, causal) * real
        return self.final_norm(x)
