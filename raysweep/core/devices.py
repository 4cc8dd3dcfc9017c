"""What depends on the device: its knobs, host-to-device copies, and the training precision.

The knobs are sizes that change speed, never results (benchmarks/README.md has the timings
behind them). On the CPU arithmetic is the bottleneck and small working sets stay in cache;
a GPU step is bound by kernel launches, so it takes work in larger pieces.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager

import numpy as np
import torch

from raysweep.core.errors import UserError

# Logits the chunked full CE computes at once: 2^25 fp32 values (128 MB) on a GPU, for few
# launches; 2^23 (32 MB) on the CPU, where glibc maps larger blocks afresh for every chunk.
CE_CHUNK_ELEMENTS = {"cuda": 1 << 25, "cpu": 1 << 23}
# Users ranked at once in evaluation: their [users, items] scores stay in the CPU's cache
# through the masking and counting passes; a GPU takes many for few launches.
EVAL_CHUNK_USERS = {"cuda": 1024, "cpu": 32}
# Sampled CE's rows in groups of similar length, each trimmed to its own longest window: on the
# CPU this skips most of the [rows, steps, N] logits' padding; on a GPU each group would add
# kernel launches to a launch-bound step, so it keeps one.
LENGTH_GROUPS = {"cpu": 4, "cuda": 1}
# oneDNN's primitive cache and PyTorch's (ideep's) keep up to 1,024 bf16 CPU primitives each, one
# per operand shape. A batch's shape changes from step to step (the longest window, BERT4Rec's
# masked count), so they fill with primitives met once: over 1 GB more resident memory for a
# Beauty BERT4Rec trial, for no speed (benchmarks/README.md). Caching off, unless the
# environment already says otherwise; read when the process builds its first primitive.
ONEDNN_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0", "LRU_CACHE_CAPACITY": "1"}


def knob(table: dict[str, int], device: torch.device) -> int:
    """A knob's value for `device` (a device type not in the table takes the GPU's)."""
    return table.get(device.type, table["cuda"])


def cuda_unusable() -> str | None:
    """Why CUDA cannot be used in this process, or None if it can."""
    if torch.version.cuda is None and torch.version.hip is None:
        return f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of torch"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return (
            f"torch.cuda.is_available() is False (torch {torch.__version__} built for CUDA "
            f"{torch.version.cuda}: no NVIDIA driver, or one older than that CUDA"
            + (f", or CUDA_VISIBLE_DEVICES={visible!r} hides every GPU" if visible is not None else "")
            + ")"
        )
    return None


def resolve_device(name: str, gpu_assigned: bool = False) -> torch.device:
    """`auto` is the GPU where there is one, else the CPU. A trial that was given a GPU (Ray
    assigned it a share of one) runs on it or fails at once, naming why CUDA is not usable: it
    never trains on the CPU while holding a GPU share."""
    wants_cuda = name.startswith("cuda") or (name == "auto" and gpu_assigned)  # (device: cpu is a choice)
    reason = cuda_unusable() if wants_cuda else None
    if reason is not None:
        asked = "this trial was given a GPU" if name == "auto" else f"device {name!r} asked for"
        raise UserError(f"{asked}, but {reason}")
    if name == "auto":
        return torch.device("cuda" if gpu_assigned or torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(
            f"device {name!r} asked for, but this process sees {torch.cuda.device_count()} GPU(s)"
        )
    return device


def device_name(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"


def use_device(device: torch.device) -> None:
    """Make `device` the current CUDA device (streams, graph captures and the allocator follow the
    current device, not the tensors' one), and let fp32 matmuls use TF32 there: evaluation's fp32
    scores and `amp: false` training lose nothing that ranking or training notices, and run
    several times faster. (A resume is bit-identical on the CPU, not on CUDA.) On the CPU: bf16
    primitives uncached (`ONEDNN_CACHES`)."""
    if device.type != "cuda":
        for name, value in ONEDNN_CACHES.items():
            os.environ.setdefault(name, value)
        return
    if device.index is not None:  # (an index-less "cuda" is the current device; set_device refuses it)
        torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device` without a host-device sync: PyTorch copies pageable memory to a
    GPU synchronously, pinned memory asynchronously (the caching host allocator keeps the block
    until the copy is done)."""
    return staged(array, device).to(device, non_blocking=True)


def staged(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """`array` as a host tensor that `device` can copy from asynchronously."""
    tensor = torch.as_tensor(array)
    return tensor.pin_memory() if device.type == "cuda" else tensor


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 natively: a GPU from Ampere on (compute capability 8.0),
    or an x86 CPU with AVX512-BF16 or AMX. Anything else would emulate bf16, slower than fp32."""
    if device.type == "cuda":
        return bool(torch.version.hip) or torch.cuda.get_device_capability(device) >= (8, 0)
    cpu_units = ("avx512_bf16", "amx_tile")
    return device.type == "cpu" and any(
        getattr(torch.cpu, f"_is_{u}_supported", lambda: False)() for u in cpu_units
    )


def precision(amp: bool, device: torch.device) -> str:
    """ "bf16" where a trial trains under bf16 autocast (`amp` on and `native_bf16`), else "fp32"."""
    return "bf16" if amp and native_bf16(device) else "fp32"


def autocast_for(amp: bool, device: torch.device, graphs: bool = False) -> Callable[[], ContextManager]:
    """bf16 autocast where `precision` says so; a no-op elsewhere. Scores for ranking stay fp32.
    A captured CUDA graph must not keep autocast's cache of cast weights (stale copies)."""
    enabled = precision(amp, device) == "bf16"
    return lambda: torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=not graphs
    )
