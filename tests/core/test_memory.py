"""A long CPU trial's memory stays flat from epoch to epoch."""

import ctypes
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from raysweep.core.devices import native_bf16

ROOT = Path(__file__).resolve().parents[2]


def _glibc_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc_mallinfo2(), reason="reads glibc's mallinfo2 (Linux, glibc 2.33 or later)")
@pytest.mark.skipif(
    not native_bf16(torch.device("cpu")),
    reason="the CPU has no native bf16: its trials train in fp32, without oneDNN",
)
def test_a_bf16_cpu_trial_does_not_pile_up_onednn_primitives_for_each_batch_shape(tmp_path):
    """BERT4Rec's batches change shape at every step (the number of masked items, the longest
    window); oneDNN would keep a primitive for every shape it met, and malloc's bytes in use
    would grow by megabytes an epoch (tens over these six epochs). The trace runs in a fresh
    process, as a sweep's trial does: oneDNN reads its cache settings at its first primitive."""
    trace = tmp_path / "trace.csv"
    command = [sys.executable, str(ROOT / "benchmarks" / "memory_trace.py"), "--dataset", "synthetic-chains"]
    done = subprocess.run([*command, "--epochs", "6", "--csv", str(trace)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    in_use = pd.read_csv(trace).set_index("epoch")["malloc_in_use_mb"]
    assert list(in_use.index) == [0, 1, 2, 3, 4, 5, 6]
    assert in_use[6] - in_use[2] < 5, in_use.round(1).tolist()  # MB


FRAGMENTED = r"""
import re, sys
from pathlib import Path
import torch
from raysweep.core.memory import release_freed_memory

def rss_mb():
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

blocks = [bytearray(64 * 1024) for _ in range(6000)]  # below glibc's mmap threshold: on its heap
kept = blocks[::50]  # what stays alive pins the heap's top, so glibc cannot shrink it by itself
del blocks
before = rss_mb()
if sys.argv[1] == "trim":
    release_freed_memory(torch.device("cpu"))
print(before - rss_mb())
"""


@pytest.mark.skipif(not _glibc_mallinfo2(), reason="glibc's malloc_trim (Linux)")
def test_memory_freed_in_a_fragmented_heap_goes_back_to_the_system():
    released = {}
    for mode in ("trim", "keep"):
        done = subprocess.run([sys.executable, "-c", FRAGMENTED, mode], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        released[mode] = float(done.stdout)
    assert released["trim"] > 250 and released["keep"] < 20, released  # MB of the ~370 MB freed
