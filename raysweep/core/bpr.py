"""BPR-MF through `implicit`, with the paper notebook's protocol and the project's evaluator.

Validation (what a search optimises): fit on the training part, rank the validation item.
Test: refit on training + validation items (everything but the last), rank the last item.
Seen items are removed exactly as for the sequential models, since the scores
(user factors x item factors) go through the same full-rank evaluator.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import numpy as np
import torch

from raysweep.core.config import TrialConfig
from raysweep.core.errors import Diverged, UserError
from raysweep.core.evaluation import popularity_sampler, validation_users
from raysweep.core.metrics import Sampler, mean_metrics, rank_users
from raysweep.core.split import Split


def _user_items(split: Split, drop_last: int):
    """Binary users x items CSR matrix of each user's items except the last `drop_last`."""
    from scipy.sparse import csr_matrix

    lengths = np.diff(split.offsets) - drop_last
    keep = np.ones(len(split.items), dtype=bool)
    for k in range(1, drop_last + 1):
        keep[split.offsets[1:] - k] = False
    rows = np.repeat(np.arange(split.num_users), lengths)
    matrix = csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, split.items[keep])),
        shape=(split.num_users, split.num_items + 1),
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def _fit(cfg: TrialConfig, user_items, use_gpu: bool):
    from implicit.bpr import BayesianPersonalizedRanking

    model = BayesianPersonalizedRanking(
        factors=cfg.factors,
        learning_rate=cfg.bpr_lr,
        regularization=cfg.regularization,
        iterations=cfg.iterations,
        random_state=cfg.seed,
        use_gpu=use_gpu,
        # One thread makes the CPU fit deterministic under a seed (Hogwild updates otherwise).
        num_threads=0 if use_gpu else 1,
    )
    model.fit(user_items, show_progress=False)
    if use_gpu:
        model = model.to_cpu()
    users, items = torch.as_tensor(model.user_factors), torch.as_tensor(model.item_factors)
    if not (torch.isfinite(users).all() and torch.isfinite(items).all()):
        raise Diverged(cfg.iterations, float("nan"))  # (implicit reports no loss; its factors tell)
    return users, items


def _ranks(
    split: Split, users: torch.Tensor, factors, stage: str, sampler: Sampler | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    user_f, item_f = factors
    ends = torch.as_tensor(split.offsets[1:])
    back = 2 if stage == "val" else 1
    return rank_users(
        lambda u: user_f[u].float() @ item_f.float().T,
        users,
        torch.as_tensor(split.items)[ends - back],
        torch.as_tensor(split.items),
        torch.as_tensor(split.offsets[:-1]),
        torch.as_tensor(np.diff(split.offsets) - back),
        sampler=sampler,
    )


class BPRFit(NamedTuple):
    val: dict[str, float]  # validation metrics (fit on the training part)
    ranks: np.ndarray  # test users' target ranks (refit on training + validation)
    seconds: float
    history: list[dict[str, Any]]  # one row: BPR-MF has no epochs
    device: str
    sampled_ranks: np.ndarray | None = None  # test ranks among popularity-drawn negatives


def run_bpr(cfg: TrialConfig, split: Split) -> BPRFit:
    """Validation metrics and test ranks of one BPR-MF setting."""
    try:
        import implicit.gpu
    except ImportError as error:  # only BPR-MF needs it: the GPU image, for one, lacks it
        raise UserError(
            f"model 'bpr' (BPR-MF) needs the implicit package ({error}); pip install implicit"
        ) from error

    use_gpu = bool(implicit.gpu.HAS_CUDA) and cfg.device != "cpu"
    started = time.perf_counter()
    val = mean_metrics(
        _ranks(
            split,
            validation_users(split.num_users, cfg.val_users, cfg.seed, torch.device("cpu")),
            _fit(cfg, _user_items(split, 2), use_gpu),
            "val",
        )[0]
    )
    test_fit = _fit(cfg, _user_items(split, 1), use_gpu)
    sampler = popularity_sampler(cfg, split, torch.device("cpu"))
    ranks, sampled = _ranks(split, torch.arange(split.num_users), test_fit, "test", sampler)
    seconds = time.perf_counter() - started
    history = [
        {
            "epoch": cfg.iterations,
            "loss": float("nan"),
            "train_seconds": seconds,
            "val_seconds": 0.0,
            **{f"val_{k}": v for k, v in val.items()},
        }
    ]
    sampled = None if sampled is None else sampled.numpy()
    return BPRFit(val, ranks.numpy(), seconds, history, "cuda" if use_gpu else "cpu", sampled)
