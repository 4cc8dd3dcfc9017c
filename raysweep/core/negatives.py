"""Negative sampling, on the device, from the items that occur in the training split.

The paper's rule: a negative is never an item of the user's own training window. Loss (3)'s
negatives (`shared_negatives`) are N distinct items per sequence, shared by all its steps;
BCE's (`position_negatives`) one item per position, with replacement. Both are uniform over
the pool items outside the window, free of host syncs, and of static shape. Beyond the paper,
sampled CE can draw from the batch's own targets (`from_source`: in-batch or mixed, with an
optional logQ correction), and gbce takes gSASRec's calibration (`gbce_beta`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


def free_ranks(
    pool_rank: torch.Tensor, size: int, windows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which pool items each sequence may draw, without a [B, items] mask: (skips [B, W], free [B]).

    A window takes some pool ranks (its distinct items that occur in training); sorted, the
    j-th taken rank r_j has r_j - j free ranks below it. So the u-th free rank (0-based) is
    u + #{j : r_j - j <= u}: `skips` holds r_j - j (nondecreasing), then the pool's `size` for
    the window's unused columns, and `free` how many ranks each row has free.
    """
    ranks = pool_rank[windows].sort(dim=1).values  # -1: padding, or an item that never trains
    taken = ranks >= 0
    taken[:, 1:] &= ranks[:, 1:] != ranks[:, :-1]  # a repeated item takes its rank once
    ranks = torch.where(taken, ranks, size).sort(dim=1).values  # the taken ranks first, ascending
    step = torch.arange(ranks.shape[1], device=ranks.device)
    skips = torch.where(ranks < size, ranks - step, size)
    return skips, size - taken.sum(1)


def free_items(pool_items: torch.Tensor, skips: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[B, k]: the u-th free pool item of each row (u: [B, k], each below the row's `free`)."""
    return pool_items[u + torch.searchsorted(skips, u, right=True)]


def uniform_below(free: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """[B, count] integers uniform in [0, free_b) (fp64: biased by at most 2^-53 per value)."""
    u = torch.rand((len(free), count), generator=generator, device=free.device, dtype=torch.float64)
    return (u * free[:, None]).long()


@functools.lru_cache(maxsize=64)  # the same (N, pool, window) every step of a trial
def _draws_needed(n: int, pool_size: int, window: int) -> int | None:
    """How many draws with replacement from the pool leave N distinct items outside a window of
    `window` (8 sigma), or None when that would take more than 4N draws (N near the pool size:
    sample densely instead)."""
    allowed = pool_size - window
    draws = n + window
    while draws <= 4 * n:
        q = 1 - (1 - 1 / pool_size) ** draws  # chance that a given item was drawn
        if allowed * q - 8 * math.sqrt(allowed * q * (1 - q)) >= n:
            return draws
        draws = int(draws * 1.1) + 1
    return None


def shared_negatives(
    pool_rank: torch.Tensor,
    pool_items: torch.Tensor,
    windows: torch.Tensor,
    n: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """[B, N]: N distinct items per sequence, none in its window (loss (3)'s negatives).

    Uniform without replacement: random keys over the candidates, keep the N smallest. For
    N well below the pool the candidates are a few more than N draws with replacement,
    deduplicated (the distinct values of i.i.d. uniform draws are a uniform subset); else
    every pool item. Both are free of host syncs. `pool_rank`: each item's index in
    `pool_items`, -1 for items that never occur in training.
    """
    rows, size, device = len(windows), len(pool_items), windows.device
    taken = pool_rank[windows] % (size + 1)  # the window's pool ranks; padding and the like -> column `size`
    draws = _draws_needed(n, size, windows.shape[1])
    if draws is None:
        keys = torch.rand((rows, size + 1), generator=generator, device=device)
        keys.scatter_(1, taken, 2.0)
        keys[:, size] = 2.0
        return pool_items[keys.topk(n, dim=1, largest=False, sorted=False).indices]
    picks = torch.randint(size, (rows, draws), generator=generator, device=device)  # pool ranks
    # Each rank drawn keeps one owner among its copies (whichever the scatter leaves: their keys
    # are alike), the window's ranks none: deduplication without sorting the draws.
    order = torch.arange(draws, device=device, dtype=torch.int32)
    owner = torch.full((rows, size + 1), -1, dtype=torch.int32, device=device)
    owner.scatter_(1, picks, order.expand(rows, -1))
    owner.scatter_(1, taken, -1)
    keys = torch.rand((rows, draws), generator=generator, device=device)
    keys.masked_fill_(owner.gather(1, picks) != order, 2.0)
    return pool_items[picks.gather(1, keys.topk(n, dim=1, largest=False, sorted=False).indices)]


def position_negatives(
    pool_rank: torch.Tensor,
    pool_items: torch.Tensor,
    windows: torch.Tensor,
    steps: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """[B, steps]: one item per position, uniform with replacement over the pool items outside
    the sequence's window (without a [B, items] mask to sample from)."""
    skips, free = free_ranks(pool_rank, len(pool_items), windows)
    return free_items(pool_items, skips, uniform_below(free, steps, generator))


@dataclass(frozen=True)
class Drawn:
    """Loss (3)'s negatives from one source: `items` [B, N]; `allowed` [B, N] where some draws do
    not count (in-batch draws that fall in the row's own window); with logQ, the log of each
    candidate's sampling weight, for the negatives (`log_q` [B, N]) and the positives
    (`log_q_labels` [B, T])."""

    items: torch.Tensor
    allowed: torch.Tensor | None = None
    log_q: torch.Tensor | None = None
    log_q_labels: torch.Tensor | None = None


def in_batch_negatives(
    batch_items: torch.Tensor, windows: torch.Tensor, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, n] items, [B, n] allowed): n draws with replacement from the items at the batch's
    label positions (`batch_items`), so each item comes up as often as it is a target in the
    batch (about its popularity); a draw from the row's own window is not allowed."""
    picks = torch.randint(len(batch_items), (len(windows), n), generator=generator, device=windows.device)
    items = batch_items[picks]
    allowed = ~(items[:, :, None] == windows[:, None, :]).any(-1)
    return items, allowed


def from_source(
    source: str,
    pool_rank: torch.Tensor,
    pool_items: torch.Tensor,
    batch,
    n: int,
    generator: torch.Generator,
    logq: bool,
    num_items: int,
) -> Drawn:
    """N negatives per sequence of `batch` (a `tasks.Batch`) for sampled CE: `uniform` (loss (3)'s,
    `shared_negatives`), `in_batch` (`in_batch_negatives`) or `mixed` (N // 2 uniform, the rest
    in-batch). With `logq`, an item's sampling weight is how often it is expected among a row's N draws."""
    uniform = n if source == "uniform" else 0 if source == "in_batch" else n // 2
    batch_items = batch.labels.flatten()[batch.positions]
    parts, allowed = [], []
    if uniform:
        parts.append(shared_negatives(pool_rank, pool_items, batch.window, uniform, generator))
        allowed.append(torch.ones_like(parts[-1], dtype=torch.bool))
    if n - uniform:
        items, ok = in_batch_negatives(batch_items, batch.window, n - uniform, generator)
        parts.append(items)
        allowed.append(ok)
    items = torch.cat(parts, dim=1)
    mask = None if source == "uniform" else torch.cat(allowed, dim=1)
    if not logq:
        return Drawn(items, mask)
    ones = torch.ones_like(batch_items, dtype=torch.float32)
    counts = torch.zeros(num_items + 1, device=items.device).scatter_add_(0, batch_items, ones)
    weight = uniform / len(pool_items) + (n - uniform) * counts / max(len(batch_items), 1)
    weight = weight.clamp(min=1e-30).log()  # (padding and never-drawn items: a large negative, never inf)
    return Drawn(items, mask, weight[items], weight[batch.labels])


def gbce_beta(n: int, pool_size: int, t: float) -> float:
    """gSASRec's beta: with sampling rate alpha = N / (pool - 1), beta = alpha (t (1 - 1/alpha) + 1/alpha),
    i.e. 1 - t (1 - alpha): 1 at t = 0 (plain BCE), alpha at t = 1."""
    alpha = n / (pool_size - 1)
    return alpha * (t * (1 - 1 / alpha) + 1 / alpha)
