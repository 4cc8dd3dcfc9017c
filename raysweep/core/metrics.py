"""Full-rank (unsampled) HR, NDCG and MRR at 10 and 100, with the user's seen items removed.

The target's rank is the number of candidates scoring strictly higher plus the number tied
with it (ties count against the target). Item 0 (padding) and every item of the user's
history before the target are removed from the ranking; a target that occurs in that
history is therefore a miss, as in the paper's code, and so is a target whose model scores
NaN or infinity (a diverged model never looks perfect). Scores are fp32 and whole chunks of
users are ranked with one masked matrix product each: no per-user Python loop. The ranks
themselves are kept (`rank_users`), so every metric at any k can be recomputed from them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from raysweep.core.devices import EVAL_CHUNK_USERS, knob

KS = (10, 100)
METRICS = tuple(f"{m}@{k}" for k in KS for m in ("hr", "ndcg", "mrr"))


def seen_mask_indices(
    items: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, item) pairs of each user's seen items: items[starts[r] : starts[r] + lengths[r]]."""
    total = int(lengths.sum())
    rows = torch.repeat_interleave(
        torch.arange(len(lengths), device=items.device), lengths, output_size=total
    )
    first = torch.cumsum(lengths, 0) - lengths
    offset = torch.arange(total, device=items.device) - first[rows]
    return rows, items[starts[rows] + offset]


def rank_targets(
    scores: torch.Tensor, targets: torch.Tensor, seen_rows: torch.Tensor, seen_items: torch.Tensor
) -> torch.Tensor:
    """0-based rank of each target among the unseen items; a miss (the target seen before, or a
    row with a NaN score or a target scored +-inf) gets `miss_rank`: the catalogue's size, at
    least the largest k, so that it is never a hit."""
    scores = scores.float().clone()
    rows = torch.arange(len(targets), device=scores.device)
    target_seen = torch.zeros(len(targets), dtype=torch.bool, device=scores.device)
    target_seen[seen_rows[seen_items == targets[seen_rows]]] = True
    target_score = scores[rows, targets].clone()
    # NaN compares false with everything, which would rank the target first.
    broken = torch.isnan(scores).any(1) | ~torch.isfinite(target_score)
    scores[seen_rows, seen_items] = float("-inf")
    scores[:, 0] = float("-inf")
    # Higher plus tied, in one pass; the target ties with itself.
    rank = (scores >= target_score[:, None]).sum(1) - 1
    return torch.where(target_seen | broken, torch.full_like(rank, miss_rank(scores.shape[1])), rank)


def miss_rank(catalogue: int) -> int:
    return max(catalogue, max(KS))


def metrics_from_ranks(rank: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-user metric values from 0-based ranks."""
    out = {}
    for k in KS:
        hit = rank < k
        out[f"hr@{k}"] = hit.double()
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(rank.double() + 2.0), 0.0)
        out[f"mrr@{k}"] = torch.where(hit, 1.0 / (rank.double() + 1.0), 0.0)
    return out


def mean_metrics(rank: torch.Tensor | np.ndarray) -> dict[str, float]:
    """HR, NDCG and MRR at 10 and 100, averaged over users (float64), from their ranks."""
    rank = rank if torch.is_tensor(rank) else torch.from_numpy(np.array(rank, dtype=np.int64))
    return {name: float(values.mean()) for name, values in metrics_from_ranks(rank).items()}


def rank_users(
    score: Callable[[torch.Tensor], torch.Tensor],
    users: torch.Tensor,
    targets: torch.Tensor,
    items: torch.Tensor,
    starts: torch.Tensor,
    seen_lengths: torch.Tensor,
    chunk: int | None = None,
) -> torch.Tensor:
    """Each user's target rank (int32, on the CPU); score(user_chunk) returns fp32 scores
    [chunk, num_items + 1]."""
    chunk = chunk or knob(EVAL_CHUNK_USERS, users.device)
    ranks = torch.empty(len(users), dtype=torch.int32, device=users.device)
    for begin in range(0, len(users), chunk):
        u = users[begin : begin + chunk]
        rows, seen = seen_mask_indices(items, starts[u], seen_lengths[u])
        ranks[begin : begin + len(u)] = rank_targets(score(u), targets[u], rows, seen)
    return ranks.cpu()
