"""The paper's training losses, over hidden states and the tied item-embedding matrix.

Every loss takes hidden states h [B, T, d], labels [B, T] (0 = padding, never a target) and
the item-embedding weight [num_items + 1, d] (row 0 = padding), and averages over the real
(non-padded) positions of the batch.

- `bce`: SASRec's original binary cross-entropy, one negative per position (the mean of
  the positive and the negative term).
- `ce`: softmax cross-entropy over the whole catalogue (SASRec+), computed in chunks of
  positions so the tokens x items logits never exist at once in memory.
- `sampled_ce`: the paper's loss (3), softmax over the positive and N negatives drawn per
  sequence and shared by all its steps (SASRec+ N).

Negatives come from the items that occur in the training split, never from the user's own
training window (the paper's rule), and are drawn on the device.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

LOSSES = ("bce", "ce", "sampled_ce")

# Logits computed at once by the chunked full CE. On a GPU 2^25 fp32 values (128 MB), i.e. ~1,250
# positions of ML-20M's 26,744 items or ~226 of Yelp's 148,415: few kernel launches, and the
# caching allocator reuses the buffer. On the CPU 2^23 (32 MB): glibc hands out larger blocks
# by a fresh mmap, page-faulted anew for every chunk. CE forward + backward on one thread, best
# of 3, 2^25 -> 2^23: Beauty's shape (740 positions) 315 -> 261 ms, Yelp's 1,640 -> 1,665 ms,
# ML-20M's 1,593 -> 1,620 ms. The chunk's size does not change the result.
CE_CHUNK_ELEMENTS = {"cuda": 1 << 25, "cpu": 1 << 23}


def real_positions_host(label_lengths: np.ndarray, width: int) -> np.ndarray:
    """Flat indices (row x width + step) of the real label positions of a right-padded batch.
    Built on the host from lengths the trainer already knows, so selecting them is a gather of
    known size: no device-to-host sync inside the training step (a boolean mask would sync)."""
    rows = np.repeat(np.arange(len(label_lengths)), label_lengths)
    steps = np.arange(len(rows)) - np.repeat(np.cumsum(label_lengths) - label_lengths, label_lengths)
    return rows * width + steps


def _rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """weight[ids] through index_select, which gathers (and, backwards, adds) whole rows: a Beauty
    SASRec+ 3000 step on one CPU thread takes 200 ms this way, 282 ms with weight[ids]."""
    return weight.index_select(0, ids.reshape(-1)).view(*ids.shape, weight.shape[-1])


def _select(h: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None):
    """Hidden states [n, d] and labels [n] of the real positions."""
    if positions is None:  # callers without host-side lengths (tests) pay a sync here
        positions = torch.nonzero(labels.flatten() > 0).squeeze(1)
    return h.reshape(-1, h.shape[-1])[positions], labels.flatten()[positions], positions


def bce(h: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, negatives: torch.Tensor,
        positions: torch.Tensor | None = None) -> torch.Tensor:
    """negatives: [B, T] one item per position."""
    h, labels, positions = _select(h, labels, positions)
    pos = (h * _rows(weight, labels)).sum(-1)
    neg = (h * _rows(weight, negatives.flatten()[positions])).sum(-1)
    return (F.softplus(-pos).mean() + F.softplus(neg).mean()) / 2


class _ChunkedCE(torch.autograd.Function):
    """Mean softmax CE of h @ weight.T against labels, one chunk of rows at a time.

    The gradients are computed in the forward pass, chunk by chunk ((softmax - onehot) @ W
    and its transpose), so neither pass ever holds more than one chunk of logits. With
    `ignore`, rows whose label is negative count for nothing (the padding of a fixed-shape
    batch), and the mean is over the others.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, ignore: bool = False):
        n = h.shape[0]
        exact = torch.promote_types(h.dtype, torch.float32)  # bf16 logits are summed in fp32
        valid = labels >= 0 if ignore else None
        # A batch with no target (BERT4Rec masked nothing) has loss 0. The count stays on the
        # device when rows are ignored: reading it would be a host sync.
        count = valid.sum().clamp(min=1).to(exact) if ignore else max(n, 1)
        labels = labels.clamp(min=0) if ignore else labels
        total = torch.zeros((), dtype=exact, device=h.device)
        grad_h = torch.empty_like(h) if h.requires_grad else None
        grad_w = torch.zeros_like(weight, dtype=exact) if weight.requires_grad else None
        for start in range(0, n, chunk):
            hc, yc = h[start : start + chunk], labels[start : start + chunk]
            logits = (hc @ weight.T).to(exact)
            target = logits.gather(1, yc[:, None]).squeeze(1)
            # Softmax in place (one buffer per chunk): exp(logits - max) / sum.
            peak = logits.amax(dim=1, keepdim=True)
            scale = logits.sub_(peak).exp_().sum(dim=1, keepdim=True)
            rows = peak.squeeze(1) + scale.squeeze(1).log() - target
            total += (rows if valid is None else rows * valid[start : start + chunk]).sum()
            if grad_h is None and grad_w is None:
                continue
            probs = logits.div_(scale)
            probs[torch.arange(len(yc), device=h.device), yc] -= 1.0
            if valid is not None:
                probs.mul_(valid[start : start + chunk, None])
            probs = probs.to(h.dtype)
            if grad_h is not None:
                grad_h[start : start + chunk] = probs @ weight
            if grad_w is not None:
                grad_w += (probs.T @ hc).to(exact)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.count = count
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.count
        return (None if grad_h is None else grad_h * scale,
                None if grad_w is None else (grad_w * scale).to(ctx.weight_dtype), None, None, None)


# PyTorch >= 2.13 ships the same chunked CE (F.linear_cross_entropy with options): at the same
# chunk size it was 6 % (ML-20M's shape) and 26 % (Yelp's) faster than _ChunkedCE on the CPU
# (benchmarks/chunked_ce.py), so it is used where present; _ChunkedCE serves older PyTorch.
TORCH_CHUNKED_CE = hasattr(torch.nn, "LinearCrossEntropyOptions")


def _under_autocast(h: torch.Tensor) -> torch.Tensor:
    """h in the dtype autocast gives matmuls (as it is outside autocast), for PyTorch's chunked CE.
    That op is not an autocast op: fed the final LayerNorm's fp32 output under bf16 autocast, it
    multiplies in fp32, where _ChunkedCE's matmuls run in bf16 (Beauty's CE shape, one CPU thread
    with avx512_bf16: 315 ms forward + backward in fp32, 100 ms in bf16). Its sums stay fp32; it
    returns the loss in bf16, which `ce` and `masked_ce` hand on in fp32 as every loss here."""
    kind = h.device.type
    return h.to(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else h


def _candidates(weight: torch.Tensor, h: torch.Tensor, chunk: int | None) -> tuple[torch.Tensor, int]:
    """The candidate rows 1..num_items (no padding) in h's dtype, and the chunk of rows to use."""
    candidates = weight[1:]
    if candidates.dtype != h.dtype:  # under autocast the hidden states may be bf16
        candidates = candidates.to(h.dtype)
    return candidates, chunk or max(64, CE_CHUNK_ELEMENTS.get(h.device.type, 1 << 25) // len(candidates))


def _torch_options(chunk: int):
    # "accurate": logits and sums in fp32 even for bf16 inputs, as _ChunkedCE does.
    return torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk, acc_policy="accurate")


def ce(h: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor | None = None,
       chunk: int | None = None) -> torch.Tensor:
    """Full-catalogue softmax CE; `weight` rows 1..num_items are the candidates (no padding)."""
    h, labels, _ = _select(h, labels, positions)
    if TORCH_CHUNKED_CE and len(h):  # (a batch with no target has loss 0: _ChunkedCE's case)
        h = _under_autocast(h)
        candidates, chunk = _candidates(weight, h, chunk)
        return _fp32(F.linear_cross_entropy(h, candidates, labels - 1, options=_torch_options(chunk)))
    candidates, chunk = _candidates(weight, h, chunk)
    return _ChunkedCE.apply(h, candidates, labels - 1, chunk)


def _shared_negative_logits(h: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                            negatives: torch.Tensor) -> torch.Tensor:
    """[b, T, 1 + N]: each step's positive logit, then its sequence's N negatives' (loss (3))."""
    pos = (h * _rows(weight, labels)).sum(-1, keepdim=True)  # [b, T, 1]
    neg = torch.bmm(h, _rows(weight, negatives).transpose(1, 2))  # [b, T, N]
    return torch.cat([pos, neg], dim=-1)


def _fp32(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 under autocast


def sampled_ce(h: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, negatives: torch.Tensor,
               groups: list[tuple[torch.Tensor, int, torch.Tensor]] | None = None) -> torch.Tensor:
    """negatives: [B, N], shared by every step of sequence b (the paper's loss (3)).

    `groups` (rows, width, real positions within the group) splits the batch into rows of
    similar length, each trimmed to its own longest window, so the [rows, width, N] logits
    skip most of the right padding (a Beauty batch is ~6.6 real steps per row but up to 50
    wide). The value is the same as over the whole batch.
    """
    if groups is None:
        groups = [(torch.arange(len(h), device=h.device), h.shape[1], None)]
    terms = []
    for rows, width, positions in groups:
        yg = labels[rows, :width]
        logits, _, _ = _select(_shared_negative_logits(h[rows, :width], yg, weight, negatives[rows]), yg, positions)
        logits = _fp32(logits)
        terms.append(torch.logsumexp(logits, dim=-1) - logits[:, 0])
    return torch.cat(terms).mean()


# The masked_* losses equal the index-list ones on a batch that keeps its padding: the padding
# (label 0) is masked out rather than left out, so no shape depends on the data and the step can
# be captured as a CUDA graph. The trainer uses them only for that (`cuda_graphs`).

def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_ce(h: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    h, targets = h.reshape(-1, h.shape[-1]), labels.reshape(-1) - 1  # padding -> -1, ignored
    if TORCH_CHUNKED_CE:
        h = _under_autocast(h)
        candidates, chunk = _candidates(weight, h, chunk)
        total = _fp32(F.linear_cross_entropy(h, candidates, targets, ignore_index=-1, reduction="sum",
                                             options=_torch_options(chunk)))
        return total / (targets >= 0).sum().clamp(min=1)
    candidates, chunk = _candidates(weight, h, chunk)
    return _ChunkedCE.apply(h, candidates, targets, chunk, True)


def masked_sampled_ce(h: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    logits = _fp32(_shared_negative_logits(h, labels, weight, negatives))
    return _masked_mean(torch.logsumexp(logits, dim=-1) - logits[..., 0], labels > 0)


def masked_bce(h: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    pos = (h * _rows(weight, labels)).sum(-1)
    neg = (h * _rows(weight, negatives)).sum(-1)
    real = labels > 0
    return (_masked_mean(F.softplus(-pos), real) + _masked_mean(F.softplus(neg), real)) / 2


def _free_ranks(pool_rank: torch.Tensor, size: int, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which pool items each sequence may draw, without a [B, items] mask: (skips [B, W], free [B]).

    A window takes some pool ranks (its distinct items that occur in training); sorted, the
    j-th taken rank r_j has r_j - j free ranks below it. So the u-th free rank (0-based) is
    u + #{j : r_j - j <= u}: `skips` holds r_j - j (nondecreasing), then the pool's `size` for
    the window's unused columns, and `free` how many ranks each row has free.
    """
    ranks = pool_rank[windows].sort(dim=1).values  # -1: padding, or an item that never trains
    taken = ranks >= 0
    taken[:, 1:] &= ranks[:, 1:] != ranks[:, :-1]  # a repeated item takes its rank once
    ranks = torch.where(taken, ranks, size).sort(dim=1).values  # the taken ranks first, ascending
    step = torch.arange(ranks.shape[1], device=ranks.device)
    skips = torch.where(ranks < size, ranks - step, size)
    return skips, size - taken.sum(1)


def _free_items(pool_items: torch.Tensor, skips: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[B, k]: the u-th free pool item of each row (u: [B, k], each below the row's `free`)."""
    return pool_items[u + torch.searchsorted(skips, u, right=True)]


def _uniform_below(free: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """[B, count] integers uniform in [0, free_b) (fp64: biased by at most 2^-53 per value)."""
    u = torch.rand((len(free), count), generator=generator, device=free.device, dtype=torch.float64)
    return (u * free[:, None]).long()


@functools.lru_cache(maxsize=64)  # the same (N, pool, window) every step of a trial
def _draws_needed(n: int, pool_size: int, window: int) -> int | None:
    """How many draws with replacement from the pool leave N distinct items outside a window of
    `window` (8 sigma), or None when that would take more than 4N draws (N near the pool size:
    sample densely instead)."""
    allowed = pool_size - window
    draws = n + window
    while draws <= 4 * n:
        q = 1 - (1 - 1 / pool_size) ** draws  # chance that a given item was drawn
        if allowed * q - 8 * math.sqrt(allowed * q * (1 - q)) >= n:
            return draws
        draws = int(draws * 1.1) + 1
    return None


def shared_negatives(pool_rank: torch.Tensor, pool_items: torch.Tensor, windows: torch.Tensor, n: int,
                     generator: torch.Generator) -> torch.Tensor:
    """[B, N]: N distinct items per sequence, none in its window (loss (3)'s negatives).

    Uniform without replacement: random keys over the candidates, keep the N smallest. For
    N well below the pool the candidates are a few more than N draws with replacement,
    deduplicated (the distinct values of i.i.d. uniform draws are a uniform subset); else
    every pool item. Both are free of host syncs. `pool_rank`: each item's index in
    `pool_items`, -1 for items that never occur in training.
    """
    rows, size, device = len(windows), len(pool_items), windows.device
    taken = pool_rank[windows] % (size + 1)  # the window's pool ranks; padding and the like -> column `size`
    draws = _draws_needed(n, size, windows.shape[1])
    if draws is None:
        keys = torch.rand((rows, size + 1), generator=generator, device=device)
        keys.scatter_(1, taken, 2.0)
        keys[:, size] = 2.0
        return pool_items[keys.topk(n, dim=1, largest=False, sorted=False).indices]
    picks = torch.randint(size, (rows, draws), generator=generator, device=device)  # pool ranks
    # Each rank drawn keeps one owner among its copies (whichever the scatter leaves: their keys
    # are alike), the window's ranks none. Without sorting the draws: Beauty, N = 3000, one CPU
    # thread, 25.6 ms (sorted, deduplicated neighbours) -> 11.5 ms.
    order = torch.arange(draws, device=device, dtype=torch.int32)
    owner = torch.full((rows, size + 1), -1, dtype=torch.int32, device=device)
    owner.scatter_(1, picks, order.expand(rows, -1))
    owner.scatter_(1, taken, -1)
    keys = torch.rand((rows, draws), generator=generator, device=device)
    keys.masked_fill_(owner.gather(1, picks) != order, 2.0)
    return pool_items[picks.gather(1, keys.topk(n, dim=1, largest=False, sorted=False).indices)]


def position_negatives(pool_rank: torch.Tensor, pool_items: torch.Tensor, windows: torch.Tensor, steps: int,
                       generator: torch.Generator) -> torch.Tensor:
    """[B, steps]: one item per position, uniform with replacement over the pool items outside
    the sequence's window (Beauty, one CPU thread: 0.24 ms; 8.2 ms as multinomial sampling over
    a [B, items] mask)."""
    skips, free = _free_ranks(pool_rank, len(pool_items), windows)
    return _free_items(pool_items, skips, _uniform_below(free, steps, generator))
