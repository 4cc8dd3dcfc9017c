"""The sweep driver's own cost per trial: a sweep of many tiny trials, run as a user runs one.

    python benchmarks/many_trials.py [--trials 1000] [--out runs/many-trials]

Writes a sweep of `--trials` tiny SASRec trials (the synthetic chains, hidden 8, one epoch,
100 validation users, one CPU each), runs it with `python -m raysweep.run` in local mode and
prints the wall-clock, the trials' own compute (the sum of their training seconds), the
driver's overhead per trial slot ((wall-clock x slots - compute) / trials), trials lost or
duplicated, and the driver process's resident memory (sampled every 2 s) 10 s in, at its
peak and at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd


def grid(trials: int) -> tuple[int, int]:
    """(seeds, values of N): about `trials` trials, at most 250 N values per seed."""
    seeds = max(1, trials // 250)
    return seeds, trials // seeds


def sweep_text(trials: int) -> str:
    seeds, n_values = grid(trials)
    negatives = list(range(1, n_values + 1))
    return (
        "name: many-trials\n"
        "datasets: [synthetic-chains]\n"
        f"seeds: {list(range(seeds))}\n"
        "settings: {max_epochs: 1, patience: 1, val_users: 100, hidden: 8}\n"
        f"models:\n  - {{model: sasrec, loss: sampled_ce, negatives: {negatives}}}\n"
        "resources: {cpus: 1}\n"
    )


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("runs/many-trials"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    spec = args.out / "many-trials.yaml"
    spec.write_text(sweep_text(args.trials))
    run_dir = args.out / "run"
    started = time.perf_counter()
    driver = subprocess.Popen(
        [sys.executable, "-m", "raysweep.run", str(spec), "--results", str(run_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    samples: list[float] = []

    def sample() -> None:
        time.sleep(10)  # from the driver's start-up on (before it, the RSS is the bare interpreter's)
        while driver.poll() is None:
            if (mb := rss_mb(driver.pid)) is not None:
                samples.append(mb)
            time.sleep(2)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    code = driver.wait()
    wall = time.perf_counter() - started
    watcher.join()
    results = pd.read_parquet(run_dir / "results.parquet")
    slots = os.cpu_count() or 1
    compute = float(results["train_seconds"].sum())
    seeds, n_values = grid(args.trials)
    expected = seeds * n_values
    print(
        f"exit {code}; {len(results)} trials recorded of {expected} "
        f"({results['key'].nunique()} distinct keys, {int((results['status'] != 'ok').sum())} failed)"
    )
    print(
        f"wall-clock {wall:.0f} s on {slots} slots; trials' compute {compute:.1f} s; overhead "
        f"{(wall * slots - compute) / len(results):.2f} slot-seconds per trial"
    )
    if samples:
        print(
            f"driver RSS: {samples[0]:.0f} MB 10 s in, {max(samples):.0f} MB at its peak, "
            f"{samples[-1]:.0f} MB at the end"
        )


if __name__ == "__main__":
    main()
