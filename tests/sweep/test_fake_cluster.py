"""Clusters on this machine, started and stopped by the test itself (only their own processes):
cluster.yaml's autoscaling cluster on Ray's fake multi-node provider, and a two-node cluster
whose second node cannot see the run directory."""

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, load_benchmark

pytestmark = [pytest.mark.sweep, pytest.mark.long]


def test_the_smoke_sweep_on_an_autoscaling_fake_cluster(tmp_path):
    """--address auto joins it, the autoscaler starts GPU workers from zero, trials run on them
    with their GPU shares, records land in the run directory, the stop leaves nothing."""
    pytest.importorskip("ray")
    fake_cluster = load_benchmark("fake_cluster")
    assert fake_cluster.main(["--keep", str(tmp_path)]) == 0, (tmp_path / "fake_cluster.log").read_text()

    log = (tmp_path / "fake_cluster.log").read_text()
    assert "autoscaler: NodeLauncher" in log and "type gpu_worker" in log
    assert "stopped: 0 of the cluster's processes still running" in log
    trials = (tmp_path / "runs" / "smoke-cluster").glob("trials/*/result.json")
    records = [json.loads(p.read_text()) for p in trials]
    assert records and all(r["status"] == "ok" for r in records)
    workers = {r["node_id"] for r in records}
    assert all(n.startswith("f" * 51) and not n.endswith("00000") for n in workers)  # not the head
    shares = {r["resources"].get("GPU", 0.0) for r in records if r["config"]["model"] != "bpr"}
    assert shares == {0.25}


def _private_mounts() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


def test_a_node_blind_to_the_run_directory_stops_the_sweep_before_any_trial(tmp_path):
    """The second node runs in its own mount namespace with an empty file system mounted where
    the run directory is: the node is up, but cannot see what the driver writes."""
    pytest.importorskip("ray")
    if not _private_mounts():
        pytest.skip("needs a private mount namespace (unshare -m, as root)")
    fake_cluster = load_benchmark("fake_cluster")
    shared = tmp_path / "shared"
    shared.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="rsfc-", dir="/tmp"))
    port = fake_cluster.free_port()
    env = fake_cluster.cluster_env(ray_tmp, ray_tmp.name)
    try:
        fake_cluster.start_head(port, ray_tmp, env, "--num-cpus=1")
        blind = ("unshare", "-m", "sh", "-c", f'mount -t tmpfs none "{shared}" && exec "$0" "$@"')
        fake_cluster.join_node(port, env, prefix=blind)
        run = shared / "runs" / "smoke"
        proc = fake_cluster.run_driver(ROOT / "sweeps" / "smoke.yaml", run, port, env)
    finally:
        survivors = fake_cluster.stop(ray_tmp.name, print)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert survivors == []
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        f"error: {run}: not on storage every node shares (node 127.0.0.1 cannot see it); put run "
        "directories on a shared file system (RAYSWEEP_RUNS_DIR, or --results)"
    )
    assert not list(run.glob("trials/*")) and not (run / "plan.json").exists()
