"""The paper's training losses, over hidden states and the tied item-embedding matrix.

Every loss takes hidden states h [B, T, d], labels [B, T] (0 = padding, never a target) and
the item-embedding weight [num_items + 1, d] (row 0 = padding), and averages over the real
(non-padded) positions of the batch.

- `bce`: SASRec's original binary cross-entropy, one negative per position (the mean of
  the positive and the negative term).
- `ce`: softmax cross-entropy over the whole catalogue (SASRec+), in chunks (`full_ce`).
- `sampled_ce`: the paper's loss (3), softmax over the positive and N negatives drawn per
  sequence and shared by all its steps (SASRec+ N); optionally with some negatives masked out
  and the logQ correction (in-batch and mixed negatives).
- `gbce`: gSASRec's generalised BCE (Petrov & Macdonald, RecSys '23) over N negatives, shared
  by a sequence's steps or drawn per position.

The negatives themselves come from `negatives`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from raysweep.core import full_ce
from raysweep.core.devices import LENGTH_GROUPS, knob, to_device
from raysweep.core.negatives import Drawn


def real_positions_host(label_lengths: np.ndarray, width: int) -> np.ndarray:
    """Flat indices (row x width + step) of the real label positions of a right-padded batch.
    Built on the host from lengths the trainer already knows, so selecting them is a gather of
    known size: no device-to-host sync inside the training step (a boolean mask would sync)."""
    rows = np.repeat(np.arange(len(label_lengths)), label_lengths)
    steps = np.arange(len(rows)) - np.repeat(np.cumsum(label_lengths) - label_lengths, label_lengths)
    return rows * width + steps


def length_groups(
    lengths: np.ndarray, device: torch.device, count: int | None = None
) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """The batch's rows sorted by window length in `count` groups (the device's LENGTH_GROUPS by
    default): (rows, label steps, real positions), all from host-side lengths, so no device sync."""
    count = count or knob(LENGTH_GROUPS, device)
    order = np.argsort(lengths, kind="stable")
    groups = []
    for rows in np.array_split(order, count):
        steps = np.maximum(lengths[rows] - 1, 0)  # a window of n items has n - 1 labels
        if len(rows) and steps.max() > 0:
            width = int(steps.max())
            groups.append(
                (to_device(rows, device), width, to_device(real_positions_host(steps, width), device))
            )
    return groups


def rows_of(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """weight[ids] through index_select, which gathers (and, backwards, adds) whole rows, faster
    on the CPU than advanced indexing."""
    return weight.index_select(0, ids.reshape(-1)).view(*ids.shape, weight.shape[-1])


def _select(h: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None):
    """Hidden states [n, d] and labels [n] of the real positions."""
    if positions is None:  # callers without host-side lengths (tests) pay a sync here
        positions = torch.nonzero(labels.flatten() > 0).squeeze(1)
    return h.reshape(-1, h.shape[-1])[positions], labels.flatten()[positions], positions


def _fp32(value: torch.Tensor) -> torch.Tensor:
    return value.to(torch.promote_types(value.dtype, torch.float32))  # bf16 under autocast


def bce(
    h: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    negatives: torch.Tensor,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """negatives: [B, T] one item per position."""
    h, labels, positions = _select(h, labels, positions)
    pos = (h * rows_of(weight, labels)).sum(-1)
    neg = (h * rows_of(weight, negatives.flatten()[positions])).sum(-1)
    return (F.softplus(-pos).mean() + F.softplus(neg).mean()) / 2


def ce(
    h: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    positions: torch.Tensor | None = None,
    chunk: int | None = None,
    backend: str = full_ce.DEFAULT_BACKEND,
) -> torch.Tensor:
    """Full-catalogue softmax CE; `weight` rows 1..num_items are the candidates (no padding)."""
    h, labels, _ = _select(h, labels, positions)
    return full_ce.cross_entropy(h, labels - 1, weight[1:], backend, chunk)


def shared_negative_logits(
    h: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, negatives: torch.Tensor
) -> torch.Tensor:
    """[b, T, 1 + N]: each step's positive logit, then its sequence's N negatives' (loss (3))."""
    pos = (h * rows_of(weight, labels)).sum(-1, keepdim=True)  # [b, T, 1]
    neg = torch.bmm(h, rows_of(weight, negatives).transpose(1, 2))  # [b, T, N]
    return torch.cat([pos, neg], dim=-1)


def _sampled_logits(
    h: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    negatives: torch.Tensor,
    groups: list[tuple[torch.Tensor, int, torch.Tensor]] | None,
    allowed: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
    log_q_labels: torch.Tensor | None = None,
):
    """Per group, [P_g, 1 + N] fp32 logits of loss (3) at the real positions: the positive, then
    the sequence's negatives. `groups` (rows, width, real positions within the group) splits the
    batch into rows of similar length, each trimmed to its own longest window, so the
    [rows, width, N] logits skip most of the right padding; the logits are the same as over the
    whole batch."""
    if groups is None:
        groups = [(torch.arange(len(h), device=h.device), h.shape[1], None)]
    for rows, width, positions in groups:
        yg = labels[rows, :width]
        logits, _, positions = _select(
            shared_negative_logits(h[rows, :width], yg, weight, negatives[rows]), yg, positions
        )
        logits = _fp32(logits)
        if log_q is not None or allowed is not None:
            row = rows[positions // width]  # the batch row of each position
            if log_q is not None:  # logQ: each candidate's logit less the log of its sampling weight
                logits = logits - torch.cat(
                    [log_q_labels[row, positions % width][:, None], log_q[row]], dim=1
                )
            if allowed is not None:
                keep = torch.cat([allowed.new_ones(len(row), 1), allowed[row]], dim=1)
                logits = logits.masked_fill(~keep, float("-inf"))
        yield logits


def sampled_ce(
    h: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    negatives: torch.Tensor | Drawn,
    groups: list[tuple[torch.Tensor, int, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """negatives: [B, N] items shared by every step of sequence b (the paper's loss (3)), or a
    `negatives.Drawn` whose `allowed` leaves some out and whose `log_q` applies the logQ correction."""
    drawn = negatives if isinstance(negatives, Drawn) else Drawn(negatives)
    parts = _sampled_logits(
        h, labels, weight, drawn.items, groups, drawn.allowed, drawn.log_q, drawn.log_q_labels
    )
    return torch.cat([torch.logsumexp(logits, dim=-1) - logits[:, 0] for logits in parts]).mean()


def gbce(
    h: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    negatives: torch.Tensor,
    beta: float,
    groups: list[tuple[torch.Tensor, int, torch.Tensor]] | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """gBCE: beta * softplus(-s+) for the positive and softplus(s-) for each of its N negatives,
    averaged over every (position, candidate) pair, as gSASRec does (its gbce.py); beta = 1 is
    BCE. negatives: [B, N] shared by a sequence's steps (grouped as in `sampled_ce`), or
    [B, T, N] per position (`positions` selects the real ones)."""
    if negatives.dim() == 2:
        parts = list(_sampled_logits(h, labels, weight, negatives, groups))
    else:
        h, targets, positions = _select(h, labels, positions)
        drawn = negatives.reshape(-1, negatives.shape[-1])[positions]
        parts = [
            _fp32(
                torch.cat(
                    [
                        (h * rows_of(weight, targets)).sum(-1, keepdim=True),
                        torch.bmm(rows_of(weight, drawn), h[:, :, None]).squeeze(-1),
                    ],
                    dim=-1,
                )
            )
        ]
    total = sum(beta * F.softplus(-logits[:, 0]).sum() + F.softplus(logits[:, 1:]).sum() for logits in parts)
    return total / max(sum(logits.numel() for logits in parts), 1)
