"""Leave-one-out split and the on-device tensors every trial trains and evaluates from.

Leave-one-out as in the paper's code: a user's last item is the test target, the
second-to-last the validation target, the rest trains. The test input is the whole history
before the last item (validation item included; the model is not retrained on it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from raysweep.core.errors import UserError


@dataclass(frozen=True)
class Split:
    """Host-side sequences in CSR form: user u's items are items[offsets[u]:offsets[u+1]]."""

    items: np.ndarray  # int64, every user's items in time order
    offsets: np.ndarray  # int64 [num_users + 1]
    num_items: int  # largest item id; id 0 is padding

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    def sha256(self) -> str:
        """The hash of exactly what a trial learns from: every user's items, in order. A run
        records it per dataset, so a resume on changed data is refused."""
        digest = hashlib.sha256(np.ascontiguousarray(self.offsets, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(self.items, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def train(self, u: int) -> np.ndarray:
        return self.items[self.offsets[u] : self.offsets[u + 1] - 2]

    def val_target(self, u: int) -> int:
        return int(self.items[self.offsets[u + 1] - 2])

    def test_target(self, u: int) -> int:
        return int(self.items[self.offsets[u + 1] - 1])


def leave_one_out(frame: pd.DataFrame, name: str = "dataset") -> Split:
    users = frame["user_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    offsets = np.r_[starts, len(users)].astype(np.int64)
    lengths = np.diff(offsets)
    if lengths.min() < 3:
        short = users[starts[np.argmin(lengths)]]
        raise UserError(
            f"{name}: user {short} has {lengths.min()} interactions; leave-one-out needs at least 3"
        )
    items = frame["item_id"].to_numpy().astype(np.int64)
    return Split(items=items, offsets=offsets, num_items=int(items.max()))


def _right_padded(split: Split, ends: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """For each user, the last `width` items before position `ends[u]`, left-aligned, zero-padded."""
    lengths = np.minimum(ends - split.offsets[:-1], width)
    rows = np.zeros((split.num_users, width), dtype=np.int64)
    column = np.arange(width)
    take = column[None, :] < lengths[:, None]
    source = (ends - lengths)[:, None] + column[None, :]
    rows[take] = split.items[source[take]]
    return rows, lengths


@dataclass
class SequenceData:
    """Everything a trial needs, as tensors on its device (batches are cut from these, no DataLoader).

    train_windows: the last L+1 training items per user (input = [:-1], labels = [1:]).
    val_history / test_history: the last L items before the validation / test target.
    seen_*: every item before the target (the whole history, not just the last L), which
    the evaluator removes from the ranking.
    """

    num_items: int
    max_len: int
    train_windows: torch.Tensor  # [U, L+1]
    train_lengths: torch.Tensor  # [U]
    train_lengths_host: np.ndarray  # host copy of train_lengths, to trim batches without a device sync
    val_history: torch.Tensor  # [U, L]
    val_lengths: torch.Tensor
    val_targets: torch.Tensor
    test_history: torch.Tensor
    test_lengths: torch.Tensor
    test_targets: torch.Tensor
    items: torch.Tensor  # flat histories (the seen-item lists are prefixes of them)
    starts: torch.Tensor  # [U] where each user's history starts in `items`
    val_seen_lengths: torch.Tensor  # [U] len(s[:-2])
    test_seen_lengths: torch.Tensor  # [U] len(s[:-1])
    pool_items: torch.Tensor  # the items that occur in the training split (negatives come from them)
    pool_rank: torch.Tensor  # [num_items + 1]: each item's index in pool_items, -1 if not there
    max_window_items: int  # most distinct items in one training window (bounds N)

    @property
    def num_users(self) -> int:
        return len(self.train_lengths)

    @property
    def pool_size(self) -> int:
        return len(self.pool_items)


def sequence_data(split: Split, max_len: int, device: torch.device | str = "cpu") -> SequenceData:
    ends = split.offsets[1:]
    windows, window_lengths = _right_padded(split, ends - 2, max_len + 1)
    val_history, val_lengths = _right_padded(split, ends - 2, max_len)
    test_history, test_lengths = _right_padded(split, ends - 1, max_len)
    pool = np.zeros(split.num_items + 1, dtype=bool)
    train_mask = np.ones(len(split.items), dtype=bool)
    train_mask[ends - 1] = train_mask[ends - 2] = False
    pool[split.items[train_mask]] = True
    ordered = np.sort(windows, axis=1)
    distinct = ((ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] > 0)).sum(1) + (ordered[:, 0] > 0)

    def t(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(array, device=device)

    return SequenceData(
        num_items=split.num_items,
        max_len=max_len,
        train_windows=t(windows),
        train_lengths=t(window_lengths),
        train_lengths_host=window_lengths,
        val_history=t(val_history),
        val_lengths=t(val_lengths),
        val_targets=t(split.items[ends - 2]),
        test_history=t(test_history),
        test_lengths=t(test_lengths),
        test_targets=t(split.items[ends - 1]),
        items=t(split.items),
        starts=t(split.offsets[:-1]),
        val_seen_lengths=t(np.diff(split.offsets) - 2),
        test_seen_lengths=t(np.diff(split.offsets) - 1),
        pool_items=t(np.flatnonzero(pool)),
        pool_rank=t(np.where(pool, np.cumsum(pool) - 1, -1)),
        max_window_items=int(distinct.max()),
    )
