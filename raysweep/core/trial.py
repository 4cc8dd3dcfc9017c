"""One trial, as a function: `run_trial`, which `python -m raysweep.train` and every Tune
trial call alike, and the `TrialResult` it returns.

A trial loads its dataset, refuses what cannot run (nothing to learn, a model too large for
the device, more negatives than the pool holds) before allocating anything, trains by the
paper's rule, and tests the best epoch's weights on every user.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raysweep.core.config import TrialConfig, default_ce_backend
from raysweep.core.data import load_interactions
from raysweep.core.devices import autocast_for, device_name, precision, resolve_device, use_device
from raysweep.core.errors import UserError
from raysweep.core.evaluation import popularity_sampler, rank_split
from raysweep.core.memory import device_memory, device_used_mb, track_peak, training_bytes
from raysweep.core.metrics import mean_metrics
from raysweep.core.models import build_model
from raysweep.core.split import SequenceData, Split, leave_one_out, sequence_data
from raysweep.core.trainer import EpochReport, fit

Hook = Callable[[EpochReport, Callable[[], dict]], None]


@dataclass
class TrialResult:
    """What one trial yields. `summary()` is its record (metrics.json, the body of result.json);
    the per-epoch `history` and each test user's target rank (`ranks`) go to files of their own."""

    config: TrialConfig
    val: dict[str, float]  # at the best epoch (BPR-MF: every metric; sequential models: NDCG@10)
    test: dict[str, float]
    best_epoch: int
    epochs: int
    train_seconds: float  # training and validation, all epochs
    peak_memory_mb: float
    device: str
    precision: str
    node: str
    history: list[dict[str, Any]]
    ranks: np.ndarray  # int32, test user u's 0-based rank of their target (a miss: metrics.miss_rank)
    data_sha256: str  # the dataset's content (`Split.sha256`), as this trial read it
    # What the whole card has in use at the end (torch.cuda.mem_get_info: the CUDA context and any
    # process sharing the card included), beside `peak_memory_mb`, the trial's own tensors.
    device_used_mb: float | None = None
    sampled_ranks: np.ndarray | None = None  # each target's rank among popularity-drawn negatives

    @property
    def seconds_per_epoch(self) -> float:
        return self.train_seconds / max(self.epochs, 1)

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.config.label,
            "config": self.config.to_dict(),
            "val": self.val,
            "test": self.test,
            "best_epoch": self.best_epoch,
            "epochs": self.epochs,
            "train_seconds": self.train_seconds,
            "device": self.device,
            "precision": self.precision,
            "seconds_per_epoch": self.seconds_per_epoch,
            "peak_memory_mb": self.peak_memory_mb,
            "node": self.node,
            "data_sha256": self.data_sha256,
            "device_used_mb": self.device_used_mb,
        }


def load_split(cfg: TrialConfig) -> Split:
    frame = load_interactions(
        cfg.dataset, cfg.data_dir and Path(cfg.data_dir), cfg.mirror and Path(cfg.mirror)
    )
    return leave_one_out(frame, cfg.dataset)


def check_fits(cfg: TrialConfig, split: Split, device: torch.device | None, share: float = 1.0) -> None:
    """Refuse, before anything is allocated, a sequential model on data that leaves it nothing to
    learn from, and a trial that could not fit in its `share` of its device (None: not known here;
    trials that share a card each get the fraction Ray gave them)."""
    if cfg.is_sequential and (np.diff(split.offsets) - 2).max() < 2:
        raise UserError(
            f"{cfg.dataset}: no user has two training items (every history is 3 items or shorter), "
            f"so {cfg.label} has nothing to learn from"
        )
    if device is None:
        return
    need = training_bytes(
        cfg.model,
        cfg.loss,
        cfg.negatives,
        cfg.hidden,
        cfg.blocks,
        cfg.heads,
        cfg.max_len,
        cfg.batch_size,
        cfg.factors,
        split.num_users,
        split.num_items,
        cfg.cuda_graphs,
    )
    have = device_memory(device) * share
    if need > have:
        of = f"{device.type}" if share == 1.0 else f"its {share:g} share of {device.type}"
        raise UserError(
            f"{cfg.dataset}: {cfg.label} with hidden={cfg.hidden}, blocks={cfg.blocks}, "
            f"max_len={cfg.max_len}, batch_size={cfg.batch_size} needs at least {need / 2**30:,.1f} GiB, "
            f"more than the {have / 2**30:,.1f} GiB of {of}"
        )


def check_negatives(cfg: TrialConfig, data: SequenceData) -> None:
    """N must leave enough pool items for every user once its own window is excluded."""
    if cfg.negatives is None:
        return
    room = data.pool_size - data.max_window_items
    if cfg.negatives > room:
        raise UserError(
            f"{cfg.dataset}: N={cfg.negatives} negatives is more than the pool allows: {data.pool_size} "
            f"training items minus up to {data.max_window_items} in a user's window leaves {room}"
        )


def trained_in(cfg: TrialConfig, device: torch.device, model: torch.nn.Module) -> str:
    """The precision the record states: bf16 autocast, naming any part kept in fp32 under it."""
    kind = precision(cfg.amp, device)
    parts = getattr(model, "FP32_PARTS", None)
    return f"{kind} ({parts})" if kind == "bf16" and parts else kind


def run_trial(
    cfg: TrialConfig,
    on_epoch: Hook | None = None,
    resume: dict | None = None,
    gpu_share: float = 0.0,
    on_step: Callable[[int, int, int], None] | None = None,
) -> TrialResult:
    """Train and test one trial. `gpu_share`: the fraction of a GPU the trial was given (Ray's
    assignment; it must then run on that GPU). `on_step(epoch, done, total)`: progress within
    an epoch. Raises `Diverged` when the training loss turns non-finite."""
    # Checked here, not in the config: a record written under a newer PyTorch still loads.
    if cfg.ce_backend == "torch" and default_ce_backend() != "torch":
        raise UserError(f"setting ce_backend 'torch' needs PyTorch >= 2.13 (this is {torch.__version__})")
    split = load_split(cfg)
    device = torch.device("cpu") if cfg.is_bpr else resolve_device(cfg.device, gpu_assigned=gpu_share > 0)
    use_device(device)
    check_fits(cfg, split, device, gpu_share if device.type == "cuda" and gpu_share > 0 else 1.0)
    peak = track_peak(device)
    if cfg.is_bpr:
        from raysweep.core.bpr import run_bpr

        bpr = run_bpr(cfg, split)
        return TrialResult(
            cfg,
            bpr.val,
            mean_metrics(bpr.ranks),
            cfg.iterations,
            cfg.iterations,
            bpr.seconds,
            peak(),
            bpr.device,
            "fp32",
            platform.node(),
            bpr.history,
            bpr.ranks,
            split.sha256(),
            sampled_ranks=bpr.sampled_ranks,
        )
    data = sequence_data(split, cfg.max_len, device)
    check_negatives(cfg, data)
    torch.manual_seed(cfg.seed)
    model = build_model(
        cfg.model, data.num_items, cfg.hidden, cfg.blocks, cfg.heads, cfg.max_len, cfg.dropout
    ).to(device)
    earlier = resume.get("peak_mb", 0.0) if resume is not None else 0.0  # the attempts before a resume

    def peak_so_far() -> float:
        return max(earlier, peak())

    def on_epoch_with_peak(report, state) -> None:
        on_epoch(report, lambda: {**state(), "peak_mb": peak_so_far()})

    fitted = fit(model, cfg, data, device, None if on_epoch is None else on_epoch_with_peak, resume, on_step)
    ranks, sampled = rank_split(
        model,
        cfg,
        data,
        "test",
        torch.arange(data.num_users, device=device),
        autocast_for(cfg.amp, device),
        popularity_sampler(cfg, split, device),
    )
    return TrialResult(
        cfg,
        {"ndcg@10": fitted.best_ndcg},
        mean_metrics(ranks),
        fitted.best_epoch,
        fitted.epochs,
        fitted.seconds,
        peak_so_far(),
        device_name(device),
        trained_in(cfg, device, model),
        platform.node(),
        fitted.history,
        ranks.numpy(),
        split.sha256(),
        device_used_mb(device),
        None if sampled is None else sampled.numpy(),
    )
