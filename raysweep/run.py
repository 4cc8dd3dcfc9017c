"""The sweep driver: `python -m raysweep.run SWEEP.yaml [--address ADDR] [--resume] [--dry-run]`.

Validates the sweep file and every trial before Ray starts, then runs the sweep as stages,
each its own Tuner under the run directory: one Optuna search stage per searched dataset x
model entry, then the seeds stage (every grid trial, searched entries at their best
setting). Without an address it starts a local single-node Ray (every CPU and GPU here,
the dashboard on 127.0.0.1); with `--address auto` / RAY_ADDRESS it joins a cluster.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from raysweep.errors import UserError, cli
from raysweep.config import trial_key
from raysweep.sweep import SweepSpec, Trial, entry_trials, expand, load_spec
from raysweep.train import check_negatives, load_split
from raysweep.split import sequence_data


def check_trials(trials: list[Trial], where: str) -> None:
    """Load each dataset once (verifies and caches it) and check N against its negative pool."""
    datasets: dict[str, Any] = {}
    for trial in trials:
        cfg = trial.config
        if cfg.model == "bpr":
            continue
        if (cfg.dataset, cfg.max_len) not in datasets:
            datasets[cfg.dataset, cfg.max_len] = sequence_data(load_split(cfg), cfg.max_len)
        try:
            check_negatives(cfg, datasets[cfg.dataset, cfg.max_len])
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None


def trial_table(trials: list[Trial], gpus: float, cpus: float) -> str:
    lines = [f"{'stage':<24} {'dataset':<18} {'model':<16} {'seed':>4}  resources  key"]
    for t in trials:
        gpu = 0.0 if t.config.model == "bpr" else gpus
        lines.append(f"{t.stage:<24} {t.config.dataset:<18} {t.config.label:<16} {t.config.seed:>4}  "
                     f"{cpus:g} CPU {gpu:g} GPU  {t.key}")
    searches = {t.stage for t in trials if t.stage != "seeds"}
    lines.append(f"{len(trials)} trials ({len(searches)} search stages, each sampling more)")
    return "\n".join(lines)


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Only one driver per run directory: a second one is refused, not interleaved."""
    from filelock import FileLock, Timeout

    lock = FileLock(run_dir / ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"{run_dir}: another raysweep driver is running on this run directory") from None
    except OSError as exc:
        raise UserError(f"{run_dir}: results directory is not writable ({exc.strerror})") from None
    try:
        yield
    finally:
        lock.release()


def prepare_run_dir(run_dir: Path, spec_path: Path, resume: bool) -> None:
    """Make sure results can be written before any trial starts; refuse to mix two sweeps."""
    started = (run_dir / "spec.yaml").is_file()
    if started and not resume:
        raise UserError(f"{run_dir}: a sweep already ran here; pass --resume to finish it, or set another 'results'")
    if started and (run_dir / "spec.yaml").read_text() != spec_path.read_text():
        raise UserError(f"{run_dir}: the sweep file changed since this run started; resume with the same file")
    try:
        probe = run_dir / ".write-probe"
        probe.write_bytes(bytes(1 << 20))  # a full disk fails here, not in the middle of a trial
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{run_dir}: results directory is not writable ({exc.strerror})") from None
    if not started:
        shutil.copyfile(spec_path, run_dir / "spec.yaml")
    for leftover in [*run_dir.glob(".*.tmp"), *run_dir.glob("trials/*/.*.tmp")]:
        leftover.unlink()  # half-written files of a killed driver or trial; never renamed, never read


# Where run directories go when neither --results nor the sweep's `results` says (a cluster's
# shared file system: every node writes its trials' records there).
RUNS_ENV = "RAYSWEEP_RUNS_DIR"
# Ray's switch for a single-machine Ray (named for the platforms where it is the default).
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


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
        ray.init(address=address, log_to_driver=True)
        return False
    # address="local": a new single-node Ray even if another one runs on this machine.
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1")
    node_ip = ray.util.get_node_ip_address()
    print(f"[raysweep] local Ray on {node_ip}: dashboard at http://127.0.0.1:8265", flush=True)
    if node_ip != "127.0.0.1":
        print(f"[raysweep] warning: Ray's ports listen on {node_ip}, not only on 127.0.0.1 (ray was imported "
              f"before raysweep could set {LOOPBACK_SWITCH}=0, or it is set otherwise)", file=sys.stderr, flush=True)
    return True


def run_sweep(spec_path: Path, address: str | None = None, resume: bool = False, dry_run: bool = False,
              results: Path | None = None) -> Path:
    """Run (or resume) a sweep; returns its run directory."""
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    where = str(spec_path)
    trials = expand(spec, where)
    check_trials(trials, where)
    run_dir = Path(results or spec.results or Path(os.environ.get(RUNS_ENV, "runs")) / spec.name).resolve()
    if dry_run:
        print(f"sweep {spec.name}: results in {run_dir}")
        print(trial_table(trials, spec.resources.gpus, spec.resources.cpus))
        return run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{run_dir}: cannot create the results directory ({exc.strerror})") from None
    with run_lock(run_dir):
        prepare_run_dir(run_dir, spec_path, resume)
        if spec.description:
            print(f"[raysweep] {spec.name}: {spec.description.strip()}", flush=True)
        local = start_ray(address)
        print(f"[raysweep] {len(trials)} trials; TensorBoard: tensorboard --logdir {run_dir / 'tune'}", flush=True)
        _run_stages(spec, trials, run_dir, local, resume, where)
    from raysweep.report import write_report

    outputs = write_report(run_dir)
    print(f"[raysweep] results: {run_dir / 'results.parquet'}; report: {', '.join(str(p) for p in outputs)}")
    return run_dir


def _run_stages(spec: SweepSpec, trials: list[Trial], run_dir: Path, local: bool, resume: bool, where: str) -> None:
    import ray

    from raysweep.results import load_records, write_results

    resources = spec.resources
    if local and resources.gpus > 0 and not ray.cluster_resources().get("GPU"):
        print("[raysweep] notice: no GPU on this machine; trials run on the CPU instead of waiting for one",
              file=sys.stderr, flush=True)
        resources = resources.model_copy(update={"gpus": 0.0})
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for i, entry in enumerate(spec.models):
        if entry.search is None:
            continue
        for dataset in spec.datasets:
            if entry.datasets is not None and dataset not in entry.datasets:
                continue
            stage = f"search-{dataset}-{i}"
            [base] = [t for t in trials if t.stage == stage]  # a searched entry has one N
            _tune_stage(stage, run_dir, resume, spec, resources, search=(base, entry.search))
            records = [r for r in load_records(run_dir) if stage in r["stages"] and r["status"] == "ok"]
            if records:
                top = max(records, key=lambda r: r["val"]["ndcg@10"])
                best[dataset, i] = top["searched"]
                print(f"[raysweep] {stage}: best {top['searched']} (val NDCG@10 {top['val']['ndcg@10']:.4f})", flush=True)
    seeds = [t for t in trials if t.stage == "seeds"]
    for (dataset, i), searched in best.items():
        for seed in spec.seeds:
            for cfg in entry_trials(spec, i, dataset, seed, where, searched):
                seeds.append(Trial(cfg, "seeds", trial_key(cfg)))
    _tune_stage("seeds", run_dir, resume, spec, resources, grid=seeds)
    write_results(run_dir)


def _tune_stage(name: str, run_dir: Path, resume: bool, spec: SweepSpec, resources, grid: list[Trial] | None = None,
                search: tuple[Trial, Any] | None = None) -> None:
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from raysweep import tune as glue

    storage = run_dir / "tune"
    # num_to_keep=1 makes Tune snapshot its experiment state after each trial checkpoint, so a
    # resume never points at a deleted one; intended, and Tune's warning about those snapshots
    # would otherwise repeat every epoch of a short trial.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    trainable = tune.with_resources(glue.trainable, glue.resources_for(resources))
    callbacks = [glue.TrialLog(run_dir, name)]
    run_config = tune.RunConfig(
        name=name, storage_path=str(storage), verbose=0, callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=spec.max_retries),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
    )
    if resume and tune.Tuner.can_restore(storage / name):
        tuner = tune.Tuner.restore(str(storage / name), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, restart_errored=False)
    elif grid is not None:
        if not grid:
            return
        space = {"trial": tune.grid_search([t.config.to_dict() for t in grid]), "run_dir": str(run_dir),
                 "stage": name}
        tuner = tune.Tuner(trainable, param_space=space, run_config=run_config,
                           tune_config=tune.TuneConfig(trial_dirname_creator=_dirname))
    else:
        base, block = search
        fixed = {k: v for k, v in base.config.to_dict().items() if k not in block.space}
        space = {"trial": fixed, "search": glue.search_space(block.space), "run_dir": str(run_dir), "stage": name}
        tuner = tune.Tuner(trainable, param_space=space, run_config=run_config, tune_config=tune.TuneConfig(
            search_alg=OptunaSearch(metric="best_ndcg@10", mode="max", seed=block.seed),
            num_samples=block.samples, max_concurrent_trials=block.max_concurrent, trial_dirname_creator=_dirname))
    tuner.fit()


def _dirname(trial) -> str:
    from raysweep.tune import trial_config

    return f"{trial_key(trial_config(trial.config))}_{trial.trial_id}"


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raysweep.run", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path, help="a sweep file, e.g. sweeps/quickstart.yaml")
    parser.add_argument("--address", default=None, help="join a running Ray cluster ('auto', or host:port)")
    parser.add_argument("--resume", action="store_true", help="finish an interrupted sweep in its run directory")
    parser.add_argument("--dry-run", action="store_true", help="print the trial table and exit")
    parser.add_argument("--results", type=Path, default=None,
                        help="run directory (default: the sweep's 'results', else $RAYSWEEP_RUNS_DIR/NAME or runs/NAME)")
    args = parser.parse_args(argv)
    run_sweep(args.sweep, args.address, args.resume, args.dry_run, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
