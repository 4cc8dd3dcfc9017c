"""Sequence encoders. Each maps item ids [B, T] to hidden states [B, T, d]; scores are
hidden states times the tied item-embedding matrix (`model.item_weights()`).
"""

from __future__ import annotations

import torch
from torch import nn

from raysweep.core.models.bert4rec import BERT4Rec
from raysweep.core.models.gru4rec import GRU4Rec
from raysweep.core.models.sasrec import SASRec


def build_model(
    name: str, num_items: int, hidden: int, blocks: int, heads: int, max_len: int, dropout: float
) -> nn.Module:
    if name == "sasrec":
        return SASRec(num_items, hidden, blocks, heads, max_len, dropout)
    if name == "bert4rec":
        return BERT4Rec(num_items, hidden, blocks, heads, max_len, dropout)
    if name == "gru4rec":
        return GRU4Rec(num_items, hidden)
    raise ValueError(f"unknown sequential model {name!r}")


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    """N(0, std) for linear and embedding weights, zero biases, LayerNorm left at (1, 0).

    nn.MultiheadAttention's packed in-projection is a bare Parameter, not a Linear, so it
    keeps PyTorch's default (Xavier) init, as in the paper's code.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
