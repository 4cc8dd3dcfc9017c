"""The one training loop every sequential model shares.

Adam, batches of 128 cut on the device from `SequenceData`, validation NDCG@10 every epoch
on a fixed sample of users, the paper's patience rule (a strict improvement resets it; stop
after `patience` epochs without one or at `max_epochs`), and the best epoch's weights
restored before the test. An `on_epoch` hook receives each epoch's report and a function
that snapshots the full training state; the sweep layer reports and checkpoints through it.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable

import numpy as np
import torch
from torch import nn

from raysweep import losses
from raysweep.config import TrialConfig
from raysweep.metrics import evaluate
from raysweep.split import SequenceData

BERT_MASK_PROB = 0.2  # the paper's masking probability; masked items become [MASK] only (no 80/10/10)


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


@dataclass
class FitResult:
    best_epoch: int
    best_ndcg: float
    epochs: int
    seconds: float  # wall-clock of the whole fit, validation included
    history: list[dict[str, Any]] = field(default_factory=list)


def _last_items(windows: torch.Tensor, lengths: torch.Tensor, count: int) -> torch.Tensor:
    """The last `count` items of right-padded rows whose width is count + 1, still right-padded."""
    full = (lengths > count)[:, None]
    return torch.where(full, windows[:, 1:], windows[:, :-1])


def length_groups(lengths: np.ndarray, device: torch.device, count: int = 4) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """The batch's rows sorted by window length in `count` groups: (rows, label steps, real
    positions), all from host-side lengths, so no device sync."""
    order = np.argsort(lengths, kind="stable")
    groups = []
    for rows in np.array_split(order, count):
        steps = np.maximum(lengths[rows] - 1, 0)  # a window of n items has n - 1 labels
        if len(rows) and steps.max() > 0:
            width = int(steps.max())
            groups.append((torch.as_tensor(rows, device=device), width, losses.real_positions(steps, width, device)))
    return groups


def batch_loss(model: nn.Module, cfg: TrialConfig, data: SequenceData, users: torch.Tensor, lengths: np.ndarray,
               generator: torch.Generator, rng: np.random.Generator) -> torch.Tensor:
    """The training loss of one batch of users; `lengths` are their window lengths (host-side).

    Which positions are real (and, for BERT4Rec, which are masked) is decided on the host, so
    the step runs without a device-to-host sync.
    """
    width = int(lengths.max())
    windows = data.train_windows[users]
    weight = model.item_emb.weight[: data.num_items + 1]
    if cfg.model == "bert4rec":
        # BERT4Rec trains on the last L training items, each masked with probability 0.2.
        seq_lengths = np.minimum(lengths, data.max_len)
        width = int(seq_lengths.max())
        sequence = _last_items(windows, data.train_lengths[users], data.max_len)[:, :width]
        masked = (rng.random((len(lengths), width)) < BERT_MASK_PROB) & (np.arange(width) < seq_lengths[:, None])
        masked_t = torch.as_tensor(masked, device=sequence.device)
        hidden = model(sequence.masked_fill(masked_t, model.mask_id))
        positions = torch.as_tensor(np.flatnonzero(masked), device=sequence.device)
        return losses.ce(hidden, sequence, weight, positions)
    windows = windows[:, :width]  # right padding: trimming it changes nothing for a causal model
    inputs, labels = windows[:, :-1], windows[:, 1:]
    hidden = model(inputs)
    if cfg.loss == "sampled_ce":
        negatives = losses.shared_negatives(data.negative_pool, data.pool_items, windows, cfg.negatives, generator)
        return losses.sampled_ce(hidden, labels, weight, negatives, length_groups(lengths, users.device))
    positions = losses.real_positions(np.maximum(lengths - 1, 0), width - 1, users.device)
    if cfg.loss == "ce":
        return losses.ce(hidden, labels, weight, positions)
    negatives = losses.position_negatives(data.negative_pool, windows, labels.shape[1], generator)
    return losses.bce(hidden, labels, weight, negatives, positions)


def sequence_scorer(model: nn.Module, cfg: TrialConfig, data: SequenceData, history: torch.Tensor,
                    lengths: torch.Tensor, autocast: Callable[[], Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """score(users) -> fp32 scores of all items from each user's hidden state at the last step.

    BERT4Rec reads its score at a [MASK] placed after the last L-1 items.
    """

    def score(users: torch.Tensor) -> torch.Tensor:
        seq, n = history[users], lengths[users]
        if cfg.model == "bert4rec":
            shifted = torch.cat([seq[:, 1:], torch.zeros_like(seq[:, :1])], dim=1)
            seq = torch.where((n == data.max_len)[:, None], shifted, seq)
            n = torch.clamp(n, max=data.max_len - 1)
            seq[torch.arange(len(seq), device=seq.device), n] = model.mask_id
            n = n + 1
        width = int(n.max())
        with autocast():
            hidden = model(seq[:, :width])
        last = hidden[torch.arange(len(seq), device=seq.device), n - 1].float()
        return last @ model.item_emb.weight[: data.num_items + 1].float().T

    return score


def evaluate_split(model: nn.Module, cfg: TrialConfig, data: SequenceData, split: str, users: torch.Tensor,
                   autocast: Callable[[], Any]) -> dict[str, float]:
    """Metrics on the validation or test targets of `users`."""
    history, lengths = getattr(data, f"{split}_history"), getattr(data, f"{split}_lengths")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        result = evaluate(sequence_scorer(model, cfg, data, history, lengths, autocast), users,
                          getattr(data, f"{split}_targets"), data.items, data.starts,
                          getattr(data, f"{split}_seen_lengths"))
    model.train(was_training)
    return result


def validation_users(num_users: int, count: int, seed: int, device: torch.device) -> torch.Tensor:
    """The fixed random sample of users validated every epoch (all of them when fewer)."""
    if count >= num_users:
        return torch.arange(num_users, device=device)
    chosen = np.sort(np.random.default_rng(seed).choice(num_users, size=count, replace=False))
    return torch.as_tensor(chosen, device=device)


def make_optimizer(model: nn.Module, cfg: TrialConfig, device: torch.device) -> torch.optim.Optimizer:
    """The paper's Adam (no weight decay, no schedule); one fused kernel on CUDA."""
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")


def autocast_for(cfg: TrialConfig, device: torch.device) -> Callable[[], ContextManager]:
    """bf16 autocast on CUDA (unless `amp` is off); a no-op elsewhere."""
    enabled = device.type == "cuda" and cfg.amp
    return lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)


def epoch_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[begin : begin + batch_size] for begin in range(0, len(order), batch_size)]


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrialConfig, data: SequenceData,
                batches: Iterable[np.ndarray], device: torch.device, generator: torch.Generator,
                rng: np.random.Generator, autocast: Callable[[], ContextManager]) -> torch.Tensor:
    """One optimizer step per batch of user indices; the summed loss stays on the device (no sync)."""
    running = torch.zeros((), device=device)
    for batch in batches:
        lengths = data.train_lengths_host[batch]
        if lengths.max() < 2 and cfg.model != "bert4rec":
            continue  # one-item windows have no next item to predict
        with autocast():
            loss = batch_loss(model, cfg, data, torch.as_tensor(batch, device=device), lengths, generator, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += loss.detach()
    return running


def fit(model: nn.Module, cfg: TrialConfig, data: SequenceData, device: torch.device,
        on_epoch: Callable[[EpochReport, Callable[[], dict]], None] | None = None,
        resume: dict | None = None) -> FitResult:
    """Train with the patience rule; leaves the best epoch's weights in `model`."""
    cuda = device.type == "cuda"
    optimizer = make_optimizer(model, cfg, device)
    autocast = autocast_for(cfg, device)
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

    def state() -> dict:
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "order_rng": order_rng.bit_generator.state, "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state(device) if cuda else None,
            "epoch": epoch, "best_epoch": best_epoch, "best_ndcg": best_ndcg, "history": history,
            "best_state": best_state, "seconds": elapsed,
        }

    done = resume is not None and (epoch >= cfg.max_epochs or epoch - best_epoch >= cfg.patience)
    while not done:
        epoch += 1
        started = time.perf_counter()
        model.train()
        order = order_rng.permutation(data.num_users)
        running = train_steps(model, optimizer, cfg, data, epoch_batches(order, cfg.batch_size), device, generator,
                              order_rng, autocast)
        mean_loss = float(running) / -(-len(order) // cfg.batch_size)  # the one host sync of the epoch
        trained = time.perf_counter()
        val = evaluate_split(model, cfg, data, "val", val_users, autocast)
        validated = time.perf_counter()
        elapsed += validated - started
        if val["ndcg@10"] > best_ndcg:  # only a strict improvement counts
            best_epoch, best_ndcg = epoch, val["ndcg@10"]
            best_state = copy.deepcopy(model.state_dict())
        done = epoch >= cfg.max_epochs or epoch - best_epoch >= cfg.patience
        report = EpochReport(epoch, mean_loss, val, trained - started, validated - trained, best_epoch, best_ndcg, done)
        history.append({"epoch": epoch, "loss": mean_loss, "train_seconds": report.train_seconds,
                        "val_seconds": report.val_seconds, **{f"val_{k}": v for k, v in val.items()}})
        if on_epoch is not None:
            on_epoch(report, state)
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(best_epoch, best_ndcg, epoch, elapsed, history)
