"""The one training loop every sequential model shares.

Adam, batches of 128 cut on the device from `SequenceData`, validation NDCG@10 every epoch
on a fixed sample of users, the paper's patience rule (a strict improvement resets it; stop
after `patience` epochs without one or at `max_epochs`), and the best epoch's weights
restored before the test. An `on_epoch` hook receives each epoch's report and a function
that snapshots the full training state; the sweep layer reports and checkpoints through it.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable

import numpy as np
import torch
from torch import nn

from raysweep import losses
from raysweep.config import TrialConfig
from raysweep.errors import Diverged, UserError
from raysweep.metrics import mean_metrics, rank_users
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


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device` without a host-device sync. PyTorch copies pageable host memory
    to a GPU with cudaMemcpyAsync + cudaStreamSynchronize, so each such copy inside a step (the
    users, their real positions or length groups, BERT4Rec's masks) would stall the host until
    every queued kernel had run. From pinned memory the copy is asynchronous; the caching host
    allocator keeps the pinned block until the copy is done."""
    return _staged(array, device).to(device, non_blocking=True)


def _staged(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """`array` as a host tensor that `device` can copy from asynchronously."""
    tensor = torch.as_tensor(array)
    return tensor.pin_memory() if device.type == "cuda" else tensor


def _last_items(windows: torch.Tensor, lengths: torch.Tensor, count: int) -> torch.Tensor:
    """The last `count` items of right-padded rows whose width is count + 1, still right-padded."""
    full = (lengths > count)[:, None]
    return torch.where(full, windows[:, 1:], windows[:, :-1])


# Sampled CE's rows in groups of similar length (`length_groups`). On the CPU, which is bound by
# arithmetic, 4 groups skip most of the [rows, width, N] logits' padding. A GPU step is bound by
# kernel launches instead (ANCHORS.md), and each group adds ~40 kernel-launching ops: a Beauty
# SASRec+ 3000 step dispatches 240 of them with one group, 360 with four (counted on the CPU with
# a dispatch-mode counter, views left out). A GPU trims the batch only to its longest row.
LENGTH_GROUPS = {"cpu": 4}


def length_groups(lengths: np.ndarray, device: torch.device, count: int | None = None) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """The batch's rows sorted by window length in `count` groups (by default LENGTH_GROUPS of
    the device type, else 1): (rows, label steps, real positions), all from host-side lengths,
    so no device sync."""
    count = count or LENGTH_GROUPS.get(device.type, 1)
    order = np.argsort(lengths, kind="stable")
    groups = []
    for rows in np.array_split(order, count):
        steps = np.maximum(lengths[rows] - 1, 0)  # a window of n items has n - 1 labels
        if len(rows) and steps.max() > 0:
            width = int(steps.max())
            groups.append((to_device(rows, device), width, to_device(losses.real_positions_host(steps, width), device)))
    return groups


def bert_masks(lengths: np.ndarray, max_len: int, rng: np.random.Generator) -> np.ndarray:
    """[B, width]: which of the last `max_len` items of each window BERT4Rec masks (probability
    0.2 each); width is the batch's longest sequence."""
    seq_lengths = np.minimum(lengths, max_len)
    width = int(seq_lengths.max())
    return (rng.random((len(lengths), width)) < BERT_MASK_PROB) & (np.arange(width) < seq_lengths[:, None])


def batch_loss(model: nn.Module, cfg: TrialConfig, data: SequenceData, users: torch.Tensor, lengths: np.ndarray,
               generator: torch.Generator, rng: np.random.Generator) -> torch.Tensor:
    """The training loss of one batch of users; `lengths` are their window lengths (host-side).

    Which positions are real (and, for BERT4Rec, which are masked) is decided on the host, so
    the step runs without a device-to-host sync (every host array goes through `to_device`).
    """
    width = int(lengths.max())
    windows = data.train_windows[users]
    weight = model.item_emb.weight[: data.num_items + 1]
    if cfg.model == "bert4rec":
        # BERT4Rec trains on the last L training items, each masked with probability 0.2.
        masked = bert_masks(lengths, data.max_len, rng)
        sequence = _last_items(windows, data.train_lengths[users], data.max_len)[:, : masked.shape[1]]
        hidden = model(sequence.masked_fill(to_device(masked, users.device), model.mask_id))
        positions = to_device(np.flatnonzero(masked), users.device)
        return losses.ce(hidden, sequence, weight, positions)
    windows = windows[:, :width]  # right padding: trimming it changes nothing for a causal model
    inputs, labels = windows[:, :-1], windows[:, 1:]
    hidden = model(inputs)
    if cfg.loss == "sampled_ce":
        negatives = losses.shared_negatives(data.pool_rank, data.pool_items, windows, cfg.negatives, generator)
        return losses.sampled_ce(hidden, labels, weight, negatives, length_groups(lengths, users.device))
    positions = to_device(losses.real_positions_host(np.maximum(lengths - 1, 0), width - 1), users.device)
    if cfg.loss == "ce":
        return losses.ce(hidden, labels, weight, positions)
    negatives = losses.position_negatives(data.pool_rank, data.pool_items, windows, labels.shape[1], generator)
    return losses.bce(hidden, labels, weight, negatives, positions)


@dataclass
class FixedInputs:
    """What the host decides for one fixed-shape step (see `fixed_inputs`)."""
    users: np.ndarray
    positions: np.ndarray | None  # CE and BERT4Rec: flat indices into [B, L], padded with B x L
    bert_mask: np.ndarray | None  # BERT4Rec: [B, L]


def _bucket(n: int) -> int:
    """n rounded up to a multiple of an eighth of the power of two above it (at least 256): at
    most 12 % more positions, and few sizes, so few graphs."""
    step = max(256, (1 << max(n - 1, 1).bit_length()) >> 3)
    return -(-n // step) * step


def fixed_inputs(cfg: TrialConfig, data: SequenceData, batch: np.ndarray, rng: np.random.Generator) -> FixedInputs:
    """The host side of `fixed_batch_loss`. Full CE (SASRec+, GRU4Rec, BERT4Rec) is computed only
    at the batch's real (or masked) positions, listed here and padded up to a bucketed length
    with the index B x L of an extra padding row: the loss over all B x L positions would cost
    ~8x more on Beauty (~40x for BERT4Rec). BERT4Rec's masks are drawn as `batch_loss` draws them."""
    lengths, width = data.train_lengths_host[batch], data.max_len
    if cfg.model == "bert4rec":
        masked = bert_masks(lengths, width, rng)
        mask = np.zeros((len(batch), width), dtype=bool)
        mask[:, : masked.shape[1]] = masked
        flat = np.flatnonzero(mask)
    elif cfg.loss == "ce":
        mask, flat = None, losses.real_positions_host(np.maximum(lengths - 1, 0), width)
    else:
        return FixedInputs(batch, None, None)
    positions = np.full(_bucket(len(flat)), len(batch) * width)
    positions[: len(flat)] = flat
    return FixedInputs(batch, positions, mask)


def fixed_batch_loss(model: nn.Module, cfg: TrialConfig, data: SequenceData, users: torch.Tensor,
                     generator: torch.Generator, positions: torch.Tensor | None = None,
                     bert_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`batch_loss` with shapes that depend on nothing but the bucket of `positions`: whole
    windows with their padding, masks instead of trimming. Negatives are drawn on the device;
    positions and BERT4Rec's mask come from `fixed_inputs`. Nothing is read back from the
    device, so the step can be captured once per bucket and replayed as a CUDA graph.
    """
    windows = data.train_windows[users]
    weight = model.item_emb.weight[: data.num_items + 1]
    if cfg.model == "bert4rec":
        labels = _last_items(windows, data.train_lengths[users], data.max_len)
        hidden = model(labels.masked_fill(bert_mask, model.mask_id))
    else:
        inputs, labels = windows[:, :-1], windows[:, 1:]
        hidden = model(inputs)
    if cfg.model == "bert4rec" or cfg.loss == "ce":
        # The padding row at index B x L has label 0, which masked_ce ignores.
        flat_h = torch.cat([hidden.reshape(-1, hidden.shape[-1]), hidden.new_zeros(1, hidden.shape[-1])])
        flat_labels = torch.cat([labels.reshape(-1), labels.new_zeros(1)])
        return losses.masked_ce(flat_h[positions], flat_labels[positions], weight)
    if cfg.loss == "sampled_ce":
        negatives = losses.shared_negatives(data.pool_rank, data.pool_items, windows, cfg.negatives, generator)
        return losses.masked_sampled_ce(hidden, labels, weight, negatives)
    negatives = losses.position_negatives(data.pool_rank, data.pool_items, windows, labels.shape[1], generator)
    return losses.masked_bce(hidden, labels, weight, negatives)


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


def rank_split(model: nn.Module, cfg: TrialConfig, data: SequenceData, split: str, users: torch.Tensor,
               autocast: Callable[[], Any]) -> torch.Tensor:
    """Each user's rank of their validation or test target (int32, on the CPU)."""
    history, lengths = getattr(data, f"{split}_history"), getattr(data, f"{split}_lengths")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ranks = rank_users(sequence_scorer(model, cfg, data, history, lengths, autocast), users,
                           getattr(data, f"{split}_targets"), data.items, data.starts,
                           getattr(data, f"{split}_seen_lengths"))
    model.train(was_training)
    return ranks


def evaluate_split(model: nn.Module, cfg: TrialConfig, data: SequenceData, split: str, users: torch.Tensor,
                   autocast: Callable[[], Any]) -> dict[str, float]:
    """Metrics on the validation or test targets of `users`."""
    return mean_metrics(rank_split(model, cfg, data, split, users, autocast))


def validation_users(num_users: int, count: int, seed: int, device: torch.device) -> torch.Tensor:
    """The fixed random sample of users validated every epoch (all of them when fewer)."""
    if count >= num_users:
        return torch.arange(num_users, device=device)
    chosen = np.sort(np.random.default_rng(seed).choice(num_users, size=count, replace=False))
    return torch.as_tensor(chosen, device=device)


def make_optimizer(model: nn.Module, cfg: TrialConfig, device: torch.device) -> torch.optim.Optimizer:
    """The paper's Adam (no weight decay, no schedule) as one fused kernel (one launch on CUDA; on
    the CPU, where PyTorch would loop over the parameters, a Beauty step on one thread takes
    59 ms instead of 69 with SASRec's BCE, 195 instead of 209 with SASRec+ 3000), its step
    counters on the device when the step is captured as a CUDA graph."""
    cuda = device.type == "cuda"
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True, capturable=cuda and cfg.cuda_graphs)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 natively: a GPU from Ampere on (compute capability 8.0),
    or an x86 CPU with AVX512-BF16 or AMX. Anything else would emulate bf16, slower than fp32.
    On this project's 2-core CPU (AVX512-BF16) bf16 autocast trains a Beauty epoch 2.4x faster
    with full CE, 2.6x with GRU4Rec, 1.75x with BERT4Rec, 1.2x with BCE, and no faster with
    SASRec+ 3000 (benchmarks/speed.py --steps 20 with and without --no-amp, one thread)."""
    if device.type == "cuda":
        return bool(torch.version.hip) or torch.cuda.get_device_capability(device) >= (8, 0)
    cpu_units = ("avx512_bf16", "amx_tile")
    return device.type == "cpu" and any(getattr(torch.cpu, f"_is_{u}_supported", lambda: False)() for u in cpu_units)


def precision(cfg: TrialConfig, device: torch.device) -> str:
    """"bf16" where the trial trains under bf16 autocast (`amp` on and `native_bf16`), else "fp32"."""
    return "bf16" if cfg.amp and native_bf16(device) else "fp32"


def autocast_for(cfg: TrialConfig, device: torch.device) -> Callable[[], ContextManager]:
    """bf16 autocast where `precision` says so; a no-op elsewhere. Scores for ranking stay fp32
    (`sequence_scorer`). A captured graph must not keep autocast's cache of casted weights (it
    would hold stale copies)."""
    enabled = precision(cfg, device) == "bf16"
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=not cfg.cuda_graphs)


def epoch_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[begin : begin + batch_size] for begin in range(0, len(order), batch_size)]


Step = Callable[[np.ndarray], "torch.Tensor | None"]


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrialConfig, data: SequenceData,
              device: torch.device, generator: torch.Generator, rng: np.random.Generator,
              autocast: Callable[[], ContextManager]) -> Step:
    """step(batch of user indices) -> its loss on the device (None: nothing to learn from), after
    one optimizer step. Eager by default; a replayed CUDA graph with `cuda_graphs`."""

    def eager(loss_of: Callable[[], torch.Tensor]) -> torch.Tensor:
        with autocast():
            loss = loss_of()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def trainable(batch: np.ndarray) -> bool:
        return cfg.model == "bert4rec" or data.train_lengths_host[batch].max() >= 2  # one item: no next item

    if not cfg.cuda_graphs:
        def step(batch: np.ndarray) -> torch.Tensor | None:
            if not trainable(batch):
                return None
            users = to_device(batch, device)
            return eager(lambda: batch_loss(model, cfg, data, users, data.train_lengths_host[batch], generator, rng))
        return step

    if device.type != "cuda":
        raise UserError(f"cuda_graphs needs a CUDA device, not {device}")
    graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, dict[str, torch.Tensor]]] = {}
    warm_up = 3  # eager steps on a side stream before the first capture, as CUDA graphs require

    def fixed_loss(buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        return fixed_batch_loss(model, cfg, data, buffers["users"], generator, buffers.get("positions"),
                                buffers.get("bert_mask"))

    def graphed(batch: np.ndarray) -> torch.Tensor | None:
        nonlocal warm_up
        if not trainable(batch):
            return None
        host = fixed_inputs(cfg, data, batch, rng)
        arrays = {k: v for k, v in (("users", host.users), ("positions", host.positions),
                                    ("bert_mask", host.bert_mask)) if v is not None}
        if len(batch) != cfg.batch_size:  # the epoch's last, smaller batch: the same loss, eagerly
            buffers = {k: to_device(v, device) for k, v in arrays.items()}
            return eager(lambda: fixed_loss(buffers))
        bucket = 0 if host.positions is None else len(host.positions)
        if bucket not in graphs:
            buffers = {k: to_device(v, device) for k, v in arrays.items()}  # the graph's inputs
            if warm_up:
                warm_up -= 1
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    loss = eager(lambda: fixed_loss(buffers))
                torch.cuda.current_stream(device).wait_stream(side)
                return loss
            # One graph per bucket of positions, replayed with its input buffers refilled per batch.
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(generator)  # negatives: the trial's generator
            optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates the gradients it reuses
            try:
                with torch.cuda.graph(graph):
                    with autocast():
                        loss = fixed_loss(buffers)
                    loss.backward()
                    optimizer.step()
            except RuntimeError as error:  # an op that cannot be captured (CUDA says only "not permitted")
                raise UserError(f"cuda_graphs: capturing the {cfg.label} step failed ({str(error).splitlines()[0]}); "
                                "set cuda_graphs: false to train eagerly") from error
            graphs[bucket] = (graph, loss, buffers)
        graph, loss, buffers = graphs[bucket]
        for name, buffer in buffers.items():
            buffer.copy_(_staged(arrays[name], device), non_blocking=True)
        graph.replay()  # (capturing does not run the step: replay it now too)
        return loss.detach()

    return graphed


def train_steps(step: Step, batches: Iterable[np.ndarray], device: torch.device) -> torch.Tensor:
    """`step` on each batch; the summed loss stays on the device (no sync)."""
    running = torch.zeros((), device=device)
    for batch in batches:
        loss = step(batch)
        if loss is not None:
            running += loss  # before the next step: a graph's loss buffer is overwritten by its next replay
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

    step = make_step(model, optimizer, cfg, data, device, generator, order_rng, autocast)

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
        running = train_steps(step, epoch_batches(order, cfg.batch_size), device)
        mean_loss = float(running) / -(-len(order) // cfg.batch_size)  # the one host sync of the epoch
        if not math.isfinite(mean_loss):
            raise Diverged(epoch, mean_loss)
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
