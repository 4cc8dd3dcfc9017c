"""The sweep driver: `python -m raysweep.run SWEEP.yaml [--address ADDR] [--resume] [--dry-run]`.

Validates the sweep file and every trial before Ray starts, then runs the sweep as stages on
Ray Tune (`sweep.stages`): one Optuna search stage per searched dataset x model entry, then the
seeds stage. Without an address it starts a local single-node Ray (every GPU here and every CPU
unless --cpus says fewer, the dashboard on 127.0.0.1, nothing sent beyond this machine); with
`--address auto` / RAY_ADDRESS it joins a cluster. Run directories go under $RAYSWEEP_RUNS_DIR,
else runs/ in the current folder, unless the sweep's `results` or --results says otherwise.

`--extend` resumes with a sweep file that adds trials (more seeds, models, datasets) to the
run's own.

Ctrl-C (SIGINT) or SIGTERM stops the running stage as Tune stops (trials stopped, the
experiment state saved), writes what finished, says the sweep is incomplete and how to resume
it, and exits 130 (SIGINT) or 143 (SIGTERM). A sweep with failed trials exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from raysweep.core.config import dataset_tag
from raysweep.core.data import download_note, is_available
from raysweep.core.errors import UserError, cli
from raysweep.sweep import cluster, stages
from raysweep.sweep.interrupts import Interrupted, Stop
from raysweep.sweep.rundir import RunDir
from raysweep.sweep.spec import expand, load_spec, restricted

# Where run directories go when neither --results nor the sweep's `results` says (a cluster's
# shared file system: every node writes its trials' records there).
RUNS_ENV = "RAYSWEEP_RUNS_DIR"


def run_sweep(
    spec_path: Path,
    address: str | None = None,
    resume: bool = False,
    dry_run: bool = False,
    results: Path | None = None,
    mlflow: bool = False,
    datasets: list[str] | None = None,
    verbose: bool = False,
    cpus: int | None = None,
    extend: bool = False,
) -> Path:
    """Run (or resume) a sweep, on `datasets` of its datasets if given; returns its run
    directory. Raises `Interrupted` after a signal, once what finished is saved and reported.
    `mlflow`: track it with MLflow (`tracking`). `verbose`: the libraries' own log lines too.
    `cpus`: the CPUs a local Ray may use (all by default), e.g. to leave some to other work.
    `extend`: resume with a sweep file that adds trials to the run's (`stages.check_extension`)."""
    # 1. Read and check everything before anything is started or written.
    spec_path, where = Path(spec_path), str(spec_path)
    spec = restricted(load_spec(spec_path), datasets, where)
    if mlflow:
        spec = spec.model_copy(update={"tracking": "mlflow"})
    if spec.tracking == "mlflow":
        from raysweep.sweep import tracking

        tracking.check_installed(where)
    trials = expand(spec, where)
    name = spec.name if not datasets else "-".join([spec.name, *(dataset_tag(d) for d in spec.datasets)])
    run = RunDir.checked(results or spec.results or Path(os.environ.get(RUNS_ENV, "runs")) / name)
    local = cluster.is_local(address)
    cluster.check_resources(spec.resources, where, local, cpus)
    previous, records = None, None
    resume = resume or extend
    if extend:
        if not run.spec.is_file():
            raise UserError(f"{run}: --extend adds trials to a run, and no run started here; drop --extend")
        started = restricted(load_spec(run.spec), datasets, str(run.spec))
        before, now = stages.check_extension(started, spec, trials, run)
        print(f"[raysweep] {run}: --extend: {before} Table 2 runs planned before, {now} now", flush=True)
    if resume:  # every record, and the plan, must be readable before Ray starts
        records = run.load_records()
        previous = run.read_plan()
    # A dry run downloads nothing: it checks the trials whose data is here, names the rest.
    absent = (
        sorted({t.config.dataset for t in trials if not is_available(t.config.dataset)}) if dry_run else []
    )
    hashes = stages.check_trials([t for t in trials if t.config.dataset not in absent], where, local)
    stages.check_same_data(previous, hashes, run)
    if dry_run:
        print(f"sweep {spec.name}: results in {run}")
        print(stages.trial_table(spec, trials, records))
        for name in absent:
            print(f"not on this machine yet: {name} (a run {download_note(name)}; its trials are unchecked)")
        return run.path
    cluster.check_address(address or os.environ.get("RAY_ADDRESS"))
    # 2. Take the run directory, write the plan, start (or join) Ray.
    run.create()
    stop = Stop()
    with run.lock(), stop.installed():
        fresh = run.prepare(spec_path, resume, extend)
        plan = stages.first_plan(spec, trials, hashes, previous)
        run.write_plan(plan)  # from here on, the report can say what is missing
        if spec.description:
            print(f"[raysweep] {spec.name}: {spec.description.strip()}", flush=True)
        try:
            if not verbose:
                quiet_logs()
            local = cluster.start_ray(address, verbose, cpus)
            if not local:  # trials on other nodes write their records into the run directory
                cluster.check_shared(run.path)
        except BaseException:
            if fresh:  # nothing half-started is left behind
                run.forget_start()
            raise
        stop.reinstall()  # ray.init puts its own SIGTERM handler in place of ours
        print(
            f"[raysweep] {len(trials)} trials; TensorBoard (pip install tensorboard): "
            f"tensorboard --logdir {run.tune}",
            flush=True,
        )
        # 3. Run the stages, with the live page; 4. report what finished, interrupted or not.
        try:
            with live_page(run):
                stages.run_stages(spec, trials, plan, run, local, resume, where, stop)
        except Interrupted:
            finish(spec, run)
            raise
    finish(spec, run)
    return run.path


# Libraries' own lines that a normal run leaves out (--verbose shows them): Ray's and Tune's
# notices (the token-authentication warning, result-file writes), Optuna's "new study" lines,
# MLflow's and its database migrations' INFO lines. Errors still show.
QUIET = {
    "ray": logging.ERROR,
    "optuna": logging.WARNING,
    "mlflow": logging.WARNING,
    "alembic": logging.WARNING,
}


def quiet_logs() -> None:
    import optuna  # (Optuna sets its own level when it first logs: set it through Optuna)

    optuna.logging.set_verbosity(QUIET["optuna"])
    for name, level in QUIET.items():
        logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def live_page(run: RunDir):
    """The report rewritten as trials start and end (`trial_log.PROGRESS`), closed at the end."""
    from raysweep.report.live import LivePage
    from raysweep.sweep.trial_log import PROGRESS

    page = LivePage(run)
    PROGRESS.append(page.request)
    try:
        yield
    finally:
        PROGRESS.remove(page.request)
        page.close()


def finish(spec, run: RunDir) -> None:
    from raysweep.report.render import write_report

    run.write_results()
    outputs = write_report(run)
    print(
        f"[raysweep] results: {run.results_file}; report: {run.report / 'index.html'} ({len(outputs)} files)",
        flush=True,
    )
    if spec.tracking == "mlflow":
        from raysweep.sweep import tracking

        tracking.log_report(run, spec.name)
        print(f"[raysweep] MLflow: mlflow ui --backend-store-uri {run.mlflow_store}", flush=True)


def resume_command(args: argparse.Namespace) -> str:
    parts = ["python -m raysweep.run", str(args.sweep), "--resume"]
    if args.datasets:
        parts += ["--datasets", *args.datasets]
    if args.results:
        parts += ["--results", str(args.results)]
    if args.address:
        parts += ["--address", args.address]
    if args.cpus:
        parts += ["--cpus", str(args.cpus)]
    if args.mlflow:
        parts.append("--mlflow")
    return " ".join(parts)


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raysweep.run", description=__doc__.split("\n\n")[1])
    parser.add_argument("sweep", type=Path, help="a sweep file, e.g. sweeps/quickstart.yaml")
    parser.add_argument("--address", default=None, help="join a running Ray cluster ('auto', or host:port)")
    parser.add_argument(
        "--resume", action="store_true", help="finish an interrupted sweep in its run directory"
    )
    parser.add_argument(
        "--extend",
        action="store_true",
        help="resume with a changed sweep file that only adds trials (seeds, models, datasets) to the "
        "run; every trial it ran before must keep its settings",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the trial table and exit")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help=f"run directory (default: the sweep's 'results', else ${RUNS_ENV}/NAME, else runs/NAME in the "
        "current folder)",
    )
    parser.add_argument(
        "--mlflow", action="store_true", help="track every trial with MLflow (tracking: mlflow)"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show Ray's, Tune's, Optuna's and MLflow's own log lines too"
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        metavar="DATASET",
        help="run the sweep on these of its datasets only (run directory NAME-DATASET...)",
    )
    parser.add_argument(
        "--cpus",
        type=int,
        default=None,
        help="local mode: the CPUs the local Ray may use (default: all), e.g. to leave some to other "
        "work or to run two sweeps side by side",
    )
    args = parser.parse_args(argv)
    try:
        run_dir = run_sweep(
            args.sweep,
            args.address,
            args.resume,
            args.dry_run,
            args.results,
            args.mlflow,
            args.datasets,
            args.verbose,
            args.cpus,
            args.extend,
        )
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        print(
            f"[raysweep] INTERRUPTED ({signal.Signals(signum).name}): the sweep is incomplete; what "
            f"finished is saved. Resume with: {resume_command(args)}",
            file=sys.stderr,
            flush=True,
        )
        return 128 + signum
    if args.dry_run:
        return 0
    results = RunDir(run_dir).read_results()
    failed = int(((results["status"] != "ok") & results["in_table2"]).sum()) if len(results) else 0
    if failed:  # (a search's failed samples are part of searching: they lose, and the sweep goes on)
        print(
            f"[raysweep] {failed} trial(s) of Table 2 failed: see {RunDir(run_dir).report / 'table2.md'}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
