"""A sweep's stages on Ray Tune: one Optuna search stage per searched dataset x model entry,
then the seeds stage (every grid trial, searched entries at their best setting), each its own
Tuner under the run directory. Before any of it: every trial checked against its data, and the
plan (`records.check_plan`) made, so the report can always say what is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import sys
from pathlib import Path
from typing import Any

from raysweep.core.config import trial_key
from raysweep.core.devices import resolve_device
from raysweep.core.errors import UserError
from raysweep.core.split import sequence_data
from raysweep.core.trial import check_fits, check_negatives, load_split
from raysweep.sweep import faults
from raysweep.sweep.interrupts import Stop
from raysweep.sweep.records import TrialRecord
from raysweep.sweep.rundir import RunDir
from raysweep.sweep.spec import (
    SweepSpec,
    Trial,
    entry_datasets,
    entry_seeds,
    entry_trials,
    expand,
    stage_name,
)


def check_trials(trials: list[Trial], where: str, local: bool) -> dict[str, str]:
    """Load each dataset once (verifies and caches it); check that every trial has something to
    learn, fits its device (in local mode, where the trials run on this machine) and can draw its
    N negatives from the pool. Returns each dataset's content hash (`Split.sha256`)."""
    splits: dict[str, Any] = {}
    datasets: dict[tuple[str, int], Any] = {}
    for trial in trials:
        cfg = trial.config
        try:
            if cfg.dataset not in splits:
                splits[cfg.dataset] = load_split(cfg)
            check_fits(cfg, splits[cfg.dataset], resolve_device(cfg.device) if local else None)
            if cfg.is_bpr:
                continue
            if (cfg.dataset, cfg.max_len) not in datasets:
                datasets[cfg.dataset, cfg.max_len] = sequence_data(splits[cfg.dataset], cfg.max_len)
            check_negatives(cfg, datasets[cfg.dataset, cfg.max_len])
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    return {name: split.sha256() for name, split in splits.items()}


def check_same_data(plan: dict[str, Any] | None, hashes: dict[str, str], run: RunDir) -> None:
    """A resumed run trains on the data it started with: a dataset whose content changed since
    is refused, so a report never mixes trials of two versions of a file."""
    for name, digest in (plan or {}).get("data", {}).items():
        if name in hashes and hashes[name] != digest:
            raise UserError(
                f"{run}: dataset {name} changed since this run started (its interactions now hash to "
                f"{hashes[name][:12]}, the run's to {digest[:12]}); resume with the data it started with, "
                "or start a new run"
            )


def check_extension(before: SweepSpec, after: SweepSpec, trials: list[Trial], run: RunDir) -> tuple[int, int]:
    """`--extend`: the new sweep file (`after`, expanded into `trials`) keeps every trial and
    search of the run's sweep file as it was (same settings, same stage) and only adds to them:
    seeds, models, datasets. Returns how many Table 2 runs each file plans."""
    old, new = expand(before, str(run.spec)), {t.key: t for t in trials}
    for t in old:
        if t.key not in new or new[t.key].stage != t.stage:
            raise UserError(
                f"{run}: --extend: the new sweep file drops or changes this run's trial {t.key} "
                f"({t.config.label}, seed {t.config.seed}); --extend only adds trials to a run"
            )
    for i, dataset in _searches(before):
        kept = i < len(after.models) and after.models[i].search == before.models[i].search
        if not kept or not set(entry_seeds(before, i)) <= set(entry_seeds(after, i)):
            raise UserError(
                f"{run}: --extend: the new sweep file changes this run's search {stage_name(dataset, i)} "
                "(its space, samples, seeds or place in the list); --extend only adds trials to a run"
            )
    return _runs(before, old), _runs(after, trials)


def _runs(spec: SweepSpec, trials: list[Trial]) -> int:
    """A sweep's Table 2 runs: its grid trials, and each search's best setting at every seed."""
    grid = sum(t.stage == "seeds" for t in trials)
    return grid + sum(len(entry_seeds(spec, i)) for i, _ in _searches(spec))


def trial_table(spec: SweepSpec, trials: list[Trial], records: list[TrialRecord] | None = None) -> str:
    """The dry run's plan: one row per trial, a search stage's row saying how many samples it
    draws and which seeds its best setting then runs with; columns as wide as their values.
    With `records` (a resume's), a column says what finished before: a trial's status, a
    search's samples; --resume runs the rest."""
    rows, samples, best = [], 0, 0
    by_key = {r.key: r for r in records or []}
    for t in trials:
        gpu = 0.0 if t.config.is_bpr else spec.resources.gpus
        seeds = str(t.config.seed)
        before = by_key[t.key].status if t.key in by_key else ""
        if t.stage != "seeds":
            index = int(t.stage.rsplit("-", 1)[1])
            chosen, drawn = entry_seeds(spec, index), spec.models[index].search.samples
            samples += drawn
            best += len(chosen)
            seeds = f"{drawn} samples, then seeds {', '.join(map(str, chosen))}"
            before = f"{sum(t.stage in r.stages for r in records or [])} of {drawn} samples"
        resources = f"{spec.resources.cpus:g} CPU {gpu:g} GPU"
        rows.append((t.stage, t.config.dataset, t.config.label, seeds, resources, t.key, before))
    header = ("stage", "dataset", "model", "seeds", "resources", "key", "before")
    if records is None:
        header, rows = header[:-1], [r[:-1] for r in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    searches = sum(t.stage != "seeds" for t in trials)
    plain = len(trials) - searches
    summary = f"{plain + samples + best} trials at most: {plain} in the seeds stage"
    if searches:
        summary += (
            f", {samples} search samples in {searches} searches, then {best} runs of the best settings "
            "(a seed the best sample already ran is not run again)"
        )
    if records is not None:
        done = sum(t.stage == "seeds" and by_key.get(t.key) is not None and by_key[t.key].ok for t in trials)
        summary += f"; finished before: {done} of the {plain} in the seeds stage"
    return "\n".join([*lines, summary])


class _TuneAdvice(logging.Filter):
    """Tune's own lines on an interrupted run: its advice (Tuner.restore) points away from
    --resume, and it lists every trial not yet started, one line each, as 'Failed to fetch'."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(
            text in message
            for text in ("Resume experiment with", "Stop signal received", "Failed to fetch metrics")
        )


def _planned(trials: list[Trial]) -> list[dict[str, Any]]:
    return [
        {"key": t.key, "dataset": t.config.dataset, "label": t.config.label, "seed": t.config.seed}
        for t in trials
    ]


def _searches(spec: SweepSpec) -> list[tuple[int, str]]:
    return [
        (i, dataset)
        for i, entry in enumerate(spec.models)
        if entry.search is not None
        for dataset in entry_datasets(spec, i)
    ]


def first_plan(
    spec: SweepSpec, trials: list[Trial], hashes: dict[str, str], previous: dict[str, Any] | None
) -> dict[str, Any]:
    """plan.json as the sweep starts: every stage and the trials it runs (a search: how many it
    samples, and the seeds that wait for its best setting), each dataset's content hash, and
    whether the sweep is complete. A search that finished before stays finished."""
    stages: dict[str, dict[str, Any]] = {}
    for i, dataset in _searches(spec):
        [base] = [t for t in trials if t.stage == stage_name(dataset, i)]
        waiting = [
            {"dataset": dataset, "label": base.config.label, "seed": seed} for seed in entry_seeds(spec, i)
        ]
        stages[stage_name(dataset, i)] = {
            "kind": "search",
            "samples": spec.models[i].search.samples,
            "trials": [],
            "waiting": waiting,
        }
    stages["seeds"] = {"kind": "seeds", "trials": _planned([t for t in trials if t.stage == "seeds"])}
    for name, stage in ((previous or {}).get("stages") or {}).items():
        if stage.get("finished") and stages.get(name, {}).get("kind") == "search":
            stages[name]["finished"] = True
    return {"stages": stages, "data": {**(previous or {}).get("data", {}), **hashes}, "complete": False}


def run_stages(
    spec: SweepSpec,
    trials: list[Trial],
    plan: dict[str, Any],
    run: RunDir,
    local: bool,
    resume: bool,
    where: str,
    stop: Stop,
) -> None:
    import ray

    resources = spec.resources
    if local and resources.gpus > 0 and not ray.cluster_resources().get("GPU"):
        print(
            "[raysweep] notice: no GPU on this machine; trials run on the CPU instead of waiting for one",
            file=sys.stderr,
            flush=True,
        )
        resources = resources.model_copy(update={"gpus": 0.0})
    seeds = [t for t in trials if t.stage == "seeds"]
    for i, dataset in _searches(spec):
        stop.check()
        stage = stage_name(dataset, i)
        [base] = [t for t in trials if t.stage == stage]  # a searched entry has one N
        finished = plan["stages"][stage].get("finished", False)
        _tune_stage(
            stage,
            stage,
            run,
            resume,
            spec,
            resources,
            search=(base, spec.models[i].search),
            finished=finished,
        )
        faults.driver_point("search-end")
        stop.check()
        records = [r for r in run.load_records() if stage in r.stages and r.ok]
        if records:
            top = max(records, key=lambda r: r.val["ndcg@10"])
            print(
                f"[raysweep] {stage}: best {top.searched} (val NDCG@10 {top.val['ndcg@10']:.4f})", flush=True
            )
            for seed in entry_seeds(spec, i):
                for cfg in entry_trials(spec, i, dataset, seed, where, top.searched):
                    seeds.append(Trial(cfg, "seeds", trial_key(cfg)))
        plan["stages"][stage].update(finished=True, waiting=[])
        plan["stages"]["seeds"]["trials"] = _planned(seeds)
        run.write_plan(plan)
    stop.check()
    # The seeds stage's Tune experiment is named for its grid: a resume restores it only when the
    # searches chose what they chose before; a new grid runs as a new experiment (finished trials
    # return at once from their records).
    grid_id = hashlib.sha1(" ".join(sorted(t.key for t in seeds)).encode()).hexdigest()[:8]
    _tune_stage("seeds", f"seeds-{grid_id}", run, resume, spec, resources, grid=seeds)
    faults.driver_point("seeds-end")
    if all(run.read_record(t.key) is not None for t in seeds):
        plan["complete"] = True  # a signal that comes after the last trial interrupted nothing
        run.write_plan(plan)
        return
    stop.check()


def _tune_stage(
    stage: str,
    experiment: str,
    run: RunDir,
    resume: bool,
    spec: SweepSpec,
    resources,
    grid: list[Trial] | None = None,
    search: tuple[Trial, Any] | None = None,
    finished: bool = False,
) -> None:
    from ray import tune

    from raysweep.sweep import tracking
    from raysweep.sweep import trainable as glue
    from raysweep.sweep.trial_log import TrialLog

    storage = run.tune
    # Tune's own terminal output: raysweep prints its own lines, and Tune's TensorBoard hint
    # points at a temporary folder, not at the run directory.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in ("ray.tune.tune", "ray.tune.analysis.experiment_analysis"):
        logging.getLogger(name).addFilter(_TuneAdvice())
    trainable = tune.with_resources(glue.trainable, glue.resources_for(resources))
    callbacks = [TrialLog(run, stage)]
    if spec.tracking == "mlflow":
        callbacks.append(tracking.callback(run, spec.name))
    run_config = tune.RunConfig(
        name=experiment,
        storage_path=str(storage),
        verbose=0,
        callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=spec.max_retries),
    )
    tuner = None
    if resume and tune.Tuner.can_restore(storage / experiment) and _whole_tune_state(storage / experiment):
        tuner = _restore(tune, storage / experiment, trainable)
    if tuner is None:
        if search is not None and finished:
            # A run carried from another machine (raysweep.archive): its records are the search.
            print(
                f"[raysweep] {stage}: finished before; its best setting is read from the records", flush=True
            )
            return
        if grid is not None and not grid:
            return
        tuner = _new_tuner(trainable, run_config, run, stage, grid, search)
    with contextlib.nullcontext() if spec.tracking == "mlflow" else tracking.left_out():
        tuner.fit()


def _new_tuner(trainable, run_config, run: RunDir, stage: str, grid, search):
    """A stage from its start: the grid of trials, or the Optuna search over one entry's space."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from raysweep.sweep import trainable as glue

    where = {"run_dir": str(run.path), "stage": stage}
    if grid is not None:
        return tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([t.config.to_dict() for t in grid]), **where},
            run_config=run_config,
            tune_config=tune.TuneConfig(trial_dirname_creator=_dirname),
        )
    base, block = search
    fixed = {k: v for k, v in base.config.to_dict().items() if k not in block.space}
    return tune.Tuner(
        trainable,
        param_space={"trial": fixed, "search": glue.search_space(block.space), **where},
        run_config=run_config,
        tune_config=tune.TuneConfig(
            search_alg=OptunaSearch(metric="best_ndcg@10", mode="max", seed=block.seed),
            num_samples=block.samples,
            max_concurrent_trials=block.max_concurrent,
            trial_dirname_creator=_dirname,
        ),
    )


def _restore(tune, experiment: Path, trainable):
    """Tune's saved stage, or None where it cannot be read back: Tune pickles the stage with
    references to raysweep's modules, so state saved by another raysweep version may name modules
    that no longer exist. The stage then starts anew, as after a lost Tune state."""
    try:
        return tune.Tuner.restore(
            str(experiment),
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            restart_errored=False,
        )
    except (ImportError, AttributeError, pickle.UnpicklingError) as error:
        print(
            f"[raysweep] {experiment}: Tune's saved state cannot be read back by this raysweep "
            f"({type(error).__name__}: {error}); the stage starts anew from raysweep's records",
            flush=True,
        )
        return None


def _whole_tune_state(experiment: Path) -> bool:
    """Drop the experiment-state files a kill cut short (Tune rewrites them in place, so a driver
    killed mid-write leaves one empty, and Tune then cannot restore the stage); True if a whole one
    is left to restore. Without one the stage starts anew: raysweep's own records, not Tune's
    state, say which trials finished, and those return at once."""
    whole = False
    for state in sorted(experiment.glob("experiment_state-*.json")):
        try:
            json.loads(state.read_text(encoding="utf-8"))
            whole = True
        except (OSError, ValueError):
            print(f"[raysweep] {state}: cut short by a kill; not restoring from it", flush=True)
            state.unlink()
    return whole


def _dirname(trial) -> str:
    from raysweep.sweep.trainable import trial_config

    return f"{trial_key(trial_config(trial.config))}_{trial.trial_id}"
