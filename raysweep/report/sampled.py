"""Sampled metrics from full ranks, exactly: what HR@k and NDCG@k would have been had each test
user's target been ranked among n negatives drawn uniformly, without replacement, from the items
the user could be recommended (BERT4Rec's protocol draws n = 100), instead of among all items.

With the target's full rank r (the number of candidate items scored above it) among the pool of
P candidate negatives, the number of drawn negatives that outrank the target is hypergeometric
(P items, r of them "above", n draws), so the expected sampled metrics follow from r and P alone:
no sampling noise and no retraining (Krichene & Rendle, "On Sampled Metrics for Item
Recommendation", KDD 2020). A full-rank miss (the target seen before, a broken score) stays a miss.
"""

from __future__ import annotations

import numpy as np
from scipy import special

from raysweep.core.split import Split

SAMPLED_N = 100  # negatives per test user in BERT4Rec's sampled protocol


def negative_pool(split: Split) -> np.ndarray:
    """Per test user, how many items a sampler may draw as negatives: every item id but padding,
    the items of the user's history before the target, and the target itself."""
    lengths = np.diff(split.offsets)
    user = np.repeat(np.arange(split.num_users), lengths)
    last = np.zeros(len(split.items), dtype=bool)
    last[split.offsets[1:] - 1] = True
    history = np.unique(np.stack([user[~last], split.items[~last]]), axis=1)  # distinct (user, item)
    distinct = np.bincount(history[0], minlength=split.num_users)
    return split.num_items - distinct - 1


def hypergeom_pmf(j, population, successes, draws) -> np.ndarray:
    """P(j successes in `draws` draws without replacement), through log binomial coefficients
    (scipy.special.gammaln): the same values as scipy.stats.hypergeom.pmf, about a thousand
    times faster on a grid of users x ranks."""

    def log_choose(a, b):
        return special.gammaln(a + 1) - special.gammaln(b + 1) - special.gammaln(a - b + 1)

    j, population, successes, draws = np.broadcast_arrays(j, population, successes, draws)
    possible = (j <= successes) & (draws - j <= population - successes) & (j <= draws)
    with np.errstate(invalid="ignore"):
        log = (
            log_choose(successes, j)
            + log_choose(population - successes, draws - j)
            - log_choose(population, draws)
        )
    return np.where(possible, np.exp(np.where(possible, log, 0.0)), 0.0)


def uniform_sampled(ranks: np.ndarray, pool: np.ndarray, n: int = SAMPLED_N, k: int = 10) -> dict:
    """Per-user expected HR@k and NDCG@k when the target meets n uniformly drawn negatives (all
    of the pool where it holds fewer than n)."""
    ranks, pool = np.asarray(ranks, dtype=np.int64), np.asarray(pool, dtype=np.int64)
    miss = ranks > pool  # (a full-rank miss carries the catalogue's size, above any pool)
    above = np.minimum(ranks, pool)
    draws = np.minimum(n, pool)
    j = np.arange(k)[None, :]
    pmf = hypergeom_pmf(j, pool[:, None], above[:, None], draws[:, None])
    hr = np.where(miss, 0.0, pmf.sum(1))
    ndcg = np.where(miss, 0.0, (pmf / np.log2(j + 2)).sum(1))
    return {f"hr@{k}": hr, f"ndcg@{k}": ndcg}


def monte_carlo(ranks: np.ndarray, pool: np.ndarray, draws: int, seed: int, n: int = SAMPLED_N, k: int = 10):
    """The same sampled NDCG@k by drawing: for each user and draw, n distinct negatives from the
    pool (positions 0..r-1 standing for the items above the target), and the target's rank among
    them. The mean over users and draws, for checking `uniform_sampled`."""
    rng = np.random.default_rng(seed)
    total = 0.0
    for r, p in zip(np.asarray(ranks), np.asarray(pool)):
        if r > p:
            continue
        for _ in range(draws):
            drawn = rng.choice(p, size=min(n, p), replace=False)
            rank = int((drawn < r).sum())
            total += 1.0 / np.log2(rank + 2) if rank < k else 0.0
    return total / (len(ranks) * draws)
