"""Sampled metrics from full ranks against independent references: SciPy's hypergeometric
distribution, a brute-force count of each user's candidates, and drawing the negatives."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from raysweep.core.split import leave_one_out
from raysweep.report.sampled import SAMPLED_N, hypergeom_pmf, negative_pool, uniform_sampled


def monte_carlo(ranks: np.ndarray, pool: np.ndarray, draws: int, seed: int, n: int = SAMPLED_N, k: int = 10):
    """The same sampled NDCG@k by drawing: for each user and draw, n distinct negatives from the
    pool (positions 0..r-1 standing for the items above the target), and the target's rank among
    them. The mean over users and draws: the reference `uniform_sampled` is checked against."""
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


def test_the_pmf_is_scipys():
    population = np.array([54_000, 54_000, 3_000, 200, 100, 5])
    above = np.array([0, 3_000, 2_999, 150, 100, 2])
    draws = np.minimum(100, population)
    j = np.arange(10)[None, :]
    ours = hypergeom_pmf(j, population[:, None], above[:, None], draws[:, None])
    theirs = stats.hypergeom.pmf(j, population[:, None], above[:, None], draws[:, None])
    assert ours == pytest.approx(theirs, rel=1e-8, abs=1e-15)  # (log-gamma rounding)


def test_the_pool_is_every_item_but_padding_history_and_target():
    frame = pd.DataFrame(
        {"user_id": [1, 1, 1, 1, 2, 2, 2], "item_id": [1, 2, 1, 3, 4, 5, 6]}  # user 1 saw 1 twice
    )
    split = leave_one_out(frame)
    brute = [
        len(set(range(1, split.num_items + 1)) - set(split.items[a : b - 1]) - {split.items[b - 1]})
        for a, b in zip(split.offsets[:-1], split.offsets[1:])
    ]
    assert list(negative_pool(split)) == brute == [3, 3]


def test_uniform_sampled_metrics_match_drawing_the_negatives():
    rng = np.random.default_rng(0)
    pool = rng.integers(300, 2_000, 400)
    ranks = np.minimum(rng.geometric(0.01, 400), pool)  # a model that ranks most targets high
    ranks[:5] = 10**6  # full-rank misses stay misses
    exact = uniform_sampled(ranks, pool)
    drawn = monte_carlo(ranks, pool, draws=40, seed=1)
    assert exact["ndcg@10"][:5].tolist() == [0.0] * 5
    assert drawn == pytest.approx(exact["ndcg@10"].mean(), abs=0.004)  # 16,000 draws
    # With every item drawn the sampled rank is the full rank.
    small = uniform_sampled(np.array([0, 3, 12]), np.array([50, 50, 50]), n=100)
    assert small["hr@10"].tolist() == [1.0, 1.0, 0.0]
    assert small["ndcg@10"] == pytest.approx([1.0, 1 / np.log2(5), 0.0])
