"""The driver's side of a stage, as Tune's callback: a terminal line per trial that starts, ends
or fails, a status line every 30 s, the results table kept current, the progress handed to
whoever watches (`PROGRESS`: the live page), and the driver's hooks run at each step of Tune's
loop (`interrupts.DRIVER_STEP`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune

from raysweep.core.config import trial_key
from raysweep.core.progress import clock, time_left
from raysweep.sweep import faults
from raysweep.sweep.interrupts import DRIVER_STEP
from raysweep.sweep.records import failed_record
from raysweep.sweep.rundir import LiveResults, RunDir
from raysweep.sweep.trainable import trial_config

# Called with {stage, running, waiting} as trials start and end. Tune pickles its callbacks with
# an experiment, so what belongs to the running driver is looked up here, never kept in one.
PROGRESS: list[Callable[[dict[str, Any]], None]] = []


class TrialLog(tune.Callback):
    """One terminal line per finished or failed trial, the results table and the live report kept
    current, and the driver's hooks run at each step of Tune's loop.

    A trial that keeps failing after its retries is recorded as failed, with its error, so
    the results table and the report show it.
    """

    def __init__(self, run: RunDir, stage: str, every: float = 30.0):
        self.run, self.stage, self.every = run, stage, every

    def setup(self, **info):
        self.finished = self.failed = 0
        self.restored_counted = False
        self.best: dict[str, tuple[int, float]] = {}
        self.last_status = time.monotonic()
        self.results = LiveResults(self.run)
        self.results.flush()  # the live page reads the table, and a first stage has none yet

    def _progress(self, trials) -> None:
        running = sum(t.status == "RUNNING" for t in trials)
        waiting = len(trials) - self.finished - self.failed - running
        for hook in PROGRESS:
            hook({"stage": self.stage, "running": running, "waiting": waiting})

    def on_step_begin(self, iteration, trials, **info):
        if not self.restored_counted:  # a restored stage's ended trials never reach on_trial_complete
            self.restored_counted = True
            ended = [t for t in trials if t.status == "TERMINATED"]
            self.failed = sum(bool((t.last_result or {}).get("failed")) for t in ended)
            self.finished = len(ended) - self.failed
        for hook in DRIVER_STEP:
            hook()
        if time.monotonic() - self.last_status >= self.every:  # also while no epoch ends
            self.last_status = time.monotonic()
            self._status(trials)

    def on_trial_start(self, iteration, trials, trial, **info):
        cfg = trial_config(trial.config)
        print(
            f"[raysweep] start  {cfg.dataset} {cfg.label} seed {cfg.seed} ({self.stage}) {where(cfg, trial)}",
            flush=True,
        )

    def on_trial_result(self, iteration, trials, trial, result, **info):
        faults.driver_point("first-report")
        if "epoch" in result and not result.get("finished"):
            self.best[trial.trial_id] = (result["epoch"], result.get("best_ndcg@10", float("nan")))

    def _status(self, trials) -> None:
        """The status line: counts, then each running trial's epoch, its step within the epoch
        with the time the epoch still needs, and its best validation NDCG@10 so far."""
        running = [t for t in trials if t.status == "RUNNING"]
        parts = [self._trial_status(t) for t in running]
        waiting = len(trials) - self.finished - self.failed - len(running)
        print(
            f"[raysweep] {self.stage}: {self.finished} done, {self.failed} failed, {len(running)} running, "
            f"{waiting} waiting" + (" | " + "; ".join(p for p in parts if p) if any(parts) else ""),
            flush=True,
        )
        self._progress(trials)

    def _trial_status(self, trial) -> str:
        cfg = trial_config(trial.config)
        name = f"{cfg.label} s{cfg.seed}"
        ended, best = self.best.get(trial.trial_id, (0, float("nan")))
        best_text = "" if ended == 0 else f" best {best:.4f}"
        at = self.run.read_progress(trial_key(cfg))
        if at is None or at["epoch"] <= ended:  # no step reported since its last epoch ended
            return f"{name} epoch {ended}{best_text}" if ended else ""
        text = f"{name} epoch {int(at['epoch'])} step {int(at['step'])}/{int(at['steps'])}"
        left = time_left(at["seconds"], at["step"], at["steps"])
        if left is not None:
            text += f" (~{clock(left)} left in it)"
        return text + best_text

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        cfg = trial_config(trial.config)
        if last.get("failed"):
            self.failed += 1
            print(
                f"[raysweep] FAILED {cfg.dataset} {cfg.label} seed {cfg.seed}: {last['failed']}",
                file=sys.stderr,
                flush=True,
            )
        else:
            self.finished += 1
            print(
                f"[raysweep] done   {cfg.dataset} {cfg.label} seed {cfg.seed}: "
                f"best val NDCG@10 {last.get('best_ndcg@10', float('nan')):.4f}, "
                f"test NDCG@10 {last.get('test_ndcg@10', float('nan')):.4f} "
                f"({self.finished} done, {self.failed} failed, {len(trials)} in {self.stage})",
                flush=True,
            )
        self.results.update(trial_key(cfg))
        self._progress(trials)
        faults.driver_point("first-finish")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.failed += 1
        cfg = trial_config(trial.config)
        key = trial_key(cfg)
        error = _error_text(trial)
        previous = self.run.read_record(key)
        if previous is None or not previous.ok:  # the latest failure replaces an older one
            self.run.write_record(
                failed_record(
                    cfg,
                    key,
                    self.stage,
                    error,
                    searched=trial.config.get("search", {}),
                    attempts=trial.num_failures,
                    host=None,
                    node_id=None,
                ),
            )
        print(
            f"[raysweep] FAILED {cfg.dataset} {cfg.label} seed {cfg.seed} after {trial.num_failures} "
            "attempts: "
            f"{error.splitlines()[-1] if error else 'unknown error'}",
            file=sys.stderr,
            flush=True,
        )
        self.results.update(key)
        self._progress(trials)

    def on_experiment_end(self, trials, **info):
        self.results.flush()


def _error_text(trial) -> str:
    """The trial's last error as Tune saved it (error.txt in the trial folder)."""
    path = Path(trial.local_path or "") / "error.txt"
    return (
        path.read_text()[-4000:] if path.is_file() else str(getattr(trial, "error_msg", "") or "trial failed")
    )


def where(cfg, trial) -> str:
    """The device a trial trains on, as its settings and Ray's assignment decide it: a trial given
    a GPU share trains on that GPU or fails at once (`devices.resolve_device`), never on the CPU."""
    share = trial.placement_group_factory.required_resources.get("GPU", 0)
    if cfg.is_bpr or cfg.device == "cpu" or (share == 0 and cfg.device == "auto"):
        return "on the CPU" + (f" (its {share:g} GPU share unused)" if share and not cfg.is_bpr else "")
    return f"on {share:g} of a GPU" if share else f"on {cfg.device}"
