"""Softmax cross-entropy over the whole catalogue, one chunk of rows at a time (SASRec+'s loss).

The positions x items logits never exist at once: each chunk's logits, softmax and gradients
are made and dropped in turn, so memory stays at one chunk however large the catalogue.
Two interchangeable back-ends compute the same loss, chosen by the caller:

- "torch": PyTorch's own chunked op (`F.linear_cross_entropy` with chunking options,
  PyTorch >= 2.13). It is not an autocast op, so it is handed its input in the autocast dtype.
- "raysweep": `ChunkedCE` below, for older PyTorch, which computes the gradients in the forward
  pass chunk by chunk and keeps only them.

Logits and sums are fp32 in both, whatever the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raysweep.core.devices import CE_CHUNK_ELEMENTS, knob

BACKENDS = ("torch", "raysweep")
DEFAULT_BACKEND = "torch" if hasattr(torch.nn, "LinearCrossEntropyOptions") else "raysweep"


class ChunkedCE(torch.autograd.Function):
    """Mean softmax CE of h @ weight.T against labels, one chunk of rows at a time. With
    `ignore`, rows whose label is negative count for nothing (the padding of a fixed-shape
    batch), and the mean is over the others."""

    @staticmethod
    def forward(
        ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, ignore: bool = False
    ):
        n = h.shape[0]
        exact = torch.promote_types(h.dtype, torch.float32)  # bf16 logits are summed in fp32
        valid = labels >= 0 if ignore else None
        # No target at all (BERT4Rec masked nothing): loss 0. With ignored rows the count stays
        # on the device: reading it would be a host sync.
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
        return (
            None if grad_h is None else grad_h * scale,
            None if grad_w is None else (grad_w * scale).to(ctx.weight_dtype),
            None,
            None,
            None,
        )


def _fp32(value: torch.Tensor) -> torch.Tensor:
    return value.to(torch.promote_types(value.dtype, torch.float32))


def cross_entropy(
    h: torch.Tensor,
    targets: torch.Tensor,
    candidates: torch.Tensor,
    backend: str = DEFAULT_BACKEND,
    chunk: int | None = None,
    ignore: bool = False,
) -> torch.Tensor:
    """Mean CE of h [n, d] @ candidates [C, d].T against 0-based `targets` [n], in fp32. With
    `ignore`, rows whose target is negative count for nothing."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown full-CE back-end {backend!r} (known: {', '.join(BACKENDS)})")
    if backend == "torch" and len(h):  # (a batch with no target has loss 0: ChunkedCE's case)
        kind = h.device.type
        if torch.is_autocast_enabled(kind):  # the dtype autocast gives matmuls, which this op is not
            h = h.to(torch.get_autocast_dtype(kind))
    if candidates.dtype != h.dtype:  # under autocast the hidden states may be bf16
        candidates = candidates.to(h.dtype)
    chunk = chunk or max(64, knob(CE_CHUNK_ELEMENTS, h.device) // len(candidates))
    if backend == "raysweep" or not len(h):
        return ChunkedCE.apply(h, candidates, targets, chunk, ignore)
    # "accurate": logits in fp32 even for bf16 inputs, as ChunkedCE does. The op hands back its
    # loss in the input's dtype whatever acc_dtype says (a bf16 mean is off by up to 0.3 %), so it
    # gives per-row losses, each rounded once, and their mean is taken here in fp32.
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk, acc_policy="accurate")
    rows = F.linear_cross_entropy(h, candidates, targets, ignore_index=-1, reduction="none", options=options)
    total = _fp32(rows).sum()
    return total / ((targets >= 0).sum().clamp(min=1) if ignore else max(len(h), 1))
