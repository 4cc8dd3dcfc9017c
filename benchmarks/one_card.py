"""Table 2 on one card: a sweep's trials as `raysweep.train` processes sharing one device.

    python benchmarks/one_card.py [SWEEP=sweeps/table2.yaml] [--datasets ml-1m beauty] [--concurrent 4]
                                  [--device cuda] [--max-epochs E] [--cuda-graphs] [--grid-only] [--no-report]
                                  [--out DIR]

The trials of a grid sweep file (by default the paper's Table 2, on the datasets named, by
default ML-1M and Beauty), `--concurrent` processes at a time, the longest first, the
machine's CPU threads split between them: what Tune's fractional GPUs amount to, without Ray
(for a machine with a CUDA GPU and no Ray). Each finished trial becomes a record in a sweep's
run-directory layout, so the same results.parquet, Table 2 and Figure 1 come out
(`python -m raysweep.report OUT`), and a rerun skips the trials already recorded. Prints the
grid's wall-clock (the target: ML-1M + Beauty Table 2 in <= 10 minutes on one card). BPR-MF
needs `implicit`; without it its rows are reported as skipped.
An entry with an Optuna search runs at its base settings (searching needs the sweep driver,
`python -m raysweep.run`), or is left out with `--grid-only`.

To finish a sweep run on a card, unpack its archive into OUT and run its own sweep file there
with `--grid-only`: the trial keys leave the device out, so only the trials not yet recorded
run, and `python -m raysweep.archive pack OUT FILE` carries their records back.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd

from raysweep.core.config import TrialConfig, trial_key
from raysweep.core.errors import cli
from raysweep.sweep.records import failed_record, finished_record
from raysweep.sweep.rundir import RunDir
from raysweep.sweep.spec import entry_datasets, entry_seeds, entry_trials, expand, load_spec, stage_name


def trials(
    sweep: Path,
    datasets: list[str] | None,
    device: str,
    max_epochs: int | None,
    cuda_graphs: bool = False,
    grid_only: bool = False,
) -> list[TrialConfig]:
    """The sweep's trials on `datasets`, longest first (long sequences, BERT4Rec's doubled budget)."""
    spec = load_spec(sweep)
    if datasets:
        spec = spec.model_copy(update={"datasets": datasets})
    grid = [t.config for t in expand(spec, str(sweep)) if t.stage == "seeds"]
    # An Optuna search needs Tune (python -m raysweep.run); here a searched entry runs at the
    # settings its search starts from, with its seeds, unless `grid_only` leaves it out.
    for i, entry in enumerate(spec.models):
        if entry.search is not None and grid_only:
            print(
                f"[one_card] {entry.model}: left out (--grid-only; its seeds follow an Optuna search)",
                flush=True,
            )
        elif entry.search is not None:
            for dataset in entry_datasets(spec, i):
                print(
                    f"[one_card] {stage_name(dataset, i)}: no Optuna search without Ray; "
                    f"{entry.model} runs at its base settings",
                    flush=True,
                )
                for seed in entry_seeds(spec, i):
                    grid += entry_trials(spec, i, dataset, seed, str(sweep))
    configs = []
    for cfg in grid:
        cfg = cfg.replaced(device=device)
        if max_epochs is not None and cfg.is_sequential:
            cfg = cfg.replaced(max_epochs=max_epochs)
        if cuda_graphs and cfg.is_sequential:
            cfg = cfg.replaced(cuda_graphs=True)
        configs.append(cfg)
    return sorted(configs, key=lambda c: -(c.max_len or 0) * (2 if c.is_masked else 1))


def command(cfg: TrialConfig, out: Path) -> list[str]:
    """`python -m raysweep.train` with every setting of the trial as a flag."""
    args = [sys.executable, "-m", "raysweep.train", "--out", str(out)]
    for name, value in cfg.to_dict().items():
        if name == "extra" or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:  # (a list setting takes its values one after another)
            args += [flag, *map(str, value if isinstance(value, list) else [value])]
    return args


def record(
    cfg: TrialConfig, out: Path, started: float, returncode: int, log: Path, resources: dict
) -> tuple[dict, list | None, object]:
    """The trial's record as a sweep writes it (`status` failed with the log's tail when it failed)."""
    context = dict(
        searched={},
        node_id=None,
        host=platform.node(),
        started_at=started,
        finished_at=time.time(),
        resources=resources,
    )
    if returncode == 0:
        summary = json.loads((out / "metrics.json").read_text())
        history = pd.read_parquet(out / "history.parquet").to_dict("records")
        ranks = pd.read_parquet(out / "ranks.parquet")["rank"].to_numpy()
        return finished_record(summary, trial_key(cfg), "seeds", **context), history, ranks
    tail = log.read_text(errors="replace").strip().splitlines()[-20:]
    error = "\n".join(tail) or f"exit status {returncode}"
    return failed_record(cfg, trial_key(cfg), "seeds", error, **context), None, None


def run_all(
    todo: list[TrialConfig],
    running: dict,
    run_dir: Path,
    env: dict,
    concurrent: int,
    threads: int,
    started: float,
    stop: threading.Event,
) -> bool:
    """Start trials as slots free up, `concurrent` at a time, and record each as it ends; False
    if `stop` was set first (the trials still running are left in `running`)."""
    while todo or running:
        if stop.is_set():
            return False
        while todo and len(running) < concurrent:
            cfg = todo.pop(0)
            work = run_dir / "work" / trial_key(cfg)
            work.mkdir(parents=True, exist_ok=True)
            log = work / "train.log"
            with log.open("w") as sink:
                process = subprocess.Popen(command(cfg, work), stdout=sink, stderr=subprocess.STDOUT, env=env)
            running[process] = (cfg, work, time.time(), log)
            print(f"[one_card] start {cfg.dataset} {cfg.label}", flush=True)
        time.sleep(0.2)
        for process in [p for p in running if p.poll() is not None]:
            if process.returncode != 0 and stop.is_set():
                continue  # ended by the same stop (a signal to the process group): unfinished, not failed
            cfg, work, began, log = running.pop(process)
            rec, history, ranks = record(
                cfg, work, began, process.returncode, log, dict(concurrent=concurrent, cpu_threads=threads)
            )
            RunDir(run_dir).write_record(rec, history=history, ranks=ranks)
            RunDir(run_dir).write_results()
            if rec.ok:
                test = rec.test
                print(
                    f"[one_card] done  {cfg.dataset} {cfg.label}: best epoch {rec.best_epoch} of "
                    f"{rec.epochs}, "
                    f"{rec.seconds_per_epoch:.2f} s/epoch, test HR@10 {test['hr@10']:.4f} NDCG@10 "
                    f"{test['ndcg@10']:.4f} [{time.perf_counter() - started:.0f} s]",
                    flush=True,
                )
            else:
                print(
                    f"[one_card] FAILED {cfg.dataset} {cfg.label}: {rec.error.splitlines()[-1]}", flush=True
                )
    return True


@cli
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", nargs="?", type=Path, default=Path("sweeps/table2.yaml"))
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "beauty"], help="instead of the sweep's")
    parser.add_argument("--concurrent", type=int, default=4, help="trial processes at once on the device")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--max-epochs", type=int, default=None, help="cap (a quick check); default: the sweep's"
    )
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="the sequential trials' steps as CUDA graphs"
    )
    parser.add_argument(
        "--grid-only",
        action="store_true",
        help="leave out entries with an Optuna search (to finish an unpacked sweep run: their seeds "
        "need the search's best settings, which only python -m raysweep.run finds)",
    )
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="leave the report to be built elsewhere (a large run's paired tests take minutes of CPU "
        "while the card waits)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/table2-one-card"))
    args = parser.parse_args()
    run_dir = args.out.resolve()
    grid = trials(args.sweep, args.datasets, args.device, args.max_epochs, args.cuda_graphs, args.grid_only)
    skipped = [c for c in grid if c.is_bpr and importlib.util.find_spec("implicit") is None]
    todo = [
        c
        for c in grid
        if c not in skipped and not getattr(RunDir(run_dir).read_record(trial_key(c)), "ok", False)
    ]
    threads = max(1, (os.cpu_count() or 1) // args.concurrent)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    no_bpr = f", {len(skipped)} BPR-MF skipped: implicit is not installed" if skipped else ""
    print(
        f"[one_card] {len(grid)} trials ({len(grid) - len(todo) - len(skipped)} already recorded{no_bpr}), "
        f"{args.concurrent} at once on {args.device}, "
        f"{threads} CPU threads each; run directory {run_dir}",
        flush=True,
    )
    started = time.perf_counter()
    running: dict[subprocess.Popen, tuple[TrialConfig, Path, float, Path]] = {}
    # A stop (Ctrl-C, or a time cap's SIGTERM) ends the running trials, which would otherwise
    # hold the device on, and still reports the trials that finished. The handlers only set a
    # flag: an exception raised inside Popen could lose a just-started trial.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stopped = None
    if not run_all(todo, running, run_dir, env, args.concurrent, threads, started, stop):
        stopped = len(running) + len(todo)
        for process in running:
            process.terminate()
        for process in running:
            process.wait()
    wall = time.perf_counter() - started
    if stopped is None:
        print(
            f"\n{len(grid) - len(skipped)} trials on {args.device}, {args.concurrent} at once: "
            f"{wall:.0f} s wall-clock\n"
        )
    else:
        print(
            f"\nSTOPPED after {wall:.0f} s wall-clock: {stopped} of {len(grid) - len(skipped)} trials "
            "unfinished "
            f"(a rerun with the same --out finishes them)\n"
        )
    if not (run_dir / "results.parquet").is_file():
        print("no trial has finished: nothing to report")
        return 0 if stopped is None else 143
    if args.no_report:
        print(f"report left out (--no-report): python -m raysweep.report {run_dir}")
        return 0 if stopped is None else 143
    try:  # the report needs scipy and matplotlib, which a bare GPU image may lack
        from raysweep.report.render import write_report

        written = write_report(RunDir(run_dir))
    except ImportError as exc:
        results = run_dir / "results.parquet"
        print(f"report skipped: needs {exc.name or exc}; the trials' results are in {results}")
    else:
        print((run_dir / "report" / "table2.md").read_text())
        print("written:", ", ".join(str(p) for p in written))
    return 0 if stopped is None else 143  # 128 + SIGTERM: stopped before the grid was done


if __name__ == "__main__":
    sys.exit(main())
