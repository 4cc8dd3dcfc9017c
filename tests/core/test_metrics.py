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
    ranks = rank_users(
        lambda u: scores_t[u], torch.arange(users), torch.as_tensor(targets), flat, starts, lengths, chunk=64
    )
    got = mean_metrics(ranks)
    want = _reference(scores, targets, [set(h.tolist()) for h in histories])
    for name in want:
        assert abs(got[name] - want[name]) < 1e-6, name
    assert 0.2 < want["hr@10"] < 0.9 and want["ndcg@10"] < want["hr@10"]
