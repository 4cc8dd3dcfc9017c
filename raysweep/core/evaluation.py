"""Full-rank evaluation of a trained sequence model: every user's rank of their validation or
test target among all items (`metrics` turns ranks into HR / NDCG / MRR), and at test time its
rank among popularity-sampled negatives too (BERT4Rec's protocol, `popularity_sampler`)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager

import numpy as np
import torch
from torch import nn

from raysweep.core.config import TrialConfig
from raysweep.core.metrics import Sampler, mean_metrics, rank_users
from raysweep.core.objectives import query
from raysweep.core.split import SequenceData, Split

SAMPLER_SEED = 7919  # offsets the popularity sampler's seed from the trial's other draws


def rank_split(
    model: nn.Module,
    cfg: TrialConfig,
    data: SequenceData,
    split: str,
    users: torch.Tensor,
    autocast: Callable[[], ContextManager],
    sampler: Sampler | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each user's rank of their validation or test target (int32, on the CPU), from fp32
    scores of every item at the step `objectives.query` reads; with a `sampler`, also the
    target's rank among the negatives it draws (else None)."""
    history, lengths = getattr(data, f"{split}_history"), getattr(data, f"{split}_lengths")

    def score(chunk: torch.Tensor) -> torch.Tensor:
        seq, at = query(
            cfg.is_masked, history[chunk], lengths[chunk], data.max_len, getattr(model, "mask_id", None)
        )
        with autocast():
            hidden = model(seq[:, : int(at.max()) + 1])
        return hidden[torch.arange(len(seq), device=seq.device), at].float() @ model.item_weights().float().T

    was_training = model.training
    model.eval()
    with torch.no_grad():
        ranks = rank_users(
            score,
            users,
            getattr(data, f"{split}_targets"),
            data.items,
            data.starts,
            getattr(data, f"{split}_seen_lengths"),
            sampler=sampler,
        )
    model.train(was_training)
    return ranks


def evaluate_split(
    model: nn.Module,
    cfg: TrialConfig,
    data: SequenceData,
    split: str,
    users: torch.Tensor,
    autocast: Callable[[], ContextManager],
) -> dict[str, float]:
    """Metrics on the validation or test targets of `users`."""
    return mean_metrics(rank_split(model, cfg, data, split, users, autocast)[0])


def validation_users(num_users: int, count: int, seed: int, device: torch.device) -> torch.Tensor:
    """The fixed random sample of users validated every epoch (all of them when fewer)."""
    if count >= num_users:
        return torch.arange(num_users, device=device)
    chosen = np.sort(np.random.default_rng(seed).choice(num_users, size=count, replace=False))
    return torch.as_tensor(chosen, device=device)


def popularity_sampler(cfg: TrialConfig, split: Split, device: torch.device) -> Sampler | None:
    """BERT4Rec's test protocol where the trial asks for it: negatives drawn in proportion to each
    item's count in the training part (every user's items before the last two), seeded by the
    trial's seed."""
    if "popularity" not in cfg.samplers:
        return None
    ends = split.offsets[1:]
    training = np.ones(len(split.items), dtype=bool)
    training[np.r_[ends - 1, ends - 2]] = False
    counts = np.bincount(split.items[training], minlength=split.num_items + 1).astype(np.float32)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + SAMPLER_SEED)
    return Sampler(torch.from_numpy(counts).to(device), cfg.sampled_n, generator)
