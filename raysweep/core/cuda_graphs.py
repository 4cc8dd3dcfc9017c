"""The training step replayed as a CUDA graph (`cuda_graphs: true`), for a launch-bound GPU.

A graph replays fixed shapes, so this step keeps every window whole with its padding and masks
the padding out instead of trimming it (the `masked_*` losses equal the trainer's on the same
batch). Full CE is computed only at a batch's real (or masked) positions, listed on the host
and padded up to one of a few bucketed lengths: one graph is captured per bucket and replayed
with its input buffers refilled. Nothing is read back from the device. `graphed_step` is the
one entry point; the trainer imports this module only when `cuda_graphs` is on.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysweep.core import full_ce, losses
from raysweep.core.config import TrialConfig
from raysweep.core.devices import staged, to_device
from raysweep.core.errors import UserError
from raysweep.core.negatives import position_negatives, shared_negatives
from raysweep.core.objectives import bert_masks, last_items
from raysweep.core.split import SequenceData


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_ce(
    h: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    chunk: int | None = None,
    backend: str = full_ce.DEFAULT_BACKEND,
) -> torch.Tensor:
    """`losses.ce` over every position, the padding (label 0) ignored."""
    h, targets = h.reshape(-1, h.shape[-1]), labels.reshape(-1) - 1  # padding -> -1
    return full_ce.cross_entropy(h, targets, weight[1:], backend, chunk, ignore=True)


def masked_sampled_ce(
    h: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, negatives: torch.Tensor
) -> torch.Tensor:
    logits = losses._fp32(losses.shared_negative_logits(h, labels, weight, negatives))
    return _masked_mean(torch.logsumexp(logits, dim=-1) - logits[..., 0], labels > 0)


def masked_bce(
    h: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, negatives: torch.Tensor
) -> torch.Tensor:
    pos = (h * losses.rows_of(weight, labels)).sum(-1)
    neg = (h * losses.rows_of(weight, negatives)).sum(-1)
    real = labels > 0
    return (_masked_mean(F.softplus(-pos), real) + _masked_mean(F.softplus(neg), real)) / 2


@dataclass
class FixedInputs:
    """What the host decides for one fixed-shape step (see `fixed_inputs`)."""

    users: np.ndarray
    positions: np.ndarray | None  # CE and BERT4Rec: flat indices into [B, L], padded with B x L
    bert_mask: np.ndarray | None  # BERT4Rec: [B, L]


def bucket(n: int) -> int:
    """n rounded up to a multiple of an eighth of the power of two above it (at least 256): at
    most 12 % more positions, and few sizes, so few graphs."""
    step = max(256, (1 << max(n - 1, 1).bit_length()) >> 3)
    return -(-n // step) * step


def fixed_inputs(
    cfg: TrialConfig, data: SequenceData, batch: np.ndarray, rng: np.random.Generator
) -> FixedInputs:
    """The host side of `fixed_batch_loss`: full CE's real (or masked) positions, padded up to a
    bucketed length with the index B x L of an extra padding row (the loss over all B x L
    positions would cost several times more). BERT4Rec's masks are drawn as the trainer draws them."""
    lengths, width = data.train_lengths_host[batch], data.max_len
    if cfg.is_masked:
        masked = bert_masks(lengths, width, rng)
        mask = np.zeros((len(batch), width), dtype=bool)
        mask[:, : masked.shape[1]] = masked
        flat = np.flatnonzero(mask)
    elif cfg.loss == "ce":
        mask, flat = None, losses.real_positions_host(np.maximum(lengths - 1, 0), width)
    else:
        return FixedInputs(batch, None, None)
    positions = np.full(bucket(len(flat)), len(batch) * width)
    positions[: len(flat)] = flat
    return FixedInputs(batch, positions, mask)


def fixed_batch_loss(
    model: nn.Module,
    cfg: TrialConfig,
    data: SequenceData,
    users: torch.Tensor,
    generator: torch.Generator,
    positions: torch.Tensor | None = None,
    bert_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The trainer's `batch_loss` with shapes that depend on nothing but the bucket of
    `positions`: whole windows with their padding, masks instead of trimming."""
    windows = data.train_windows[users]
    weight = model.item_weights()
    if cfg.is_masked:
        labels = last_items(windows, data.train_lengths[users], data.max_len)
        hidden = model(labels.masked_fill(bert_mask, model.mask_id))
    else:
        labels = windows[:, 1:]
        hidden = model(windows[:, :-1])
    if cfg.is_masked or cfg.loss == "ce":
        # The padding row at index B x L has label 0, which masked_ce ignores.
        flat_h = torch.cat([hidden.reshape(-1, hidden.shape[-1]), hidden.new_zeros(1, hidden.shape[-1])])
        flat_labels = torch.cat([labels.reshape(-1), labels.new_zeros(1)])
        return masked_ce(flat_h[positions], flat_labels[positions], weight, backend=cfg.ce_backend)
    if cfg.loss == "sampled_ce":
        negatives = shared_negatives(data.pool_rank, data.pool_items, windows, cfg.negatives, generator)
        return masked_sampled_ce(hidden, labels, weight, negatives)
    negatives = position_negatives(data.pool_rank, data.pool_items, windows, labels.shape[1], generator)
    return masked_bce(hidden, labels, weight, negatives)


Step = Callable[[np.ndarray], "torch.Tensor | None"]
WARM_UP = 3  # eager steps on a side stream before the first capture, as CUDA graphs require


def graphed_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrialConfig,
    data: SequenceData,
    device: torch.device,
    generator: torch.Generator,
    rng: np.random.Generator,
    autocast: Callable[[], ContextManager],
    eager: Callable[[Callable[[], torch.Tensor]], torch.Tensor],
    trainable: Callable[[np.ndarray], bool],
) -> Step:
    """step(batch) -> its loss, one optimizer step done: the fixed-shape loss, captured once per
    bucket as a CUDA graph and replayed. `eager(loss_of)` runs one step eagerly (the warm-up, and
    the epoch's last, smaller batch)."""
    if device.type != "cuda":
        raise UserError(f"cuda_graphs needs a CUDA device, not {device}")
    graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, dict[str, torch.Tensor]]] = {}
    warm_up = WARM_UP
    # One memory pool for all of a trial's graphs: each graph's temporaries are freed when its
    # capture ends and another graph's capture reuses them (the graphs never run at once); what
    # stays alive (weights, gradients, Adam's moments, each graph's inputs and loss) is never
    # reused. Without it each bucket's graph holds a private pool of a whole step's activations.
    pool = torch.cuda.graph_pool_handle()

    def fixed_loss(buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        return fixed_batch_loss(
            model, cfg, data, buffers["users"], generator, buffers.get("positions"), buffers.get("bert_mask")
        )

    def step(batch: np.ndarray) -> torch.Tensor | None:
        nonlocal warm_up
        if not trainable(batch):
            return None
        host = fixed_inputs(cfg, data, batch, rng)
        arrays = {
            k: v
            for k, v in (("users", host.users), ("positions", host.positions), ("bert_mask", host.bert_mask))
            if v is not None
        }
        if len(batch) != cfg.batch_size:  # the epoch's last, smaller batch: the same loss, eagerly
            buffers = {k: to_device(v, device) for k, v in arrays.items()}
            return eager(lambda: fixed_loss(buffers))
        size = 0 if host.positions is None else len(host.positions)
        if size not in graphs:
            buffers = {k: to_device(v, device) for k, v in arrays.items()}  # the graph's inputs
            if warm_up:
                warm_up -= 1
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    loss = eager(lambda: fixed_loss(buffers))
                torch.cuda.current_stream(device).wait_stream(side)
                return loss
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(generator)  # negatives: the trial's generator
            first = not graphs
            if first:  # the first graph's backward allocates the gradients, which every graph then shares
                optimizer.zero_grad(set_to_none=True)
            try:
                with torch.cuda.graph(graph, pool=pool):
                    # Later graphs: the gradients exist and backward would add to them, so each
                    # graph zeroes them itself, in place.
                    if not first:
                        optimizer.zero_grad(set_to_none=False)
                    with autocast():
                        loss = fixed_loss(buffers)
                    loss.backward()
                    optimizer.step()
            except RuntimeError as error:  # an op that cannot be captured (CUDA says only "not permitted")
                raise UserError(
                    f"cuda_graphs: capturing the {cfg.label} step failed ({str(error).splitlines()[0]}); "
                    "set cuda_graphs: false to train eagerly"
                ) from error
            graphs[size] = (graph, loss, buffers)
        graph, loss, buffers = graphs[size]
        for name, buffer in buffers.items():
            buffer.copy_(staged(arrays[name], device), non_blocking=True)
        graph.replay()  # (capturing does not run the step: replay it now too)
        return loss.detach()

    return step
