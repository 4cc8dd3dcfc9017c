"""The one training loop every sequential model shares.

Adam, batches of 128 cut on the device from `SequenceData`, validation NDCG@10 every epoch
on a fixed sample of users, the paper's patience rule (a strict improvement resets it; stop
after `patience` epochs without one or at `max_epochs`), and the best epoch's weights
restored before the test. An `on_epoch` hook receives each epoch's report and a function
that snapshots the full training state; the sweep layer reports and saves it through it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from raysweep.core import losses
from raysweep.core.config import TrialConfig
from raysweep.core.devices import autocast_for, to_device
from raysweep.core.errors import Diverged
from raysweep.core.evaluation import evaluate_split, validation_users
from raysweep.core.memory import release_freed_memory
from raysweep.core.negatives import from_source, gbce_beta, position_negatives, shared_negatives
from raysweep.core.objectives import masked_item_batch, next_item_batch
from raysweep.core.split import SequenceData


@dataclass
class EpochReport:
    epoch: int
    loss: float
    val: dict[str, float]
    train_seconds: float  # this epoch's training steps
    val_seconds: float
    best_epoch: int
    best_ndcg: float  # best validation NDCG@10 so far (the sweep's metric)
    done: bool  # the patience rule (or max_epochs) ends training after this epoch

    def row(self) -> dict[str, Any]:
        """The epoch as history.parquet and Tune's reports hold it."""
        return {
            "epoch": self.epoch,
            "loss": self.loss,
            "train_seconds": self.train_seconds,
            "val_seconds": self.val_seconds,
            **{f"val_{k}": v for k, v in self.val.items()},
        }


@dataclass
class FitResult:
    best_epoch: int
    best_ndcg: float
    epochs: int
    seconds: float  # wall-clock of the whole fit, validation included
    history: list[dict[str, Any]] = field(default_factory=list)


def batch_loss(
    model: nn.Module,
    cfg: TrialConfig,
    data: SequenceData,
    users: torch.Tensor,
    lengths: np.ndarray,
    generator: torch.Generator,
    rng: np.random.Generator,
) -> torch.Tensor:
    """The training loss of one batch of users; `lengths` are their window lengths (host-side)."""
    weight = model.item_weights()
    if cfg.is_masked:  # BERT4Rec: full CE at the masked positions
        batch = masked_item_batch(data, users, lengths, model.mask_id, rng)
        return losses.ce(model(batch.inputs), batch.labels, weight, batch.positions, backend=cfg.ce_backend)
    batch = next_item_batch(data, users, lengths)
    hidden = model(batch.inputs)
    pool, n = (data.pool_rank, data.pool_items), cfg.negatives
    if cfg.loss == "ce":
        return losses.ce(hidden, batch.labels, weight, batch.positions, backend=cfg.ce_backend)
    if cfg.loss == "sampled_ce":  # loss (3), over N negatives shared by a sequence's steps
        drawn = from_source(cfg.negatives_from, *pool, batch, n, generator, cfg.logq, data.num_items)
        return losses.sampled_ce(
            hidden, batch.labels, weight, drawn, losses.length_groups(lengths, users.device)
        )
    if cfg.loss == "gbce":
        beta = gbce_beta(n, data.pool_size, cfg.gbce_t)
        if cfg.negatives_per == "sequence":
            drawn = shared_negatives(*pool, batch.window, n, generator)
            return losses.gbce(
                hidden, batch.labels, weight, drawn, beta, losses.length_groups(lengths, users.device)
            )
        steps = batch.labels.shape[1]
        drawn = position_negatives(*pool, batch.window, steps * n, generator).view(len(users), steps, n)
        return losses.gbce(hidden, batch.labels, weight, drawn, beta, positions=batch.positions)
    negatives = position_negatives(
        *pool, batch.window, batch.labels.shape[1], generator
    )  # BCE: one per position
    return losses.bce(hidden, batch.labels, weight, negatives, batch.positions)


def make_optimizer(model: nn.Module, cfg: TrialConfig, device: torch.device) -> torch.optim.Optimizer:
    """The paper's Adam (no weight decay, no schedule), fused into one kernel; its step counters
    stay on the device when the step is captured as a CUDA graph."""
    return torch.optim.Adam(
        model.parameters(), lr=cfg.lr, fused=True, capturable=device.type == "cuda" and cfg.cuda_graphs
    )


Step = Callable[[np.ndarray], "torch.Tensor | None"]
StepHook = Callable[[int, int], None]  # (steps done in the epoch, steps in the epoch)


def make_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrialConfig,
    data: SequenceData,
    device: torch.device,
    generator: torch.Generator,
    rng: np.random.Generator,
    autocast: Callable[[], ContextManager],
) -> Step:
    """step(batch of user indices) -> its loss on the device (None: nothing to learn from), after
    one optimizer step. Eager; with `cuda_graphs`, replayed as a CUDA graph (`graphs`)."""

    def eager(loss_of: Callable[[], torch.Tensor]) -> torch.Tensor:
        with autocast():
            loss = loss_of()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def trainable(batch: np.ndarray) -> bool:
        return cfg.is_masked or data.train_lengths_host[batch].max() >= 2  # one item: no next item

    if cfg.cuda_graphs:
        from raysweep.core.cuda_graphs import graphed_step

        return graphed_step(model, optimizer, cfg, data, device, generator, rng, autocast, eager, trainable)

    def step(batch: np.ndarray) -> torch.Tensor | None:
        if not trainable(batch):
            return None
        users = to_device(batch, device)
        return eager(
            lambda: batch_loss(model, cfg, data, users, data.train_lengths_host[batch], generator, rng)
        )

    return step


def epoch_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[begin : begin + batch_size] for begin in range(0, len(order), batch_size)]


def train_steps(
    step: Step, batches: list[np.ndarray], device: torch.device, on_step: StepHook | None = None
) -> torch.Tensor:
    """`step` on each batch; the summed loss stays on the device (no sync). `on_step(done,
    total)` after each step: progress within the epoch (a count, nothing read from the device)."""
    running = torch.zeros((), device=device)
    for done, batch in enumerate(batches, start=1):
        loss = step(batch)
        if loss is not None:
            running += loss  # before the next step: a graph's loss buffer is overwritten by its next replay
        if on_step is not None:
            on_step(done, len(batches))
    return running


def fit(
    model: nn.Module,
    cfg: TrialConfig,
    data: SequenceData,
    device: torch.device,
    on_epoch: Callable[[EpochReport, Callable[[], dict]], None] | None = None,
    resume: dict | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
) -> FitResult:
    """Train with the patience rule; leaves the best epoch's weights in `model`. Raises
    `Diverged` when an epoch's mean loss is not finite. `on_step(epoch, done, total)` follows the
    steps within each epoch."""
    cuda = device.type == "cuda"
    optimizer = make_optimizer(model, cfg, device)
    autocast = autocast_for(cfg.amp, device, cfg.cuda_graphs)
    order_rng = np.random.default_rng(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    val_users = validation_users(data.num_users, cfg.val_users, cfg.seed, device)
    epoch, best_epoch, best_ndcg, history, best_state, elapsed = 0, 0, -1.0, [], None, 0.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        order_rng.bit_generator.state = resume["order_rng"]
        generator.set_state(resume["generator"].to(generator.get_state().device))
        torch.set_rng_state(resume["torch_rng"])
        if cuda and resume.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(resume["cuda_rng"], device)
        epoch, best_epoch, best_ndcg = resume["epoch"], resume["best_epoch"], resume["best_ndcg"]
        history, best_state, elapsed = resume["history"], resume["best_state"], resume["seconds"]

    step = make_step(model, optimizer, cfg, data, device, generator, order_rng, autocast)

    def state() -> dict:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "order_rng": order_rng.bit_generator.state,
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if cuda else None,
            "epoch": epoch,
            "best_epoch": best_epoch,
            "best_ndcg": best_ndcg,
            "history": history,
            "best_state": best_state,
            "seconds": elapsed,
        }

    done = resume is not None and (epoch >= cfg.max_epochs or epoch - best_epoch >= cfg.patience)
    while not done:
        epoch += 1
        started = time.perf_counter()
        model.train()
        order = order_rng.permutation(data.num_users)
        within = None if on_step is None else lambda done, total, epoch=epoch: on_step(epoch, done, total)
        running = train_steps(step, epoch_batches(order, cfg.batch_size), device, within)
        mean_loss = float(running) / -(-len(order) // cfg.batch_size)  # the one host sync of the epoch
        if not math.isfinite(mean_loss):
            raise Diverged(epoch, mean_loss)
        trained = time.perf_counter()
        val = evaluate_split(model, cfg, data, "val", val_users, autocast)
        release_freed_memory(device)
        validated = time.perf_counter()
        elapsed += validated - started
        if val["ndcg@10"] > best_ndcg:  # only a strict improvement counts
            best_epoch, best_ndcg = epoch, val["ndcg@10"]
            best_state = copy.deepcopy(model.state_dict())
        done = epoch >= cfg.max_epochs or epoch - best_epoch >= cfg.patience
        report = EpochReport(
            epoch, mean_loss, val, trained - started, validated - trained, best_epoch, best_ndcg, done
        )
        history.append(report.row())
        if on_epoch is not None:
            on_epoch(report, state)
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(best_epoch, best_ndcg, epoch, elapsed, history)
