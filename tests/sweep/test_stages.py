"""The sweep driver on a real (two-node, local) Ray cluster: smoke end to end, fractional
GPUs, resume after the driver is SIGKILLed (also mid-way through Tune's state write), MLflow."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from raysweep.run import run_sweep
from raysweep.sweep.rundir import RunDir

pytestmark = pytest.mark.sweep

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_sweep_end_to_end(ray_cluster, tmp_path):
    run_dir = run_sweep(ROOT / "sweeps" / "smoke.yaml", results=tmp_path / "smoke")
    results = pd.read_parquet(run_dir / "results.parquet")
    assert (results["status"] == "ok").all()
    assert results["key"].is_unique
    # 6 grid trials + 2 BPR-MF search samples, the best of which is also the seed run.
    assert len(results) == 8 and results["in_table2"].sum() == 7
    assert {
        "test_hr@10",
        "test_hr@100",
        "test_ndcg@10",
        "test_ndcg@100",
        "best_epoch",
        "train_seconds",
        "node_id",
        "device",
        "precision",
    } <= set(results.columns)
    table = pd.read_csv(run_dir / "report" / "table2.csv")
    assert list(table["Model"]) == [
        "BPR-MF",
        "GRU4Rec",
        "BERT4Rec",
        "SASRec",
        "SASRec+",
        "SASRec+ 10",
        "SASRec+ 30",
    ]
    for name in ("HR@10", "HR@100", "NDCG@10", "NDCG@100", "Training time (s)", "Best epoch"):
        assert {name, f"{name} std", f"{name} paper"} <= set(table.columns)
    assert {"Peak memory (MB)", "Verdict"} <= set(table.columns)
    markdown = (run_dir / "report" / "table2.md").read_text()
    assert "## synthetic-chains" in markdown and "| Model | Seeds | HR@10 |" in markdown
    assert (run_dir / "report" / "index.html").read_text().count('class="dataframe table2"') == 1
    for figure in ("figure1.png", "figure2.png"):
        assert (run_dir / "report" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The planted pattern is learnt even in 3 epochs by SASRec (a sanity check of the plumbing).
    assert table.set_index("Model").loc["SASRec+", "NDCG@10"] > 0.5
    # Trials ran on both nodes of the cluster (a worker may have been replaced by a test before).
    assert results["node_id"].nunique() >= 2
    # Tune's TensorBoard logs are there for every trial.
    assert len(list((run_dir / "tune").rglob("events.out.tfevents.*"))) >= 8


SHARED_GPU = """
name: shared-gpu
datasets: [synthetic-chains]
settings: {max_epochs: 4, patience: 4, val_users: 200, hidden: 16, device: cpu}
models:
  - {model: sasrec, loss: sampled_ce, negatives: [5, 10, 20]}
resources: {cpus: 0.5, gpus: 0.5}
"""


def test_fractional_gpu_trials_share_one_logical_gpu(ray_cluster, tmp_path):
    spec = tmp_path / "shared-gpu.yaml"
    spec.write_text(SHARED_GPU)
    run_dir = run_sweep(spec, results=tmp_path / "run")
    records = RunDir(run_dir).load_records()
    assert len(records) == 3 and all(r.context["resources"]["GPU"] == 0.5 for r in records)
    # One logical GPU at 0.5 per trial: two run at once, never three.
    events = sorted(
        [(r.context["started_at"], 1) for r in records] + [(r.context["finished_at"], -1) for r in records]
    )
    running, most = 0, 0
    for _, change in events:
        running += change
        most = max(most, running)
    assert most == 2


def test_a_trial_given_a_gpu_runs_on_it_or_fails_at_once(ray_cluster, tmp_path, capsys):
    """Ray hands each trial a share of the head's logical GPU: with `device: auto` it must train on
    that GPU, never on the CPU while it holds the share; without a usable CUDA it fails at once,
    untrained and not retried, with one line naming the cause."""
    import torch

    spec = tmp_path / "gpu.yaml"
    spec.write_text(SHARED_GPU.replace(", device: cpu", "").replace("[5, 10, 20]", "[5]"))
    run_dir = run_sweep(spec, results=tmp_path / "run")
    assert "SASRec+ 5 seed 0 (seeds) on 0.5 of a GPU" in capsys.readouterr().out  # the start line
    [record] = RunDir(run_dir).load_records()
    if torch.cuda.is_available():  # (a machine with a CUDA GPU: the logical GPU is a real one)
        assert record.ok and record.device.startswith("cuda")
        return
    assert not record.ok and record.error.startswith("this trial was given a GPU, but "), record.error
    assert "CPU-only build" in record.error or "torch.cuda.is_available() is False" in record.error
    assert record.context.get("attempts") is None  # failed in the trial, not retried by Tune
    assert not (RunDir(run_dir).trial(record.key) / "history.parquet").exists()  # nothing trained
    report = (run_dir / "report" / "table2.md").read_text()
    assert "## Failed trials" in report and "this trial was given a GPU" in report


RESUMABLE = """
name: resumable
datasets: [synthetic-chains]
settings: {patience: 50, val_users: 200, hidden: 16, extra: {checkpoint_seconds: 0}}
models:
  - {model: sasrec, loss: ce, settings: {max_epochs: 1}}
  - {model: gru4rec, loss: ce, settings: {max_epochs: 1}}
  - {model: sasrec, loss: bce, settings: {max_epochs: 40}}
resources: {cpus: 1, gpus: 0}
"""


def _driver(spec, run_dir, address, *extra):
    return subprocess.Popen(
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
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _whole(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except ValueError:
        return False


def _kill_while_tune_state_is_whole(driver, run_dir):
    """SIGKILL the driver at a moment its Tune state is whole (Tune rewrites it in place; the kill
    mid-write is a later test's case)."""
    for _ in range(100):
        os.killpg(driver.pid, signal.SIGSTOP)
        states = list((run_dir / "tune").rglob("experiment_state-*.json"))
        if states and all(_whole(p) for p in states):
            break
        os.killpg(driver.pid, signal.SIGCONT)
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()


def _saved_epoch(run_dir: Path, pattern: str) -> int:
    """The epoch of the training state a running trial saved beside its record (0: none yet)."""
    for path in (run_dir / "trials").glob(f"{pattern}/state.pt"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)["epoch"]
        except (OSError, RuntimeError):  # renamed away between the glob and the load
            pass
    return 0


def _wait_for(driver, ready, seconds=240):
    deadline = time.time() + seconds
    while time.time() < deadline and driver.poll() is None and not ready():
        time.sleep(0.2)
    assert driver.poll() is None, driver.stdout.read()


def test_resume_after_sigkill(ray_cluster, tmp_path):
    cluster, _ = ray_cluster
    spec = tmp_path / "resumable.yaml"
    spec.write_text(RESUMABLE)
    run_dir = tmp_path / "run"
    driver = _driver(spec, run_dir, cluster.address)
    states = run_dir / "tune"

    def snapshot_taken():
        found = list(states.rglob("experiment_state-*.json"))
        return bool(found) and all(_whole(p) for p in found)

    # Tune's snapshot of the stage, taken once a trial has finished and the long one has saved epoch 3...
    _wait_for(driver, lambda: len(list((run_dir / "trials").glob("*/result.json"))) >= 1)
    _wait_for(driver, lambda: _saved_epoch(run_dir, "*bce*") >= 3 and snapshot_taken())
    old = {p: p.read_bytes() for p in states.rglob("experiment_state-*.json")}
    # ...is what a kill leaves when the trial has trained on since Tune last wrote it.
    _wait_for(driver, lambda: _saved_epoch(run_dir, "*bce*") >= 6)
    _kill_while_tune_state_is_whole(driver, run_dir)
    trained_to = _saved_epoch(run_dir, "*bce*")
    for state in states.rglob("experiment_state-*.json"):
        state.unlink()
    for path, text in old.items():
        path.write_bytes(text)
    killed_with = len(list((run_dir / "trials").glob("*/result.json")))
    assert 1 <= killed_with < 3

    again = _driver(spec, run_dir, cluster.address)
    assert again.wait(timeout=300) == 2  # without --resume a used run directory is refused
    resumed = _driver(spec, run_dir, cluster.address, "--resume")
    output = resumed.communicate(timeout=400)[0]
    assert resumed.returncode == 0, output
    results = pd.read_parquet(run_dir / "results.parquet")
    assert len(results) == 3 and results["key"].is_unique and (results["status"] == "ok").all()
    long_run = json.loads(next(p for p in (run_dir / "trials").glob("*bce*/result.json")).read_text())
    # The running trial continued from its newest state, not from Tune's older snapshot or epoch 1.
    assert long_run["resumed_from_epoch"] >= max(trained_to, 6) and long_run["epochs"] == 40
    assert not list((run_dir / "trials").glob("*/state.pt"))  # a finished trial keeps only its record


def test_resume_after_a_kill_cut_tunes_state_short(ray_cluster, tmp_path):
    cluster, _ = ray_cluster
    spec = tmp_path / "cut.yaml"
    spec.write_text(RESUMABLE.replace("max_epochs: 40", "max_epochs: 12"))
    run_dir = tmp_path / "run"
    driver = _driver(spec, run_dir, cluster.address)
    _wait_for(
        driver,
        lambda: list((run_dir / "trials").glob("*/result.json")) and _saved_epoch(run_dir, "*bce*") >= 1,
    )
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    states = list((run_dir / "tune").rglob("experiment_state-*.json"))
    assert states
    for state in states:  # what a kill in the middle of Tune's rewrite leaves
        state.write_text("")
    resumed = _driver(spec, run_dir, cluster.address, "--resume")
    output = resumed.communicate(timeout=400)[0]
    assert resumed.returncode == 0, output
    assert "cut short by a kill; not restoring from it" in output
    results = pd.read_parquet(run_dir / "results.parquet")
    assert len(results) == 3 and results["key"].is_unique and (results["status"] == "ok").all()


def test_resume_from_tune_state_another_raysweep_version_wrote(ray_cluster, tmp_path):
    """Tune pickles a stage with references to raysweep's modules; state from a version whose
    modules moved cannot be read back, and the stage starts anew from raysweep's records."""
    cluster, _ = ray_cluster
    spec = tmp_path / "moved.yaml"
    spec.write_text(RESUMABLE.replace("max_epochs: 40", "max_epochs: 12"))
    run_dir = tmp_path / "run"
    driver = _driver(spec, run_dir, cluster.address)
    _wait_for(driver, lambda: list((run_dir / "trials").glob("*/result.json")))
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    finished = {p.parent.name: p.read_bytes() for p in (run_dir / "trials").glob("*/result.json")}
    pickles = list((run_dir / "tune").rglob("tuner.pkl"))
    assert pickles
    for pickled in pickles:  # a class from a module this version does not have
        pickled.write_bytes(b"craysweep.moved_away\nSettings\n.")
    resumed = _driver(spec, run_dir, cluster.address, "--resume")
    output = resumed.communicate(timeout=400)[0]
    assert resumed.returncode == 0, output
    assert "cannot be read back by this raysweep (ModuleNotFoundError" in output
    results = pd.read_parquet(run_dir / "results.parquet")
    assert len(results) == 3 and results["key"].is_unique and (results["status"] == "ok").all()
    # What finished before the kill was not trained again.
    assert {k: (run_dir / "trials" / k / "result.json").read_bytes() for k in finished} == finished


TRACKED = """
name: tracked
datasets: [synthetic-chains]
settings: {max_epochs: 3, patience: 3, val_users: 200, hidden: 16}
models:
  - {model: sasrec, loss: ce}
  - {model: sasrec, loss: sampled_ce, negatives: [10]}
tracking: mlflow
resources: {cpus: 1}
"""


def test_mlflow_tracks_every_trial(ray_cluster, tmp_path):
    """Through Tune's MLflowLoggerCallback into RUN_DIR/mlflow.db, read back with MLflow's client:
    one run per trial (named by its key), its epochs' validation NDCG@10, its test metrics, and
    the report as the artifacts of a "report" run."""
    import mlflow

    spec = tmp_path / "tracked.yaml"
    spec.write_text(TRACKED)
    run_dir = run_sweep(spec, results=tmp_path / "run")
    results = pd.read_parquet(run_dir / "results.parquet").set_index("key")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tracked")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(results.index) | {"report"}
    for key, row in results.iterrows():
        run = runs[key]
        epochs = client.get_metric_history(run.info.run_id, "val_ndcg_at_10")
        assert [m.step for m in epochs][:3] == [1, 2, 3] and len(epochs) >= row["epochs"]
        assert run.data.metrics["test_ndcg_at_10"] == pytest.approx(row["test_ndcg@10"])
        assert run.data.params["loss"] == row["loss"] and run.data.tags["label"] == row["label"]
        # the trial's metrics only: no Ray bookkeeping, no settings as metrics
        names = set(run.data.metrics)
        assert {"loss", "train_seconds", "val_ndcg_at_10", "best_epoch", "test_hr_at_100"} <= names
        assert not names & {"pid", "timestamp", "done", "training_iteration", "time_this_iter_s", "finished"}
        assert not [n for n in names if n.startswith("config")], names
    artifacts = {a.path for a in client.list_artifacts(runs["report"].info.run_id)}
    assert {"table2.md", "index.html"} <= artifacts


def test_tracking_without_mlflow_is_one_line_before_any_trial(tmp_path):
    spec = tmp_path / "tracked.yaml"
    spec.write_text(TRACKED)
    probe = (
        "import sys, runpy; sys.modules['mlflow'] = None; "
        "sys.argv = ['raysweep.run', sys.argv[1], '--results', sys.argv[2]]; "
        "runpy.run_module('raysweep.run', run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(spec), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == (
        f'error: {spec}: tracking with MLflow needs the mlflow extra: pip install -e ".[mlflow]"'
    )
    assert not (tmp_path / "run").exists()


def test_every_node_of_the_cluster_sees_the_run_directory(ray_cluster, tmp_path):
    """The shared-storage check asks each live node (a task pinned to it) for a probe file written
    in the run directory: on this two-node cluster both see it, and no probe is left behind."""
    from raysweep.sweep.cluster import check_shared

    check_shared(tmp_path)
    assert list(tmp_path.iterdir()) == []
