"""Where a sweep's trials run: a cluster the driver joins, or a single-node Ray it starts on this
machine, bound to 127.0.0.1 and making no request beyond it.

Ray binds its gRPC servers (GCS, raylet, workers, agents) to the node's address, and on Linux it
never takes the loopback address as a node's, even when asked to. Its own single-machine switch
(read when ray is imported, inherited by every Ray process) makes the node address 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from pathlib import Path

from raysweep.core.errors import UserError

# Ray's switch for a single-machine Ray (named for the platforms where it is the default).
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def is_local(address: str | None) -> bool:
    return not (address or os.environ.get("RAY_ADDRESS"))


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


def machine_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def check_resources(resources, where: str, local: bool, cpus: int | None = None) -> None:
    """A trial's request that no node could ever grant waits forever: refused. In local mode the
    one node is this machine, or the `cpus` of it that --cpus gives the local Ray."""
    if cpus is not None:
        if not local:
            raise UserError("--cpus: only for a local Ray; a cluster's nodes offer their own CPUs")
        if not 1 <= cpus <= machine_cpus():
            raise UserError(f"--cpus {cpus}: expected 1 to {machine_cpus()}, the CPUs of this machine")
    if not local:
        return
    have = cpus or machine_cpus()
    if resources.cpus > have:
        given = "--cpus gives the local Ray" if cpus else "this machine has"
        raise UserError(
            f"{where}: resources.cpus: each trial asks for {resources.cpus:g} CPUs and {given} "
            f"{have}, so no trial could ever start; ask for {have} or fewer"
        )


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


def start_ray(address: str | None, verbose: bool = True, cpus: int | None = None) -> bool:
    """Join a cluster, or start a local single-node Ray bound to 127.0.0.1 on `cpus` of this
    machine's CPUs (all by default). True if local. Without `verbose`, Ray's own driver lines
    below errors are left out."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address and "ray" not in sys.modules:  # (the switch is read when ray is imported)
        os.environ.setdefault(LOOPBACK_SWITCH, "0")
    import ray

    if ray.is_initialized():  # a caller (a notebook, the tests) already chose the cluster
        return False
    level = logging.INFO if verbose else logging.ERROR
    if address:
        check_address(address)
        try:
            ray.init(address=address, log_to_driver=True, logging_level=level)
        except (ConnectionError, RuntimeError) as exc:
            raise UserError(
                f"--address {address}: cannot join that Ray cluster ({str(exc).splitlines()[0]})"
            ) from None
        return False
    # address="local": a new single-node Ray even if another one runs on this machine.
    with loopback_only():
        context = ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            logging_level=level,
        )
    node_ip = ray.util.get_node_ip_address()
    total = ray.cluster_resources()
    print(
        f"[raysweep] local Ray on {node_ip} (CPUs {total.get('CPU', 0):g}, GPUs {total.get('GPU', 0):g}): "
        f"dashboard at http://{context.dashboard_url}",
        flush=True,
    )
    if node_ip != "127.0.0.1":
        print(
            f"[raysweep] warning: Ray's ports listen on {node_ip}, not only on 127.0.0.1 (ray was imported "
            f"before raysweep could set {LOOPBACK_SWITCH}=0, or it is set otherwise)",
            file=sys.stderr,
            flush=True,
        )
    return True


def check_shared(run_dir: Path) -> None:
    """On a cluster, every node that is up must see the run directory: trials on worker nodes
    write their records and saved states there. A probe file written here is looked for from each
    node (a task pinned to it); one that cannot see it stops the sweep before any trial starts.
    (A node that joins later and cannot see it fails its trials at once, saying the same.)"""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = Path(run_dir) / f".shared-probe-{os.getpid()}"
    probe.write_text("raysweep\n")
    try:
        sees = ray.remote(num_cpus=0)(_sees)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        answers = ray.get(
            [
                sees.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                ).remote(str(probe))
                for n in nodes
            ],
            timeout=120,
        )
    finally:
        probe.unlink(missing_ok=True)
    blind = [n["NodeManagerAddress"] for n, seen in zip(nodes, answers) if not seen]
    if blind:
        raise UserError(
            f"{run_dir}: not on storage every node shares (node {blind[0]} cannot see it); put run "
            "directories on a shared file system (RAYSWEEP_RUNS_DIR, or --results)"
        )


def _sees(path: str) -> bool:
    return os.path.isfile(path)
