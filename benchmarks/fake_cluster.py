"""The autoscaling cluster of `cluster.yaml`, tried on this machine: Ray's fake multi-node provider
(the one Ray's own autoscaler tests use; no cloud, no Docker) with `cluster.yaml`'s node types,
GPU workers scaling from zero with logical GPUs. The smoke sweep runs on it through
`python -m raysweep.run ... --address auto` as on a real cluster, with the cluster sweeps' GPU
share per trial; then the script checks that the autoscaler started workers, that the trials ran
on them with their GPU shares, that every record landed in the run directory, and that stopping the
cluster leaves none of its processes running.

    python benchmarks/fake_cluster.py [--keep DIR]

Ray's `AutoscalingCluster` helper starts and stops with `ray stop --force`, which kills every Ray
process on the machine; this harness starts its own head on its own port and temporary folder,
marks every process of its cluster with an environment variable they all inherit, and stops only
the processes that carry that mark. Exit 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raysweep.sweep.cluster import LOOPBACK_SWITCH, loopback_only  # noqa: E402

MARK = "RAYSWEEP_FAKE_CLUSTER"
# The fake provider's node ids: the head's ends in 00000, each worker's in its launch number.
FAKE_HEAD_ID = "f" * 51 + "00000"
# Trials of the cluster sweeps ask for a quarter of a card; here the card is logical, so the
# sweep asks for the CPU explicitly (a GPU share with `device: auto` must find CUDA or fail).
TRIAL_RESOURCES = {"cpus": 1, "gpus": 0.25}
MAX_WORKERS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaler_config(port: int) -> dict:
    """cluster.yaml's node types and scaling, on the fake provider: the same worker resources,
    min_workers and upscaling, at most MAX_WORKERS workers of a type on one machine."""
    real = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head_type = real["head_node_type"]
    types = {
        name: {
            "resources": dict(t["resources"]),
            "min_workers": t.get("min_workers", 0),
            "max_workers": min(t.get("max_workers", MAX_WORKERS), MAX_WORKERS),
            "node_config": {},
        }
        for name, t in real["available_node_types"].items()
        if name != head_type
    }
    # The head keeps no trial slot here (the machine has few cores): every trial needs a worker.
    types["ray.head.default"] = {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": "raysweep-fake",
        "max_workers": sum(t["max_workers"] for t in types.values()),
        "upscaling_speed": real.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": real.get("idle_timeout_minutes", 5),
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{port}",
        },
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def cluster_env(tmp: Path, mark: str) -> dict[str, str]:
    """The environment every process of the cluster starts with: its mark, its temporary folder,
    no token auth, Ray bound to 127.0.0.1 and nothing sent beyond this machine."""
    with loopback_only():
        env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    return env | {
        MARK: mark,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_TMPDIR": str(tmp),
        "RAY_AUTH_MODE": "disabled",
        LOOPBACK_SWITCH: "0",
    }


def start_head(port: int, tmp: Path, env: dict[str, str], *options: str) -> None:
    subprocess.run(
        [
            "ray", "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", f"--temp-dir={tmp}",
            "--include-dashboard=false", "--disable-usage-stats", *options,
        ],
        env=env, check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


# A worker node started as the fake provider starts its nodes (`ray start` refuses to join a
# cluster with Ray's single-machine switch on): NODE_PORT is the head's port.
JOIN = """
import os, signal
from ray._private.node import Node
from ray._private.parameter import RayParams
params = RayParams(
    node_ip_address="127.0.0.1", gcs_address="127.0.0.1:" + os.environ["NODE_PORT"], num_cpus=1,
    min_worker_port=0, max_worker_port=0, dashboard_agent_listen_port=0,
)
Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
print("joined", flush=True)
signal.pause()
"""


def join_node(port: int, env: dict[str, str], prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """One more node (one CPU) on the cluster, in its own process that lives until stopped;
    `prefix` wraps the start (for example a shell that first changes the node's mounts)."""
    node = subprocess.Popen(
        [*prefix, sys.executable, "-c", JOIN], env={**env, "NODE_PORT": str(port)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    first = node.stdout.readline()
    if first.strip() != "joined":
        raise RuntimeError(
            f"the node did not join: {first}{node.stdout.read() if node.poll() is not None else ''}"
        )
    return node


def run_driver(sweep: Path, results: Path, port: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m raysweep.run SWEEP --address auto`, as a user types it on the cluster's head."""
    cmd = [sys.executable, "-m", "raysweep.run", str(sweep), "--address", "auto", "--results", str(results)]
    env = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1500)


def cluster_sweep(folder: Path) -> Path:
    """sweeps/smoke.yaml with the cluster sweeps' per-trial resources."""
    spec = yaml.safe_load((ROOT / "sweeps" / "smoke.yaml").read_text())
    spec["name"] = "smoke-cluster"
    spec["resources"] = TRIAL_RESOURCES
    spec["settings"] = {**spec.get("settings", {}), "device": "cpu"}
    path = folder / "smoke-cluster.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def marked_pids(mark: str) -> list[int]:
    """Processes whose environment carries this cluster's mark (every process of the cluster
    inherits it from the head's start)."""
    pids = []
    needle = f"{MARK}={mark}".encode()
    for entry in glob.glob("/proc/[0-9]*/environ"):
        try:
            env = Path(entry).read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if needle in env.split(b"\0"):
            pids.append(int(entry.split("/")[2]))
    return sorted(p for p in pids if p != os.getpid())


def stop(mark: str, log) -> list[int]:
    """SIGTERM to the cluster's processes, SIGKILL to what is left after 10 s; returns survivors."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        pids = marked_pids(mark)
        if not pids:
            return []
        log(f"stop: {signal.Signals(sig).name} to {len(pids)} processes of the cluster")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # ended meanwhile
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and marked_pids(mark):
            time.sleep(0.5)
    return marked_pids(mark)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="write the run directory and logs here (kept)")
    args = parser.parse_args(argv)
    # Unix socket paths must stay short: Ray's session folder goes under a short temp path.
    tmp = Path(tempfile.mkdtemp(prefix="rsfc-", dir="/tmp"))
    work = args.keep or tmp
    work.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        print(f"[fake-cluster] {line}", flush=True)

    port = free_port()
    mark = tmp.name
    config_path = tmp / "autoscaler.json"
    config = autoscaler_config(port)
    config_path.write_text(json.dumps(config))
    env = cluster_env(tmp, mark)
    workers = {
        n: t["resources"] for n, t in config["available_node_types"].items() if n != "ray.head.default"
    }
    log(f"head on 127.0.0.1:{port}, temp {tmp}; worker types {workers} (0 running, autoscaled)")
    failures: list[str] = []
    try:
        start_head(port, tmp, env, f"--autoscaling-config={config_path}", "--num-cpus=0", "--num-gpus=0")
        log(f"head started: {len(marked_pids(mark))} processes")
        sweep = cluster_sweep(tmp)
        results = work / "runs" / "smoke-cluster"
        started = time.monotonic()
        log(f"driver: python -m raysweep.run {sweep} --address auto --results {results}")
        proc = run_driver(sweep, results, port, env)
        (work / "driver.log").write_text(proc.stdout + proc.stderr)
        seconds = time.monotonic() - started
        log(f"driver exit {proc.returncode} after {seconds:.0f} s (log: {work / 'driver.log'})")
        if proc.returncode != 0:
            failures.append(f"the driver exited {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}")

        monitor = sorted(tmp.glob("session_*/logs/monitor.log"))
        launches = [
            ln.strip()
            for m in monitor
            for ln in m.read_text(errors="replace").splitlines()
            if "NodeLauncher" in ln and "Launching" in ln
        ]
        for ln in launches:
            log("autoscaler: " + ln.split(" -- ")[-1] + f" ({ln[11:19]})")
        if not launches:
            failures.append("the autoscaler's log shows no worker launched")

        records = [json.loads(p.read_text()) for p in sorted(results.glob("trials/*/result.json"))]
        nodes: dict[str, list[str]] = {}
        for r in records:
            nodes.setdefault(r.get("node_id") or "?", []).append(r["label"])
            gpu = r.get("resources", {}).get("GPU", 0.0)
            wanted = 0.0 if r["config"].get("model") == "bpr" else TRIAL_RESOURCES["gpus"]
            if r["status"] != "ok":
                failures.append(f"{r['label']}: {r['status']} ({r.get('error')})")
            if gpu != wanted:
                failures.append(f"{r['label']}: ran with GPU {gpu}, asked {wanted}")
            if r.get("node_id") in (None, FAKE_HEAD_ID):
                failures.append(f"{r['label']}: ran on the head, not on an autoscaled worker")
        for node, labels in sorted(nodes.items()):
            log(f"node ...{node[-5:]}: {len(labels)} trials ({', '.join(sorted(labels))})")
        log(
            f"records: {len(records)} in {results / 'trials'}, "
            f"{sum(r['status'] == 'ok' for r in records)} ok, on {len(nodes)} worker nodes; "
            f"GPU shares {sorted({r.get('resources', {}).get('GPU', 0.0) for r in records})}"
        )
        if len(records) < 8:
            failures.append(f"only {len(records)} records landed (the smoke sweep has at least 8 trials)")
    finally:
        survivors = stop(mark, log)
        log(f"stopped: {len(survivors)} of the cluster's processes still running {survivors}")
        if survivors:
            failures.append(f"processes left running after the stop: {survivors}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            failures.append(f"port {port} still answers after the stop")
        except OSError:
            pass
        (work / "fake_cluster.log").write_text("\n".join(lines) + "\n")
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.copytree(tmp, work / "ray-logs", ignore=shutil.ignore_patterns("sockets", "*.sock"),
                            dirs_exist_ok=True, ignore_dangling_symlinks=True)  # fmt: skip
            shutil.rmtree(tmp, ignore_errors=True)
    for f in failures:
        log("FAILED: " + f)
    log("all checks hold" if not failures else f"{len(failures)} checks failed")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
