"""The sweep driver: `python -m raysweep.run SWEEP.yaml [--address ADDR] [--resume] [--dry-run]`.

Validates the sweep file and every trial before Ray starts, then runs the sweep as stages,
each its own Tuner under the run directory: one Optuna search stage per searched dataset x
model entry, then the seeds stage (every grid trial, searched entries at their best
setting). Without an address it starts a local single-node Ray (every CPU and GPU here,
the dashboard on 127.0.0.1); with `--address auto` / RAY_ADDRESS it joins a cluster.

Ctrl-C (SIGINT) or SIGTERM stops the running stage as Tune stops (trials stopped, the
experiment state saved), writes what finished, says the sweep is incomplete and how to resume
it, and exits 130 (SIGINT) or 143 (SIGTERM). A sweep with failed trials exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from raysweep import faults
from raysweep.atomic import atomic_write
from raysweep.config import dataset_tag, trial_key
from raysweep.devices import resolve_device
from raysweep.errors import UserError, cli
from raysweep.interrupts import Interrupted, Stop
from raysweep.results import load_records, read_plan, read_record, write_plan
from raysweep.rundir import check_run_dir, run_lock
from raysweep.split import sequence_data
from raysweep.sweep import (
    SweepSpec,
    Trial,
    entry_datasets,
    entry_seeds,
    entry_trials,
    expand,
    load_spec,
    stage_name,
)
from raysweep.trial import check_fits, check_negatives, load_split


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
            if cfg.model == "bpr":
                continue
            if (cfg.dataset, cfg.max_len) not in datasets:
                datasets[cfg.dataset, cfg.max_len] = sequence_data(splits[cfg.dataset], cfg.max_len)
            check_negatives(cfg, datasets[cfg.dataset, cfg.max_len])
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    return {name: split.sha256() for name, split in splits.items()}


def check_resources(resources, where: str, local: bool) -> None:
    """A trial's request that no node could ever grant waits forever: refused. In local mode the
    one node is this machine."""
    if not local:
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if resources.cpus > cpus:
        raise UserError(
            f"{where}: resources.cpus: each trial asks for {resources.cpus:g} CPUs and this machine has "
            f"{cpus}, so no trial could ever start; ask for {cpus} or fewer"
        )


def check_same_data(plan: dict[str, Any] | None, hashes: dict[str, str], run_dir: Path) -> None:
    """A resumed run trains on the data it started with: a dataset whose content changed since
    is refused, so a report never mixes trials of two versions of a file."""
    for name, digest in (plan or {}).get("data", {}).items():
        if name in hashes and hashes[name] != digest:
            raise UserError(
                f"{run_dir}: dataset {name} changed since this run started (its interactions now hash to "
                f"{hashes[name][:12]}, the run's to {digest[:12]}); resume with the data it started with, "
                "or start a new run"
            )


def trial_table(trials: list[Trial], gpus: float, cpus: float) -> str:
    lines = [f"{'stage':<24} {'dataset':<18} {'model':<24} {'seed':>4}  resources  key"]
    for t in trials:
        gpu = 0.0 if t.config.model == "bpr" else gpus
        lines.append(
            f"{t.stage:<24} {t.config.dataset:<18} {t.config.label:<24} {t.config.seed:>4}  "
            f"{cpus:g} CPU {gpu:g} GPU  {t.key}"
        )
    searches = {t.stage for t in trials if t.stage != "seeds"}
    lines.append(f"{len(trials)} trials ({len(searches)} search stages, each sampling more)")
    return "\n".join(lines)


def prepare_run_dir(run_dir: Path, spec_path: Path, resume: bool) -> bool:
    """Make sure results can be written before any trial starts; refuse to mix two sweeps.
    True if this call started the run directory (wrote its spec.yaml)."""
    started = (run_dir / "spec.yaml").is_file()
    if started and not resume:
        raise UserError(
            f"{run_dir}: a sweep already ran here; pass --resume to finish it, or set another 'results'"
        )
    if started and (run_dir / "spec.yaml").read_bytes() != spec_path.read_bytes():
        raise UserError(
            f"{run_dir}: the sweep file changed since this run started; resume with the same file"
        )
    try:
        probe = run_dir / ".write-probe"
        probe.write_bytes(bytes(1 << 20))  # a full disk fails here, not in the middle of a trial
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{run_dir}: results directory is not writable ({exc.strerror})") from None
    if not started:
        atomic_write(run_dir / "spec.yaml", lambda tmp: shutil.copyfile(spec_path, tmp))
    for leftover in [*run_dir.glob(".*.tmp"), *run_dir.glob("trials/*/.*.tmp")]:
        leftover.unlink()  # half-written files of a killed driver or trial; never renamed, never read
    return not started


# Where run directories go when neither --results nor the sweep's `results` says (a cluster's
# shared file system: every node writes its trials' records there).
RUNS_ENV = "RAYSWEEP_RUNS_DIR"
# Ray's switch for a single-machine Ray (named for the platforms where it is the default).
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def check_address(address: str | None) -> None:
    """A cluster address given as host:port must answer before anything is written: Ray itself
    retries an unreachable one for minutes."""
    if not address or address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address}: expected host:port, 'auto' or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise UserError(
            f"--address {address}: no Ray cluster answers there ({exc.strerror or exc})"
        ) from None


@contextlib.contextmanager
def loopback_only():
    """The environment Ray's processes start with in local mode: nothing they send leaves this
    machine. Ray's dashboard process loads its usage-stats module even without the dashboard, and
    that module asks the cloud metadata addresses (169.254.169.254, metadata.google.internal)
    which cloud it runs on whenever ~/ray_bootstrap_config.yaml is absent, whatever
    RAY_USAGE_STATS_ENABLED says; no Ray setting turns that off. Those requests go through an
    HTTP proxy when one is set, so Ray's processes get a proxy on a closed port of this machine:
    the requests fail at once, without a DNS lookup or a packet beyond loopback. Loopback
    addresses bypass it. The driver's own environment is restored after the start."""
    with socket.socket() as probe:  # a port nothing listens on: bound, then released
        probe.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{probe.getsockname()[1]}"
    env = {
        "http_proxy": proxy,
        "https_proxy": proxy,
        "no_proxy": "127.0.0.1,localhost,::1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env |= {k.upper(): v for k, v in env.items() if k.endswith("proxy")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_ray(address: str | None) -> bool:
    """Join a cluster, or start a local single-node Ray bound to 127.0.0.1. True if local."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address and "ray" not in sys.modules:
        # Ray binds its gRPC servers (GCS, raylet, workers, agents) to the node's address, and
        # on Linux it never takes the loopback address as a node's, even when asked to. Its own
        # single-machine switch (read when ray is imported, inherited by every Ray process)
        # makes the node address 127.0.0.1, so a local sweep opens no port beyond this machine.
        os.environ.setdefault(LOOPBACK_SWITCH, "0")
    import ray

    if ray.is_initialized():  # a caller (a notebook, the tests) already chose the cluster
        return False
    if address:
        check_address(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError) as exc:
            raise UserError(
                f"--address {address}: cannot join that Ray cluster ({str(exc).splitlines()[0]})"
            ) from None
        return False
    # address="local": a new single-node Ray even if another one runs on this machine.
    with loopback_only():
        context = ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1")
    node_ip = ray.util.get_node_ip_address()
    print(f"[raysweep] local Ray on {node_ip}: dashboard at http://{context.dashboard_url}", flush=True)
    if node_ip != "127.0.0.1":
        print(
            f"[raysweep] warning: Ray's ports listen on {node_ip}, not only on 127.0.0.1 (ray was imported "
            f"before raysweep could set {LOOPBACK_SWITCH}=0, or it is set otherwise)",
            file=sys.stderr,
            flush=True,
        )
    return True


class _TuneAdvice(logging.Filter):
    """Tune's own lines on an interrupted run: its advice (Tuner.restore) points away from
    --resume, and it lists every trial not yet started, one line each, as 'Failed to fetch'."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(
            text in message
            for text in ("Resume experiment with", "Stop signal received", "Failed to fetch metrics")
        )


def restricted(spec: SweepSpec, datasets: list[str] | None, where: str) -> SweepSpec:
    """The sweep on some of its datasets only (its run directory is then named for them)."""
    if not datasets:
        return spec
    absolute = [d if d in spec.datasets else str(Path(d).absolute()) for d in datasets]
    unknown = [d for d, a in zip(datasets, absolute) if a not in spec.datasets]
    if unknown:
        raise UserError(
            f"{where}: --datasets {unknown[0]} is not one of the sweep's datasets {spec.datasets}"
        )
    return spec.model_copy(
        update={"datasets": absolute, "overrides": {d: v for d, v in spec.overrides.items() if d in absolute}}
    )


def run_sweep(
    spec_path: Path,
    address: str | None = None,
    resume: bool = False,
    dry_run: bool = False,
    results: Path | None = None,
    mlflow: bool = False,
    datasets: list[str] | None = None,
) -> Path:
    """Run (or resume) a sweep, on `datasets` of its datasets if given; returns its run
    directory. Raises `Interrupted` after a signal, once what finished is saved and reported.
    `mlflow`: track it with MLflow (`tracking`)."""
    spec_path = Path(spec_path)
    where = str(spec_path)
    spec = restricted(load_spec(spec_path), datasets, where)
    if mlflow:
        spec = spec.model_copy(update={"tracking": "mlflow"})
    if spec.tracking == "mlflow":
        from raysweep import tracking

        tracking.check_installed(where)
    trials = expand(spec, where)
    name = spec.name if not datasets else "-".join([spec.name, *(dataset_tag(d) for d in spec.datasets)])
    run_dir = check_run_dir(Path(results or spec.results or Path(os.environ.get(RUNS_ENV, "runs")) / name))
    local = not (address or os.environ.get("RAY_ADDRESS"))
    check_resources(spec.resources, where, local)
    previous = None
    if resume:  # every record, and the plan, must be readable before Ray starts
        load_records(run_dir)
        previous = read_plan(run_dir)
    hashes = check_trials(trials, where, local)
    check_same_data(previous, hashes, run_dir)
    if dry_run:
        print(f"sweep {spec.name}: results in {run_dir}")
        print(trial_table(trials, spec.resources.gpus, spec.resources.cpus))
        return run_dir
    check_address(address or os.environ.get("RAY_ADDRESS"))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{run_dir}: cannot create the results directory ({exc.strerror})") from None
    stop = Stop()
    with run_lock(run_dir), stop.installed():
        fresh = prepare_run_dir(run_dir, spec_path, resume)
        plan = first_plan(spec, trials, hashes, previous)
        write_plan(run_dir, plan)  # from here on, the report can say what is missing
        if spec.description:
            print(f"[raysweep] {spec.name}: {spec.description.strip()}", flush=True)
        try:
            local = start_ray(address)
        except BaseException:
            if fresh:  # nothing half-started is left behind
                (run_dir / "spec.yaml").unlink(missing_ok=True)
                (run_dir / "plan.json").unlink(missing_ok=True)
            raise
        stop.reinstall()  # ray.init puts its own SIGTERM handler in place of ours
        print(
            f"[raysweep] {len(trials)} trials; TensorBoard (pip install tensorboard): "
            f"tensorboard --logdir {run_dir / 'tune'}",
            flush=True,
        )
        try:
            _run_stages(spec, trials, plan, run_dir, local, resume, where, stop)
        except Interrupted:
            _finish(spec, run_dir)
            raise
    _finish(spec, run_dir)
    return run_dir


def _finish(spec: SweepSpec, run_dir: Path) -> None:
    from raysweep.report import write_report
    from raysweep.results import write_results

    write_results(run_dir)
    outputs = write_report(run_dir)
    print(
        f"[raysweep] results: {run_dir / 'results.parquet'}; report: {run_dir / 'report' / 'index.html'} "
        f"({len(outputs)} files)",
        flush=True,
    )
    if spec.tracking == "mlflow":
        from raysweep import tracking

        tracking.log_report(run_dir, spec.name)
        print(f"[raysweep] MLflow: mlflow ui --backend-store-uri {tracking.store(run_dir)}", flush=True)


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


def _run_stages(
    spec: SweepSpec,
    trials: list[Trial],
    plan: dict[str, Any],
    run_dir: Path,
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
            run_dir,
            resume,
            spec,
            resources,
            search=(base, spec.models[i].search),
            finished=finished,
        )
        faults.driver_point("search-end")
        stop.check()
        records = [r for r in load_records(run_dir) if stage in r.stages and r.ok]
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
        write_plan(run_dir, plan)
    stop.check()
    # The seeds stage's Tune experiment is named for its grid: a resume restores it only when the
    # searches chose what they chose before; a new grid runs as a new experiment (finished trials
    # return at once from their records).
    grid_id = hashlib.sha1(" ".join(sorted(t.key for t in seeds)).encode()).hexdigest()[:8]
    _tune_stage("seeds", f"seeds-{grid_id}", run_dir, resume, spec, resources, grid=seeds)
    faults.driver_point("seeds-end")
    if all(read_record(run_dir, t.key) is not None for t in seeds):
        plan["complete"] = True  # a signal that comes after the last trial interrupted nothing
        write_plan(run_dir, plan)
        return
    stop.check()


def _tune_stage(
    stage: str,
    experiment: str,
    run_dir: Path,
    resume: bool,
    spec: SweepSpec,
    resources,
    grid: list[Trial] | None = None,
    search: tuple[Trial, Any] | None = None,
    finished: bool = False,
) -> None:
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from raysweep import tracking
    from raysweep import trainable as glue

    storage = run_dir / "tune"
    # Tune's own terminal output: raysweep prints its own lines, and Tune's TensorBoard hint
    # points at a temporary folder, not at the run directory.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in ("ray.tune.tune", "ray.tune.analysis.experiment_analysis"):
        logging.getLogger(name).addFilter(_TuneAdvice())
    trainable = tune.with_resources(glue.trainable, glue.resources_for(resources))
    callbacks = [glue.TrialLog(run_dir, stage)]
    if spec.tracking == "mlflow":
        callbacks.append(tracking.callback(run_dir, spec.name))
    run_config = tune.RunConfig(
        name=experiment,
        storage_path=str(storage),
        verbose=0,
        callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=spec.max_retries),
    )
    if resume and tune.Tuner.can_restore(storage / experiment) and _whole_tune_state(storage / experiment):
        tuner = tune.Tuner.restore(
            str(storage / experiment),
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            restart_errored=False,
        )
    elif search is not None and finished:
        # A run carried from another machine (raysweep.archive): its records are the search.
        print(f"[raysweep] {stage}: finished before; its best setting is read from the records", flush=True)
        return
    elif grid is not None:
        if not grid:
            return
        space = {
            "trial": tune.grid_search([t.config.to_dict() for t in grid]),
            "run_dir": str(run_dir),
            "stage": stage,
        }
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            run_config=run_config,
            tune_config=tune.TuneConfig(trial_dirname_creator=_dirname),
        )
    else:
        base, block = search
        fixed = {k: v for k, v in base.config.to_dict().items() if k not in block.space}
        space = {
            "trial": fixed,
            "search": glue.search_space(block.space),
            "run_dir": str(run_dir),
            "stage": stage,
        }
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            run_config=run_config,
            tune_config=tune.TuneConfig(
                search_alg=OptunaSearch(metric="best_ndcg@10", mode="max", seed=block.seed),
                num_samples=block.samples,
                max_concurrent_trials=block.max_concurrent,
                trial_dirname_creator=_dirname,
            ),
        )
    with contextlib.nullcontext() if spec.tracking == "mlflow" else tracking.left_out():
        tuner.fit()


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
    from raysweep.trainable import trial_config

    return f"{trial_key(trial_config(trial.config))}_{trial.trial_id}"


def _resume_command(args: argparse.Namespace) -> str:
    parts = ["python -m raysweep.run", str(args.sweep), "--resume"]
    if args.datasets:
        parts += ["--datasets", *args.datasets]
    if args.results:
        parts += ["--results", str(args.results)]
    if args.address:
        parts += ["--address", args.address]
    if args.mlflow:
        parts.append("--mlflow")
    return " ".join(parts)


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raysweep.run", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path, help="a sweep file, e.g. sweeps/quickstart.yaml")
    parser.add_argument("--address", default=None, help="join a running Ray cluster ('auto', or host:port)")
    parser.add_argument(
        "--resume", action="store_true", help="finish an interrupted sweep in its run directory"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the trial table and exit")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="run directory (default: the sweep's 'results', else $RAYSWEEP_RUNS_DIR/NAME or runs/NAME)",
    )
    parser.add_argument(
        "--mlflow", action="store_true", help="track every trial with MLflow (tracking: mlflow)"
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        metavar="DATASET",
        help="run the sweep on these of its datasets only (run directory NAME-DATASET...)",
    )
    args = parser.parse_args(argv)
    try:
        run_dir = run_sweep(
            args.sweep, args.address, args.resume, args.dry_run, args.results, args.mlflow, args.datasets
        )
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        print(
            f"[raysweep] INTERRUPTED ({signal.Signals(signum).name}): the sweep is incomplete; what "
            f"finished is saved. Resume with: {_resume_command(args)}",
            file=sys.stderr,
            flush=True,
        )
        return 128 + signum
    if args.dry_run:
        return 0
    from raysweep.results import read_results

    results = read_results(run_dir)
    failed = int(((results["status"] != "ok") & results["in_table2"]).sum()) if len(results) else 0
    if failed:  # (a search's failed samples are part of searching: they lose, and the sweep goes on)
        print(
            f"[raysweep] {failed} trial(s) of Table 2 failed: see {run_dir / 'report' / 'table2.md'}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
