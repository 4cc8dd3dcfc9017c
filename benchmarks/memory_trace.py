"""Where a long CPU trial's resident memory goes, epoch by epoch: one trial trained through the
sweep's own path (`run_trial`, with the full training state written to disk after every epoch as
the sweep does), and after each epoch the process's resident set beside what glibc's malloc
says is in use and what it holds free, Python's own heap (tracemalloc) and the tensors alive.

A resident set that grows while malloc's bytes in use stay flat is memory the allocator keeps
after it is freed, not a leak. Two settings of raysweep's decide it on the CPU: oneDNN's
primitive caches, off unless the environment sets them (`ONEDNN_CACHES`;
`ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 LRU_CACHE_CAPACITY=1024` restores the libraries'
default), and the trainer's `malloc_trim` after every epoch (`--no-trim` leaves it out).

    OMP_NUM_THREADS=1 python benchmarks/memory_trace.py --dataset beauty --model bert4rec \\
        --epochs 8 [--no-trim] [--csv trace.csv]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import re
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import pandas as pd
import torch

from raysweep.core import trainer
from raysweep.core.config import TrialConfig
from raysweep.core.devices import ONEDNN_CACHES
from raysweep.core.trial import run_trial

MB = 2**20


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in [
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        ]
    ]


LIBC = ctypes.CDLL("libc.so.6")
LIBC.mallinfo2.restype = MallInfo2


def status_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024


def live_tensors() -> tuple[int, float]:
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated aliases warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return len(tensors), sum(t.untyped_storage().nbytes() for t in tensors) / MB


def snapshot(epoch: int, train_seconds: float = 0.0) -> dict:
    info = LIBC.mallinfo2()
    count, tensor_mb = live_tensors()
    return {
        "epoch": epoch,
        "train_seconds": train_seconds,
        "cpu_seconds": time.process_time(),  # steadier than wall-clock beside other work
        "rss_mb": status_mb("VmRSS"),
        "peak_rss_mb": status_mb("VmHWM"),
        # uordblks: bytes handed out from the heaps; hblkhd: bytes in blocks mapped one by one
        "malloc_in_use_mb": (info.uordblks + info.hblkhd) / MB,
        "malloc_free_held_mb": info.fordblks / MB,
        "python_heap_mb": tracemalloc.get_traced_memory()[0] / MB,
        "tensors": count,
        "tensor_mb": tensor_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="beauty")
    parser.add_argument("--model", default="bert4rec")
    parser.add_argument("--loss", default=None)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument(
        "--no-trim", action="store_true", help="without the trainer's malloc_trim after each epoch"
    )
    parser.add_argument("--no-amp", action="store_true", help="fp32 throughout (no bf16 autocast)")
    parser.add_argument("--csv", type=Path, help="write the per-epoch trace here")
    args = parser.parse_args()
    settings = dict(dataset=args.dataset, model=args.model, device="cpu", max_epochs=args.epochs)
    if args.no_amp:
        settings["amp"] = False
    if args.loss:
        settings["loss"] = args.loss
    cfg = TrialConfig.from_dict({**settings, "patience": args.epochs})
    if args.no_trim:
        trainer.release_freed_memory = lambda device: None
    tracemalloc.start()
    rows = [snapshot(0)]
    with tempfile.TemporaryDirectory() as folder:
        state_path = Path(folder) / "state.pt"

        def on_epoch(report, state) -> None:
            torch.save(state(), state_path)  # what the sweep writes (it does so every few minutes)
            rows.append(snapshot(report.epoch, report.train_seconds))
            row = rows[-1]
            print(
                f"epoch {report.epoch:3d} ({report.train_seconds:.1f} s)  rss {row['rss_mb']:7.1f} MB  "
                f"malloc in use {row['malloc_in_use_mb']:7.1f} MB, free held "
                f"{row['malloc_free_held_mb']:7.1f} MB  python {row['python_heap_mb']:6.1f} MB  "
                f"tensors {row['tensors']} ({row['tensor_mb']:.1f} MB)",
                flush=True,
            )

        run_trial(cfg, on_epoch=on_epoch)
    trace = pd.DataFrame(rows)
    if args.csv:
        trace.to_csv(args.csv, index=False)
    first, last = trace.iloc[1], trace.iloc[-1]
    epochs = last["epoch"] - first["epoch"]
    caches = ", ".join(f"{name}={os.environ.get(name, 'default')}" for name in ONEDNN_CACHES)
    print(
        f"\n{cfg.dataset} {cfg.model}, epochs 1 -> {int(last['epoch'])}, "
        f"trim after each epoch: {not args.no_trim}, {caches}\n"
    )
    print("| measure | after epoch 1 (MB) | at the end (MB) | per epoch (MB) |\n|---|---|---|---|")
    for column in [c for c in trace.columns if c.endswith("_mb")]:
        growth = (last[column] - first[column]) / max(epochs, 1)
        print(f"| {column} | {first[column]:.1f} | {last[column]:.1f} | {growth:+.2f} |")
    later = trace.iloc[2:]
    cpu = trace["cpu_seconds"].diff().iloc[2:]
    print(
        f"\nepochs 2 on: training {later['train_seconds'].mean():.2f} s per epoch (wall-clock), "
        f"{cpu.mean():.2f} CPU seconds per epoch with validation"
    )


if __name__ == "__main__":
    main()
