"""Ray Tune's side of a trial, run in the worker: the trainable, its resources and search spaces.

The trainable is `trial.run_trial` unchanged; this module only adds what Tune needs around
it: a report every epoch, the full training state saved beside the trial's record at most
about once a minute and at the end, and a per-trial result record written by rename. A trial
whose record exists returns at once, and one with a saved state continues from it, so a resumed
sweep or a retried trial never re-runs finished work, even when Tune's own experiment snapshot
is older than the crash.
"""

from __future__ import annotations

import json
import platform
import time
from typing import Any

import ray
import torch
from ray import tune

from raysweep.core.atomic import atomic_write
from raysweep.core.config import TrialConfig, trial_key
from raysweep.core.errors import UserError
from raysweep.core.trial import run_trial
from raysweep.sweep import faults
from raysweep.sweep.records import TrialRecord, failed_record, finished_record
from raysweep.sweep.rundir import RunDir
from raysweep.sweep.spec import Distribution

CHECKPOINT_SECONDS = 60.0
PROGRESS_SECONDS = 5.0  # how often a trial says where it is within its epoch


class StepProgress:
    """A trial's progress within its epoch, written (by rename) to the trial's progress.json at
    most every PROGRESS_SECONDS for the driver's status line: epoch, step, steps, and the
    seconds since the epoch's first step ended (so the steps after it give the pace)."""

    def __init__(self, run: RunDir, key: str):
        self.path = run.progress_file(key)
        self.epoch, self.first, self.written = 0, 0.0, 0.0

    def __call__(self, epoch: int, step: int, steps: int) -> None:
        now = time.monotonic()
        if epoch != self.epoch:
            self.epoch, self.first = epoch, now
        if now - self.written >= PROGRESS_SECONDS:
            body = json.dumps(dict(epoch=epoch, step=step, steps=steps, seconds=now - self.first))
            atomic_write(self.path, lambda tmp: tmp.write_text(body))
            self.written = now


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
    run = RunDir(config["run_dir"])
    cfg = trial_config(config)
    key = trial_key(cfg)
    stage = config.get("stage", "seeds")
    done = run.read_record(key)
    if done is not None and done.ok:  # a failed trial's record is replaced when it runs again
        if stage not in done.stages:  # e.g. a search trial that is also the chosen setting's seed run
            done.stages.append(stage)
            run.write_record(done)
        tune.report(summary(done))
        return
    started_at = time.time()
    # The state lives beside the record, not in a Tune checkpoint: Tune deletes a trial's older
    # checkpoint before it snapshots its experiment state, and a kill in between leaves a
    # snapshot that points at a deleted checkpoint, which Tune then cannot restore.
    state_path = run.state_file(key)
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

    resources = dict(tune.get_context().get_trial_resources().required_resources)
    where = dict(
        searched=config.get("search", {}),
        node_id=ray.get_runtime_context().get_node_id(),
        host=platform.node(),
        started_at=started_at,
        resources=resources,
    )
    try:
        if not run.spec.is_file():
            raise UserError(
                f"{run}: the run directory is not on this node ({platform.node()}); a cluster's run "
                "directories must be on storage every node shares (RAYSWEEP_RUNS_DIR, --results)"
            )
        result = run_trial(
            cfg,
            on_epoch=on_epoch,
            resume=resume,
            gpu_share=resources.get("GPU", 0.0) if ray.get_gpu_ids() else 0.0,
            on_step=StepProgress(run, key),
        )
    except UserError as exc:  # settings, data or a node that cannot train: no retry would help
        run.write_record(failed_record(cfg, key, stage, str(exc), **where, finished_at=time.time()))
        run.progress_file(key).unlink(missing_ok=True)
        state_path.unlink(missing_ok=True)
        tune.report(
            {"epoch": getattr(exc, "epoch", 0), "best_ndcg@10": 0.0, "finished": True, "failed": str(exc)}
        )
        return
    record = finished_record(
        result.summary(),
        key,
        stage,
        **where,
        finished_at=time.time(),
        resumed_from_epoch=resume["epoch"] if resume is not None else None,
    )
    run.write_record(record, result)
    run.progress_file(key).unlink(missing_ok=True)
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
