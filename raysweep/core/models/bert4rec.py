"""BERT4Rec (Sun et al., 2019) in the HF BERT layout the paper's code uses.

Learned positions, embedding LayerNorm + dropout, post-LN blocks with GELU and FFN 256,
bidirectional attention over real items only, a [MASK] token (id num_items + 1), item
embeddings not scaled, tied output with no transform or bias.
"""

from __future__ import annotations

import torch
from torch import nn


class BERTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.attn_dropout = nn.Dropout(dropout)
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden), nn.Dropout(dropout)
        )
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(x, x, x, key_padding_mask=padding, need_weights=False)
        x = self.attn_norm(x + self.attn_dropout(out))
        return self.ffn_norm(x + self.ffn(x))


class BERT4Rec(nn.Module):
    def __init__(
        self,
        num_items: int,
        hidden: int = 64,
        blocks: int = 2,
        heads: int = 2,
        max_len: int = 200,
        dropout: float = 0.1,
        ffn: int = 256,
    ):
        super().__init__()
        from raysweep.core.models import init_normal

        self.num_items = num_items
        self.mask_id = num_items + 1
        self.item_emb = nn.Embedding(num_items + 2, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.emb_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(BERTBlock(hidden, heads, ffn, dropout) for _ in range(blocks))
        init_normal(self)

    def item_weights(self) -> torch.Tensor:
        """The output layer: the tied item embeddings of padding and items 1..num_items."""
        return self.item_emb.weight[: self.num_items + 1]

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(items.shape[1], device=items.device)
        x = self.emb_dropout(self.emb_norm(self.item_emb(items) + self.pos_emb(positions)))
        padding = items == 0
        for block in self.blocks:
            x = block(x, padding)
        return x
