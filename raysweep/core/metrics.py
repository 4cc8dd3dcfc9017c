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
from typing import NamedTuple

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


class Sampler(NamedTuple):
    """BERT4Rec's sampled protocol at test time: each target ranked among `n` negatives drawn
    without replacement in proportion to `popularity` (a count per item id), never padding, an
    item of the user's history or the target; `generator` makes the draws repeatable."""

    popularity: torch.Tensor  # [num_items + 1] float
    n: int
    generator: torch.Generator


def draw_negatives(
    sampler: Sampler, targets: torch.Tensor, seen_rows: torch.Tensor, seen_items: torch.Tensor
) -> torch.Tensor:
    """[users, n] distinct eligible items per user. Successive sampling: 4n draws with
    replacement from the popularity distribution (one cumulative sum, a binary search each), the
    user's excluded items and repeats dropped, the first n kept, which is sampling without
    replacement in proportion to popularity, at a fraction of a masked per-user
    `torch.multinomial`'s cost. A row left short (rare) draws with that multinomial instead."""
    rows = torch.arange(len(targets), device=targets.device)
    width = len(sampler.popularity)
    excluded = torch.zeros(len(targets), width, dtype=torch.bool, device=targets.device)
    excluded[seen_rows, seen_items] = True
    excluded[rows, targets] = True
    excluded[:, 0] = True
    cdf = sampler.popularity.cumsum(0)
    u = torch.rand(len(targets), 4 * sampler.n, generator=sampler.generator, device=targets.device)
    draws = torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_(max=width - 1)
    ordered, order = draws.sort(dim=1, stable=True)  # (stable: a repeat's first draw comes first)
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    keep = ~excluded.gather(1, draws) & ~torch.zeros_like(repeat).scatter_(1, order, repeat)
    kept = keep.cumsum(1)
    short = kept[:, -1] < sampler.n
    if short.any():
        weights = sampler.popularity.expand(int(short.sum()), -1).masked_fill(excluded[short], 0.0)
        refill = torch.multinomial(weights, sampler.n, replacement=False, generator=sampler.generator)
    keep &= kept <= sampler.n
    keep[short] = False
    negatives = torch.empty(len(targets), sampler.n, dtype=draws.dtype, device=draws.device)
    negatives[~short] = draws[keep].view(-1, sampler.n)
    if short.any():
        negatives[short] = refill
    return negatives


def sampled_ranks(
    scores: torch.Tensor,
    targets: torch.Tensor,
    seen_rows: torch.Tensor,
    seen_items: torch.Tensor,
    full: torch.Tensor,
    sampler: Sampler,
) -> torch.Tensor:
    """0-based rank of each target among its drawn negatives (ties against the target, like the
    full rank); a full-rank miss stays a miss (rank n)."""
    rows = torch.arange(len(targets), device=scores.device)
    drawn = draw_negatives(sampler, targets, seen_rows, seen_items)
    target_score = scores[rows, targets].float()
    rank = (scores.gather(1, drawn).float() >= target_score[:, None]).sum(1)
    miss = full >= miss_rank(scores.shape[1])
    return torch.where(miss, torch.full_like(rank, sampler.n), rank)


def rank_users(
    score: Callable[[torch.Tensor], torch.Tensor],
    users: torch.Tensor,
    targets: torch.Tensor,
    items: torch.Tensor,
    starts: torch.Tensor,
    seen_lengths: torch.Tensor,
    chunk: int | None = None,
    sampler: Sampler | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each user's target rank (int32, on the CPU), and with a `sampler` its rank among the
    sampled negatives too (else None); score(user_chunk) returns fp32 scores [chunk, num_items + 1]."""
    chunk = chunk or knob(EVAL_CHUNK_USERS, users.device)
    ranks = torch.empty(len(users), dtype=torch.int32, device=users.device)
    sampled = None if sampler is None else torch.empty_like(ranks)
    for begin in range(0, len(users), chunk):
        u = users[begin : begin + chunk]
        rows, seen = seen_mask_indices(items, starts[u], seen_lengths[u])
        scores = score(u)
        full = rank_targets(scores, targets[u], rows, seen)
        ranks[begin : begin + len(u)] = full
        if sampler is not None:
            sampled[begin : begin + len(u)] = sampled_ranks(scores, targets[u], rows, seen, full, sampler)
    return ranks.cpu(), None if sampled is None else sampled.cpu()
