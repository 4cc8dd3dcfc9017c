"""Ray Tune's side of a trial: the trainable, its resources, search spaces, and the driver's
per-trial log.

The trainable is `trial.run_trial` unchanged; this module only adds what Tune needs around
it: a report every epoch, the full training state saved beside the trial's record at most
about once a minute and at the end, and a per-trial result record written by rename. A trial
whose record exists returns at once, and one with a saved state continues from it, so a resumed
sweep or a retried trial never re-runs finished work, even when Tune's own experiment snapshot
is older than the crash.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from raysweep import faults
from raysweep.atomic import atomic_write
from raysweep.config import TrialConfig, trial_key
from raysweep.errors import Diverged
from raysweep.interrupts import DRIVER_STEP
from raysweep.results import (
    LiveResults,
    TrialRecord,
    failed_record,
    finished_record,
    read_record,
    record_dir,
    write_record,
)
from raysweep.sweep import Distribution
from raysweep.trial import run_trial

CHECKPOINT_SECONDS = 60.0
STATE_FILE = "state.pt"


def trial_config(config: dict[str, Any]) -> TrialConfig:
    """The trial's settings: the fixed ones plus whatever a search sampled."""
    return TrialConfig.from_dict({**config["trial"], **config.get("search", {})}, where="trial")


def summary(record: TrialRecord) -> dict[str, Any]:
    """The metrics Tune sees for a finished trial."""
    return {
        "epoch": record.epochs,
        "best_ndcg@10": record.val["ndcg@10"],
        "finished": True,
        **{f"test_{k}": v for k, v in record.test.items()},
    }


def trainable(config: dict[str, Any]) -> None:
    """One Tune trial: `run_trial` with per-epoch reports, a saved state and a result record."""
    run_dir = Path(config["run_dir"])
    cfg = trial_config(config)
    key = trial_key(cfg)
    stage = config.get("stage", "seeds")
    done = read_record(run_dir, key)
    if done is not None and done.ok:  # a failed trial's record is replaced when it runs again
        if stage not in done.stages:  # e.g. a search trial that is also the chosen setting's seed run
            done.stages.append(stage)
            write_record(run_dir, done)
        tune.report(summary(done))
        return
    started_at = time.time()
    # The state lives beside the record, not in a Tune checkpoint: Tune deletes a trial's older
    # checkpoint before it snapshots its experiment state, and a kill in between leaves a
    # snapshot that points at a deleted checkpoint, which Tune then cannot restore.
    state_path = record_dir(run_dir, key) / STATE_FILE
    resume = None
    if state_path.is_file():
        # weights_only: the state holds tensors and plain values, never pickled objects.
        resume = torch.load(state_path, map_location="cpu", weights_only=True)
    last_saved = time.monotonic()

    def on_epoch(report, state) -> None:
        nonlocal last_saved
        faults.trial_point(cfg.extra, report.epoch, restored=resume is not None)
        metrics = {**report.row(), "best_ndcg@10": report.best_ndcg, "best_epoch": report.best_epoch}
        if report.done or time.monotonic() - last_saved >= cfg.extra.get(
            "checkpoint_seconds", CHECKPOINT_SECONDS
        ):
            snapshot = state()
            atomic_write(state_path, lambda tmp: torch.save(snapshot, tmp))
            last_saved = time.monotonic()
        tune.report(metrics)

    where = dict(
        searched=config.get("search", {}),
        node_id=ray.get_runtime_context().get_node_id(),
        host=platform.node(),
        started_at=started_at,
        resources=dict(tune.get_context().get_trial_resources().required_resources),
    )
    try:
        result = run_trial(cfg, on_epoch=on_epoch, resume=resume)
    except Diverged as exc:  # settings that cannot train: no retry would help, and it must never win
        write_record(run_dir, failed_record(cfg, key, stage, str(exc), **where, finished_at=time.time()))
        state_path.unlink(missing_ok=True)
        tune.report({"epoch": exc.epoch, "best_ndcg@10": 0.0, "finished": True, "diverged": str(exc)})
        return
    record = finished_record(
        result.summary(),
        key,
        stage,
        **where,
        finished_at=time.time(),
        resumed_from_epoch=resume["epoch"] if resume is not None else None,
    )
    write_record(run_dir, record, result)
    state_path.unlink(missing_ok=True)  # the record now says all; a rerun starts afresh
    tune.report(summary(record))


def resources_for(spec_resources) -> Any:
    """BPR-MF (implicit's CPU build) never asks for a GPU; sequential trials ask for a fraction."""

    def resources(config: dict[str, Any]) -> dict[str, float]:
        gpu = 0.0 if config["trial"].get("model") == "bpr" else spec_resources.gpus
        return {"cpu": spec_resources.cpus, "gpu": gpu}

    return resources


def search_space(space: dict[str, Distribution]) -> dict[str, Any]:
    """Tune domains from a sweep file's search block (OptunaSearch converts them)."""
    out = {}
    for name, d in space.items():
        if d.choice is not None:
            out[name] = tune.choice(d.choice)
        elif d.uniform is not None:
            out[name] = tune.uniform(*d.uniform)
        elif d.loguniform is not None:
            out[name] = tune.loguniform(*d.loguniform)
        else:
            out[name] = tune.randint(*d.randint)
    return out


class TrialLog(tune.Callback):
    """One terminal line per finished or failed trial, the results table and the live report kept
    current, and the driver's hooks run at each step of Tune's loop.

    A trial that keeps failing after its retries is recorded as failed, with its error, so
    the results table and the report show it.
    """

    def __init__(self, run_dir: Path, stage: str, every: float = 30.0):
        self.run_dir, self.stage, self.every = run_dir, stage, every

    def setup(self, **info):
        from raysweep.report import LivePage

        self.finished = self.failed = 0
        self.restored_counted = False
        self.best: dict[str, tuple[int, float]] = {}
        self.last_status = time.monotonic()
        self.results = LiveResults(self.run_dir)
        self.results.flush()  # the live page reads the table, and a first stage has none yet
        self.page = LivePage(self.run_dir)

    def _progress(self, trials) -> None:
        running = sum(t.status == "RUNNING" for t in trials)
        waiting = len(trials) - self.finished - self.failed - running
        self.page.request({"stage": self.stage, "running": running, "waiting": waiting})

    def on_step_begin(self, iteration, trials, **info):
        if not self.restored_counted:  # a restored stage's ended trials never reach on_trial_complete
            self.restored_counted = True
            ended = [t for t in trials if t.status == "TERMINATED"]
            self.failed = sum(bool((t.last_result or {}).get("diverged")) for t in ended)
            self.finished = len(ended) - self.failed
        for hook in DRIVER_STEP:
            hook()

    def on_trial_start(self, iteration, trials, trial, **info):
        cfg = trial_config(trial.config)
        print(f"[raysweep] start  {cfg.dataset} {cfg.label} seed {cfg.seed} ({self.stage})", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        faults.driver_point("first-report")
        if "epoch" in result and not result.get("finished"):
            self.best[trial.trial_id] = (result["epoch"], result.get("best_ndcg@10", float("nan")))
        if time.monotonic() - self.last_status >= self.every:
            self.last_status = time.monotonic()
            running = [t for t in trials if t.status == "RUNNING"]
            parts = [
                f"{trial_config(t.config).label} s{trial_config(t.config).seed} "
                f"epoch {self.best[t.trial_id][0]} best {self.best[t.trial_id][1]:.4f}"
                for t in running
                if t.trial_id in self.best
            ]
            print(
                f"[raysweep] {self.stage}: {self.finished} done, {self.failed} failed, "
                f"{len(running)} running, {len(trials) - self.finished - self.failed - len(running)} waiting"
                + (" | " + "; ".join(parts) if parts else ""),
                flush=True,
            )
            self._progress(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        cfg = trial_config(trial.config)
        if last.get("diverged"):
            self.failed += 1
            print(
                f"[raysweep] FAILED {cfg.dataset} {cfg.label} seed {cfg.seed}: {last['diverged']}",
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
        previous = read_record(self.run_dir, key)
        if previous is None or not previous.ok:  # the latest failure replaces an older one
            write_record(
                self.run_dir,
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
        self.page.close()


def _error_text(trial) -> str:
    """The trial's last error as Tune saved it (error.txt in the trial folder)."""
    path = Path(trial.local_path or "") / "error.txt"
    return (
        path.read_text()[-4000:] if path.is_file() else str(getattr(trial, "error_msg", "") or "trial failed")
    )
