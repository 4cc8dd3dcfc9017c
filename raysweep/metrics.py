"""Full-rank (unsampled) HR, NDCG and MRR at 10 and 100, with the user's seen items removed.

The target's rank is the number of candidates scoring strictly higher plus the number tied
with it (ties count against the target). Item 0 (padding) and every item of the user's
history before the target are removed from the ranking; a target that occurs in that
history is therefore a miss, as in the paper's code. Scores are fp32 and whole chunks of
users are ranked with one masked matrix product each: no per-user Python loop.
"""
from __future__ import annotations

from typing import Callable

import torch

KS = (10, 100)
METRICS = tuple(f"{m}@{k}" for k in KS for m in ("hr", "ndcg", "mrr"))


def seen_mask_indices(items: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, item) pairs of each user's seen items: items[starts[r] : starts[r] + lengths[r]]."""
    total = int(lengths.sum())
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=items.device), lengths, output_size=total)
    first = torch.cumsum(lengths, 0) - lengths
    offset = torch.arange(total, device=items.device) - first[rows]
    return rows, items[starts[rows] + offset]


def rank_targets(scores: torch.Tensor, targets: torch.Tensor, seen_rows: torch.Tensor,
                 seen_items: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among the unseen items (len(scores[0]) when it is a miss)."""
    scores = scores.float().clone()
    rows = torch.arange(len(targets), device=scores.device)
    target_seen = torch.zeros(len(targets), dtype=torch.bool, device=scores.device)
    target_seen[seen_rows[seen_items == targets[seen_rows]]] = True
    target_score = scores[rows, targets].clone()
    scores[seen_rows, seen_items] = float("-inf")
    scores[:, 0] = float("-inf")
    # Higher plus tied, in one pass; the target ties with itself.
    rank = (scores >= target_score[:, None]).sum(1) - 1
    return torch.where(target_seen, torch.full_like(rank, scores.shape[1]), rank)


def metrics_from_ranks(rank: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-user metric values (still on the device) from 0-based ranks."""
    out = {}
    for k in KS:
        hit = rank < k
        out[f"hr@{k}"] = hit.float()
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(rank.float() + 2.0), 0.0)
        out[f"mrr@{k}"] = torch.where(hit, 1.0 / (rank.float() + 1.0), 0.0)
    return out


# Users ranked at once. On a GPU many, for few kernel launches; on the CPU few, so that a
# chunk's [chunk, items] scores stay in the cache through the masking and counting passes
# (and under the size glibc maps afresh, page-faulting, for every chunk). A validation pass on
# one thread, chunk 1024 -> 32: Beauty (10,000 users) 6.35 -> 2.34 s, ML-1M (6,040) 8.60 -> 3.48 s.
CHUNK_USERS = {"cuda": 1024, "cpu": 32}


def evaluate(score: Callable[[torch.Tensor], torch.Tensor], users: torch.Tensor, targets: torch.Tensor,
             items: torch.Tensor, starts: torch.Tensor, seen_lengths: torch.Tensor,
             chunk: int | None = None) -> dict[str, float]:
    """Mean metrics over `users`; score(user_chunk) returns fp32 scores [chunk, num_items + 1]."""
    chunk = chunk or CHUNK_USERS.get(users.device.type, 1024)
    sums = {name: torch.zeros((), device=users.device) for name in METRICS}
    for begin in range(0, len(users), chunk):
        u = users[begin : begin + chunk]
        rows, seen = seen_mask_indices(items, starts[u], seen_lengths[u])
        rank = rank_targets(score(u), targets[u], rows, seen)
        for name, value in metrics_from_ranks(rank).items():
            sums[name] += value.sum()
    return {name: float(total) / len(users) for name, total in sums.items()}
