"""The two ways the paper's sequence models learn and are queried; all that differs between
next-item models (SASRec, GRU4Rec) and the masked-item model (BERT4Rec) lives here.

- Next item: each user's window of the last L+1 training items trains on input w[:-1]
  against labels w[1:]; a user is scored at the last step of their last L items.
- Masked item (the paper's BERT4Rec): the last L training items, each replaced by [MASK] with
  probability 0.2 (no 80/10/10), train at the masked positions; a user is scored at a [MASK]
  placed after their last L-1 items.

Which positions carry a label is decided on the host, from lengths the trainer knows, so a
training step never reads the device back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raysweep.core.devices import to_device
from raysweep.core.losses import real_positions_host
from raysweep.core.split import SequenceData

MASK_PROB = 0.2


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor  # [B, T] the items the model reads
    labels: torch.Tensor  # [B, T] the item to predict at each step (0: none)
    positions: torch.Tensor  # flat indices (row x T + step) of the steps that carry a label
    window: torch.Tensor  # [B, W] every item of each row's window (negatives avoid them)


def last_items(windows: torch.Tensor, lengths: torch.Tensor, count: int) -> torch.Tensor:
    """The last `count` items of right-padded rows whose width is count + 1, still right-padded."""
    full = (lengths > count)[:, None]
    return torch.where(full, windows[:, 1:], windows[:, :-1])


def next_item_batch(data: SequenceData, users: torch.Tensor, lengths: np.ndarray) -> Batch:
    """`lengths`: the users' window lengths (host); a window of n items has n - 1 labels."""
    width = int(lengths.max())
    window = data.train_windows[users][
        :, :width
    ]  # right padding: trimming it changes nothing for a causal model
    positions = to_device(real_positions_host(np.maximum(lengths - 1, 0), width - 1), users.device)
    return Batch(window[:, :-1], window[:, 1:], positions, window)


def bert_masks(lengths: np.ndarray, max_len: int, rng: np.random.Generator) -> np.ndarray:
    """[B, width]: which of the last `max_len` items of each window are masked; width is the
    batch's longest sequence."""
    seq_lengths = np.minimum(lengths, max_len)
    width = int(seq_lengths.max())
    return (rng.random((len(lengths), width)) < MASK_PROB) & (np.arange(width) < seq_lengths[:, None])


def masked_item_batch(
    data: SequenceData, users: torch.Tensor, lengths: np.ndarray, mask_id: int, rng: np.random.Generator
) -> Batch:
    masked = bert_masks(lengths, data.max_len, rng)
    window = last_items(data.train_windows[users], data.train_lengths[users], data.max_len)[
        :, : masked.shape[1]
    ]
    inputs = window.masked_fill(to_device(masked, users.device), mask_id)
    return Batch(inputs, window, to_device(np.flatnonzero(masked), users.device), window)


def query(
    masked: bool, history: torch.Tensor, lengths: torch.Tensor, max_len: int, mask_id: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the model reads, the step whose hidden state scores the user) for right-padded
    histories of the last L items; `masked`: the masked-item model (BERT4Rec)."""
    if not masked:
        return history, lengths - 1
    shifted = torch.cat([history[:, 1:], torch.zeros_like(history[:, :1])], dim=1)
    seq = torch.where((lengths == max_len)[:, None], shifted, history)
    at = torch.clamp(lengths, max=max_len - 1)
    seq[torch.arange(len(seq), device=seq.device), at] = mask_id
    return seq, at
