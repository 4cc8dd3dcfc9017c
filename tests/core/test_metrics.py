import math

import numpy as np
import torch

from raysweep.core.metrics import KS, mean_metrics, rank_users


def _reference(scores, targets, seen_lists):
    """Per-user float64 loop: rank among unseen real items, ties against the target."""
    out = {f"{m}@{k}": [] for k in KS for m in ("hr", "ndcg", "mrr")}
    for row, target, seen in zip(scores.astype(np.float64), targets, seen_lists):
        if target in seen:
            rank = math.inf
        else:
            others = [row[i] for i in range(1, len(row)) if i != target and i not in seen]
            rank = sum(s >= row[target] for s in others)
        for k in KS:
            hit = rank < k
            out[f"hr@{k}"].append(float(hit))
            out[f"ndcg@{k}"].append(1 / math.log2(rank + 2) if hit else 0.0)
            out[f"mrr@{k}"].append(1 / (rank + 1) if hit else 0.0)
    return {k: float(np.mean(v)) for k, v in out.items()}


def test_evaluator_matches_float64_loop():
    rng = np.random.default_rng(0)
    users, items = 300, 150
    # Coarse scores make many ties; item 0 (padding) gets the top score and must be ignored.
    scores = rng.integers(0, 40, size=(users, items + 1)).astype(np.float32)
    scores[:, 0] = 1e9
    histories = [rng.integers(1, items + 1, size=rng.integers(1, 60)) for _ in range(users)]
    targets = np.array([rng.integers(1, items + 1) if u % 5 else h[0] for u, h in enumerate(histories)])
    assert sum(t in h for t, h in zip(targets, histories)) > 50  # seen targets are exercised
    boost = np.arange(users) % 2 == 0
    scores[boost, targets[boost]] = 38.0  # near the top, still tied with a few items

    flat = torch.as_tensor(np.concatenate(histories))
    lengths = torch.as_tensor([len(h) for h in histories])
    starts = torch.cumsum(lengths, 0) - lengths
    scores_t = torch.as_tensor(scores)
    ranks, _ = rank_users(
        lambda u: scores_t[u], torch.arange(users), torch.as_tensor(targets), flat, starts, lengths, chunk=64
    )
    got = mean_metrics(ranks)
    want = _reference(scores, targets, [set(h.tolist()) for h in histories])
    for name in want:
        assert abs(got[name] - want[name]) < 1e-6, name
    assert 0.2 < want["hr@10"] < 0.9 and want["ndcg@10"] < want["hr@10"]


def test_popularity_sampled_ranks_draw_only_eligible_items_and_count_like_the_full_rank():
    """Ten items; user 0 saw items 1-2 (target 3), user 1 saw 4 and 8 (target 5), user 2's target 6
    is in its history (a miss). Only five items have a count and are eligible for each user, so with
    n = 5 the draw is exactly those: the sampled rank is a count over a known set."""
    from raysweep.core.metrics import Sampler

    scores = torch.tensor(
        [
            [0, 9, 9, 5, 6, 1, 7, 2, 5, 0, 3],
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9],
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9],
        ],
        dtype=torch.float32,
    )
    targets = torch.tensor([3, 5, 6])
    flat = torch.tensor([1, 2, 4, 8, 6])
    starts, lengths = torch.tensor([0, 2, 4]), torch.tensor([2, 2, 1])
    popularity = torch.tensor([0, 5, 5, 5, 1, 1, 1, 1, 1, 0, 0], dtype=torch.float32)  # 9, 10 never drawn
    generator = torch.Generator().manual_seed(2)
    full, sampled = rank_users(
        lambda u: scores[u],
        torch.arange(3),
        targets,
        flat,
        starts,
        lengths,
        sampler=Sampler(popularity, 5, generator),
    )
    # user 0 draws {4, 5, 6, 7, 8}: 4 (6 > 5), 6 (7) and 8 (5, a tie) count against the target
    # user 1 draws {1, 2, 3, 6, 7}: 6 and 7 score above the target's 5
    assert sampled.tolist() == [3, 2, 5]
    assert full.tolist()[:2] == [3, 4] and full[2] >= 10  # (user 1: 6, 7, 9 and 10 above it)


def test_popularity_draws_are_torchs_weighted_sampling_without_replacement():
    """Inclusion frequencies of each item over 20,000 users with one history, against
    torch.multinomial without replacement on the same masked weights."""
    from raysweep.core.metrics import Sampler, draw_negatives

    users = 20_000
    popularity = torch.tensor([0, 8, 4, 2, 1, 1, 1, 3, 5], dtype=torch.float32)  # 7 and 8: seen, target
    targets = torch.full((users,), 8)
    seen_rows, seen_items = torch.arange(users), torch.full((users,), 7)
    drawn = draw_negatives(
        Sampler(popularity, 3, torch.Generator().manual_seed(0)), targets, seen_rows, seen_items
    )
    assert drawn.shape == (users, 3)
    assert (drawn.sort(1).values.diff(1) > 0).all()  # distinct within a user
    assert not torch.isin(drawn, torch.tensor([0, 7, 8])).any()
    weights = popularity.clone()
    weights[[0, 7, 8]] = 0
    reference = torch.multinomial(weights.expand(users, -1), 3, generator=torch.Generator().manual_seed(1))
    ours = torch.bincount(drawn.flatten(), minlength=9) / users
    theirs = torch.bincount(reference.flatten(), minlength=9) / users
    assert torch.allclose(ours, theirs, atol=0.015), (ours, theirs)
