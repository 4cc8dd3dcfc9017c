"""Peak memory of one trial, and how much a trial would need before it allocates anything.

On a GPU the peak is `torch.cuda.max_memory_allocated` above what was allocated when the trial
started; on the CPU it is the process's peak resident set size above its size at the start
(Linux resets the peak through /proc/self/clear_refs, so a worker process that ran an earlier
trial does not carry that trial's peak over; elsewhere the lifetime peak is all there is). A
trial resumed from its saved state reports the larger of its own peak and its earlier attempts'.
"""

from __future__ import annotations

import ctypes
import os
import re
import resource
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

MB = 2**20


def _status_kb(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
    except OSError:
        return False
    return True


def _lifetime_peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB on Linux


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: its allocator returns memory its own way
        return None


def release_freed_memory(device: torch.device) -> None:
    """Hand the host memory freed during an epoch back to the system. glibc's malloc keeps it, and
    a batch's changing shapes fragment its heap, so a CPU trial's resident set would creep up by
    megabytes an epoch; one `malloc_trim` an epoch keeps it flat (benchmarks/memory_trace.py)."""
    trim = _malloc_trim()
    if device.type == "cpu" and trim is not None:
        trim(0)


def track_peak(device: torch.device) -> Callable[[], float]:
    """Start measuring; the function returned gives the peak memory in MB since then, above the start."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        return lambda: (torch.cuda.max_memory_allocated(device) - start) / MB
    if _reset_peak_rss() and _status_kb("VmRSS") is not None:
        start = _status_kb("VmRSS") * 1024
        return lambda: max(_status_kb("VmHWM") * 1024 - start, 0) / MB
    start = _lifetime_peak_rss()
    return lambda: max(_lifetime_peak_rss() - start, 0) / MB


def device_memory(device: torch.device) -> int:
    """Bytes of memory the device has (a CPU: the machine's physical memory)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_used_mb(device: torch.device) -> float | None:
    """What the whole GPU has in use now (CUDA context and other processes included); None on the CPU."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / MB


def training_bytes(
    model: str,
    loss: str | None,
    negatives: int | None,
    hidden: int,
    blocks: int,
    heads: int,
    max_len: int,
    batch_size: int,
    factors: int,
    num_users: int,
    num_items: int,
    cuda_graphs: bool = False,
) -> int:
    """A low estimate of the memory a trial needs (bytes): the on-device sequences, the weights
    with their gradients and Adam's two moments (16 bytes a parameter), and one step's largest
    activations (twice with `cuda_graphs`: the graphs' shared pool holds a step's activations
    beside the eager allocator's). A trial whose estimate exceeds its device's memory cannot run."""
    if model == "bpr":
        return (num_users + num_items) * factors * 4 * 3  # user and item factors, and the scores of a chunk
    sequences = 8 * num_users * (3 * max_len + 1)  # int64 training windows, validation and test inputs
    parameters = (
        (num_items + 2) * hidden + max_len * hidden + blocks * (6 * hidden * hidden + 2 * 256 * hidden)
    )
    activations = batch_size * max_len * hidden * blocks * 4 * 8
    if model != "gru4rec":
        activations += batch_size * heads * max_len * max_len * blocks * 4 * 2  # attention scores and softmax
    if loss in ("sampled_ce", "gbce"):
        activations += batch_size * max_len * (negatives or 0) * 4 * 2  # [B, L, N] logits and their gradient
    return sequences + 16 * parameters + activations * (2 if cuda_graphs else 1)
