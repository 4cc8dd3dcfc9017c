"""Faults provoked on this machine: trials that die or raise, a lost node, a driver killed at
named points, a locked / unwritable / full results directory, the local network bindings."""

import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import NEEDS_RAY

from raysweep.core.errors import UserError
from raysweep.run import run_sweep
from raysweep.sweep.rundir import RunDir

pytestmark = pytest.mark.sweep

METRICS = ["test_hr@10", "test_ndcg@10", "test_hr@100", "test_ndcg@100", "best_epoch", "epochs"]


def _spec(tmp_path, text, name="s.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _tune_epochs(run_dir: Path, key: str) -> list[int]:
    """Every epoch a trial reported to Tune, across all its attempts, in order."""
    lines = []
    for result in (run_dir / "tune").rglob(f"{key}_*/result.json"):
        lines += [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
    return [r["epoch"] for r in sorted(lines, key=lambda r: r["timestamp"]) if not r.get("finished")]


KILLED_TRIAL = """
name: killed
datasets: [synthetic-chains]
settings: {max_epochs: 5, patience: 5, val_users: 200, hidden: 16, extra: {checkpoint_seconds: 0, EXTRA}}
models: [{model: sasrec, loss: ce}]
max_retries: 2
"""


def test_killed_trial_is_retried_from_its_saved_state(ray_cluster, tmp_path):
    straight = run_sweep(
        _spec(tmp_path, KILLED_TRIAL.replace(", EXTRA", ""), "a.yaml"), results=tmp_path / "a"
    )
    killed = run_sweep(
        _spec(tmp_path, KILLED_TRIAL.replace("EXTRA", "kill_at_epoch: 3"), "b.yaml"), results=tmp_path / "b"
    )
    [record] = RunDir(killed).load_records()
    assert record.ok and record.context["resumed_from_epoch"] == 2
    # The retry's first report is epoch 3 (after the state saved at epoch 2), not epoch 1.
    assert _tune_epochs(killed, record.key) == [1, 2, 3, 4, 5]
    # And it ends exactly where an uninterrupted run ends (CPU, same seed).
    a, b = pd.read_parquet(straight / "results.parquet"), pd.read_parquet(killed / "results.parquet")
    assert a[METRICS].to_dict("records") == b[METRICS].to_dict("records")


FAILING = """
name: failing
datasets: [synthetic-chains]
settings: {max_epochs: 3, val_users: 200, hidden: 16}
models:
  - {model: sasrec, loss: ce, settings: {extra: {raise_at_epoch: 2}}}
  - {model: gru4rec, loss: ce}
max_retries: 1
"""


def test_trial_that_keeps_failing_is_recorded_and_the_sweep_completes(ray_cluster, tmp_path):
    run_dir = run_sweep(_spec(tmp_path, FAILING), results=tmp_path / "run")
    results = pd.read_parquet(run_dir / "results.parquet").set_index("label")
    assert results.loc["GRU4Rec", "status"] == "ok"
    assert results.loc["SASRec+", "status"] == "failed"
    assert "injected failure at epoch 2" in results.loc["SASRec+", "error"]
    report = (run_dir / "report" / "table2.md").read_text()
    assert (
        "## Failed trials" in report
        and "SASRec+ seed 0 (seeds): RuntimeError: injected failure at epoch 2" in report
    )
    assert "| GRU4Rec |" in report
    assert report.startswith("**Sweep `failing`**\n\n**Budget**: max_epochs 3, val_users 200 (the paper's ")
    assert "Seeds 0; 1 CPU and 0 GPU per trial; 1 of 2 planned trials finished" in report
    # --resume runs the failed trial again (its failed record is not taken as finished) and
    # records the same failure once; the finished trial is not run again.
    failed_key = results.loc["SASRec+", "key"]
    starts_before = _tune_epochs(run_dir, failed_key).count(1)
    run_sweep(_spec(tmp_path, FAILING), results=tmp_path / "run", resume=True)
    assert _tune_epochs(run_dir, failed_key).count(1) > starts_before  # it trained again
    again = pd.read_parquet(run_dir / "results.parquet").set_index("label")
    assert len(again) == 2 and "injected failure at epoch 2" in again.loc["SASRec+", "error"]
    assert again.loc["GRU4Rec", "train_seconds"] == results.loc["GRU4Rec", "train_seconds"]


LOST_NODE = """
name: lost-node
datasets: [synthetic-chains]
settings: {max_epochs: 40, patience: 40, val_users: 200, hidden: 16, extra: {checkpoint_seconds: 0}}
models: [{model: sasrec, loss: sampled_ce, negatives: [5, 10, 15, 20]}]
resources: {cpus: 1}
max_retries: 3
"""


def test_lost_node_trials_move_to_the_head(ray_cluster, tmp_path):
    import ray

    cluster, _ = ray_cluster
    worker = list(cluster.worker_nodes)[-1]
    outcome = {}
    sweep = threading.Thread(
        target=lambda: outcome.update(run_dir=run_sweep(_spec(tmp_path, LOST_NODE), results=tmp_path / "run"))
    )
    started = time.time()
    sweep.start()
    try:
        # 4 one-CPU trials on 2 + 2 CPUs: once all four report, two of them run on the worker.
        while time.time() - started < 240:
            reporting = [p for p in (tmp_path / "run" / "tune").rglob("progress.csv") if p.stat().st_size > 0]
            if len(reporting) == 4:
                break
            time.sleep(0.5)
        assert len(reporting) == 4, "the four trials never ran at once"
        assert not list((tmp_path / "run" / "trials").glob("*/result.json")), "trials finished too early"
        cluster.remove_node(worker, allow_graceful=False)
        lost_at = time.time()
        sweep.join(timeout=600)
        recovered = time.time() - lost_at
    finally:
        cluster.add_node(num_cpus=2, resources={"worker_node": 2})  # the next tests want two nodes again
        cluster.wait_for_nodes()
    assert not sweep.is_alive()
    results = pd.read_parquet(outcome["run_dir"] / "results.parquet")
    assert len(results) == 4 and results["key"].is_unique and (results["status"] == "ok").all()
    assert worker.node_id not in set(results["node_id"])  # the trials that were there finished on the head
    print(f"lost node: sweep completed {recovered:.1f} s after the worker was removed")
    assert ray.is_initialized()


DRIVER = """
name: driver-kill
datasets: [synthetic-chains]
settings: {max_epochs: 3, patience: 3, val_users: 200, hidden: 16, extra: {checkpoint_seconds: 0}}
models:
  - {model: sasrec, loss: ce}
  - {model: gru4rec, loss: ce}
  - {model: sasrec, loss: bce}
resources: {cpus: 1}
"""


def _drive(spec, run_dir, address, *extra, kill_at=None):
    env = dict(os.environ)
    env.pop("RAYSWEEP_KILL_DRIVER_AT", None)
    if kill_at:
        env["RAYSWEEP_KILL_DRIVER_AT"] = kill_at
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "raysweep.run",
            str(spec),
            "--results",
            str(run_dir),
            "--address",
            address,
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    result = _drive(_spec(folder, DRIVER), folder / "run", ray_cluster[0].address)
    assert result.returncode == 0, result.stdout + result.stderr
    return pd.read_parquet(folder / "run" / "results.parquet").sort_values("key").reset_index(drop=True)


@pytest.mark.parametrize("point", ["first-report", "first-finish", "results-write"])
def test_driver_killed_then_resumed_matches_an_uninterrupted_sweep(
    ray_cluster, uninterrupted, tmp_path, point
):
    spec, run_dir, address = _spec(tmp_path, DRIVER), tmp_path / "run", ray_cluster[0].address
    killed = _drive(spec, run_dir, address, kill_at=point)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    finished_before = len(RunDir(run_dir).load_records())
    if point == "first-report":
        assert finished_before == 0
    started = time.time()
    resumed = _drive(spec, run_dir, address, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    print(
        f"driver killed at {point}: {finished_before} trials finished before, "
        f"resumed in {time.time() - started:.1f} s"
    )
    results = pd.read_parquet(run_dir / "results.parquet").sort_values("key").reset_index(drop=True)
    assert len(results) == 3 and results["key"].is_unique and (results["status"] == "ok").all()
    assert list(results["key"]) == list(uninterrupted["key"])
    assert results[METRICS].to_dict("records") == uninterrupted[METRICS].to_dict("records")
    assert not list(run_dir.rglob(".*.tmp"))


def test_second_driver_on_the_same_run_directory_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    spec = _spec(tmp_path, DRIVER)
    with RunDir(run_dir).lock():
        result = subprocess.run(
            [sys.executable, "-m", "raysweep.run", str(spec), "--results", str(run_dir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: {run_dir}: another raysweep process (a driver or an unpack) is using this run directory"
    )


def test_unwritable_results_directory_fails_before_any_trial(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "raysweep.run",
            str(_spec(tmp_path, DRIVER)),
            "--results",
            str(blocker / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {blocker / 'run'}: cannot create the results directory")


def test_full_results_directory_fails_before_any_trial(tmp_path, monkeypatch):
    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(UserError, match="results directory is not writable \\(No space left on device\\)"):
        RunDir(tmp_path).prepare(_spec(tmp_path, DRIVER), resume=False)
    assert not (tmp_path / "spec.yaml").exists()


def test_local_mode_listens_on_loopback_only_and_the_dashboard_needs_the_token(tmp_path):
    """A fresh local Ray as `raysweep.run` starts it, with Ray's default (token) auth: every
    port that Ray's processes (GCS, raylet, dashboard, agents, a worker) listen on is on 127.0.0.1."""
    pytest.importorskip("ray", reason=NEEDS_RAY)
    probe = """
import os, re, subprocess, time, urllib.request, urllib.error
from raysweep.sweep.cluster import start_ray
import contextlib, io
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    start_ray(None)
print(printed.getvalue(), end="")
os.environ["DASHBOARD"] = printed.getvalue().split("dashboard at ")[1].split()[0]
import ray
ray.get(ray.remote(lambda: 1).remote())  # a worker process with its own gRPC server
time.sleep(5)  # the agents open their ports after start-up
parents = {}
for stat in os.listdir("/proc"):
    if stat.isdigit():
        try:
            parents[int(stat)] = int(open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()[1])
        except OSError:
            pass
ours = {os.getpid()}
while True:
    more = {pid for pid, parent in parents.items() if parent in ours} - ours
    if not more:
        break
    ours |= more
for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines():
    pids = {int(p) for p in re.findall(r"pid=(\\d+)", line)}
    if pids & ours:
        print("LISTEN", line.split()[3], sorted(set(re.findall(r'"([^"]+)"', line))))
try:
    urllib.request.urlopen(os.environ["DASHBOARD"] + "/api/jobs/", timeout=10)
    print("STATUS 200")
except urllib.error.HTTPError as exc:
    print("STATUS", exc.code)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=180
    ).stdout
    listening = [line.split()[1:] for line in out.splitlines() if line.startswith("LISTEN")]
    processes = " ".join(line[1] for line in listening)
    dashboard = out.split("dashboard at http://")[1].split()[0]  # 8265, or the next free port
    assert dashboard.startswith("127.0.0.1:") and dashboard in [line[0] for line in listening], out
    for needed in ("gcs_server", "raylet", "DashboardA", "RuntimeEnv"):  # the servers Ray starts on a node
        assert needed in processes, out
    exposed = [
        line
        for line in listening
        if line[0].rsplit(":", 1)[0] not in ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]")
    ]
    assert not exposed, out
    assert "STATUS 401" in out or "STATUS 403" in out, out


def test_local_mode_says_so_when_ray_was_imported_too_early():
    """The loopback switch is read when ray is imported: a caller who imported ray first is told."""
    pytest.importorskip("ray", reason=NEEDS_RAY)
    probe = "import ray\nfrom raysweep.sweep.cluster import start_ray\nstart_ray(None)\nray.shutdown()\n"
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    }
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=180
    )
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if line.startswith("[raysweep] warning")]
    assert len(warning) == 1 and "not only on 127.0.0.1" in warning[0], result.stderr


STAGED = """
name: staged
datasets: [synthetic-chains]
seeds: [0, 1]
settings: {max_epochs: 3, patience: 3, val_users: 200, hidden: 16, extra: {checkpoint_seconds: 0}}
models:
  - {model: sasrec, loss: ce}
  - {model: gru4rec, loss: ce}
  - model: sasrec
    loss: bce
    search:
      samples: 3
      seed: 0
      space:
        lr: {choice: [0.005, 0.001, 1000000.0]}
resources: {cpus: 1}
"""
COMPARED = [
    "key",
    "label",
    "seed",
    "status",
    "in_table2",
    "test_hr@10",
    "test_ndcg@10",
    "best_epoch",
    "epochs",
]


@pytest.fixture(scope="module")
def staged_run(ray_cluster, tmp_path_factory):
    folder = tmp_path_factory.mktemp("staged")
    result = _drive(_spec(folder, STAGED), folder / "run", ray_cluster[0].address)
    assert result.returncode == 0, result.stdout + result.stderr
    return folder / "run"


@pytest.fixture(scope="module")
def staged_uninterrupted(staged_run):
    return pd.read_parquet(staged_run / "results.parquet").sort_values("key").reset_index(drop=True)


@pytest.mark.parametrize("stage", ["search", "seeds"])
def test_sigint_stops_the_sweep_and_resume_finishes_it(ray_cluster, staged_uninterrupted, tmp_path, stage):
    """Ctrl-C in a stage: the driver stops every stage, saves and reports what finished, says the
    sweep is incomplete and how to resume, exits 130; --resume then ends exactly where an
    uninterrupted sweep ends (a diverged search sample never wins)."""
    import signal as signals

    spec, run_dir, address = _spec(tmp_path, STAGED), tmp_path / "run", ray_cluster[0].address
    driver = subprocess.Popen(
        [sys.executable, "-m", "raysweep.run", str(spec), "--results", str(run_dir), "--address", address],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = []
    for line in driver.stdout:
        out.append(line)
        if line.startswith("[raysweep] start") and (
            stage in line if stage == "seeds" else "(search-" in line
        ):
            break
    driver.send_signal(signals.SIGINT)
    out.append(driver.stdout.read())
    output = "".join(out)
    assert driver.wait(timeout=300) == 130, output
    assert "INTERRUPTED (SIGINT): the sweep is incomplete" in output and "--resume" in output
    assert "Tuner.restore" not in output  # Tune's own advice would point away from --resume
    assert "Failed to fetch metrics" not in output  # nor a line for every trial not yet started
    report = (run_dir / "report" / "table2.md").read_text()
    assert "The sweep is incomplete" in report and "## Missing trials" in report
    if stage == "search":
        assert "(seeds)" not in output  # the seeds stage never started
    again = _drive(spec, run_dir, address)  # without --resume: refused, saying what to do
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1] == (
        f"error: {run_dir}: a sweep already ran here and did not finish; pass --resume to finish it, or "
        "give another run directory (--results DIR)"
    )
    resumed = _drive(spec, run_dir, address, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    final = pd.read_parquet(run_dir / "results.parquet").sort_values("key").reset_index(drop=True)
    # (NaN where a trial failed)
    pd.testing.assert_frame_equal(final[COMPARED], staged_uninterrupted[COMPARED])
    table2 = final[final["in_table2"]]
    assert (table2["status"] == "ok").all() and (table2[table2["label"] == "SASRec"]["lr"] < 1).all()
    assert "Missing trials" not in (run_dir / "report" / "table2.md").read_text()
    if stage == "seeds":
        finished = _drive(spec, run_dir, address)  # nothing left to do: it says so, and where to look
        assert finished.returncode == 2 and finished.stderr.strip().splitlines()[-1] == (
            f"error: {run_dir}: this sweep already finished here (its report: "
            f"{run_dir / 'report' / 'index.html'}); for a new run give another run directory (--results DIR)"
        )


def test_an_unpacked_archive_resumes_without_training_again(ray_cluster, staged_run, tmp_path, capsys):
    """A finished sweep packed, unpacked on "another machine" (no Tune state) and resumed: the
    search is not sampled again, no trial trains again, and the results are the same."""
    from raysweep.sweep import archive

    archive.pack(staged_run, tmp_path / "trials.parquet")
    before = {r.key: r.to_json() for r in RunDir(staged_run).load_records()}
    run_dir = tmp_path / "carried"
    assert archive.unpack(tmp_path / "trials.parquet", run_dir) == (len(before), 0)
    run_sweep(_spec(tmp_path, STAGED), resume=True, results=run_dir)
    out = capsys.readouterr().out
    assert "search-synthetic-chains-2: finished before; its best setting is read from the records" in out
    assert "(search-" not in out  # no search trial started
    assert {r.key: r.to_json() for r in RunDir(run_dir).load_records()} == before  # none trained or rewritten
    carried = pd.read_parquet(run_dir / "results.parquet").sort_values("key").reset_index(drop=True)
    original = pd.read_parquet(staged_run / "results.parquet").sort_values("key").reset_index(drop=True)
    pd.testing.assert_frame_equal(carried[COMPARED], original[COMPARED])


def test_extend_adds_seeds_to_a_finished_run_and_trains_only_them(ray_cluster, staged_run, tmp_path, capsys):
    """A finished sweep (carried by its archive) extended with a third seed: the search is not
    sampled again, no finished trial trains again, each model's seed 2 runs (the searched one
    at the search's best setting), and the run's sweep file is the new one."""
    from raysweep.sweep import archive

    archive.pack(staged_run, tmp_path / "trials.parquet")
    run_dir = tmp_path / "carried"
    archive.unpack(tmp_path / "trials.parquet", run_dir)
    before = {r.key: r.to_json() for r in RunDir(run_dir).load_records()}
    more = _spec(tmp_path, STAGED.replace("seeds: [0, 1]", "seeds: [0, 1, 2]"))
    run_sweep(more, extend=True, results=run_dir)
    out = capsys.readouterr().out
    assert "--extend: 6 Table 2 runs planned before, 9 now" in out
    assert "(search-" not in out
    after = {r.key: r for r in RunDir(run_dir).load_records()}
    assert {k: after[k].to_json() for k in before} == before  # none trained or rewritten
    added = [after[k] for k in after.keys() - before.keys()]
    assert sorted((r.label, r.config["seed"], r.status) for r in added) == [
        ("GRU4Rec", 2, "ok"),
        ("SASRec", 2, "ok"),
        ("SASRec+", 2, "ok"),
    ]
    search = [r for r in after.values() if "search-synthetic-chains-2" in r.stages and r.ok]
    [searched] = [r for r in added if r.label == "SASRec"]
    assert searched.config["lr"] == max(search, key=lambda r: r.val["ndcg@10"]).config["lr"]
    assert (run_dir / "spec.yaml").read_bytes() == more.read_bytes()
    assert json.loads((run_dir / "plan.json").read_text())["complete"] is True
