import importlib.util
import os
import sys
from pathlib import Path

import pytest

from raysweep.core import full_ce
from raysweep.sweep.cluster import LOOPBACK_SWITCH, loopback_only

# The tests' Ray binds to 127.0.0.1 as a local sweep's does (read when ray is first imported).
os.environ.setdefault(LOOPBACK_SWITCH, "0")

NEEDS_RAY = "the sweep layer's tests need Ray (pip install -e '.[test]'); the core's run without it"
# The variants that run PyTorch's own chunked CE (F.linear_cross_entropy with options), a code path
# that PyTorch < 2.13 does not have: there full CE runs raysweep's ChunkedCE, which the other
# variant of each test checks. CI's torch 2.13 runs both.
NEEDS_TORCH_CE = pytest.mark.skipif(
    full_ce.DEFAULT_BACKEND != "torch",
    reason="this PyTorch has no F.linear_cross_entropy options (torch < 2.13)",
)

ROOT = Path(__file__).resolve().parents[1]


def _mirror() -> Path | None:
    """A local mirror of the upstream data files: RAYSWEEP_MIRROR, else a `shared/data` folder
    beside the checkout (this project's CI keeps one there), else the user's own raysweep data
    cache if it already holds ML-1M (`python -m raysweep.data fetch ml-1m` puts it there)."""
    from raysweep.core.data import default_data_dir

    if os.environ.get("RAYSWEEP_MIRROR"):
        return Path(os.environ["RAYSWEEP_MIRROR"])
    for folder in (ROOT.parent / "shared" / "data", default_data_dir()):
        if any((folder / "ml-1m" / name).is_file() for name in ("ml-1m.txt", "ml-1m.txt.gz")):
            return folder
    return None


@pytest.fixture(scope="session", autouse=True)
def data_env(tmp_path_factory):
    """One fresh data cache for the whole session, and the local mirror where there is one."""
    mirror = _mirror()
    os.environ["RAYSWEEP_DATA_DIR"] = str(tmp_path_factory.mktemp("data"))
    if mirror is None:
        os.environ.pop("RAYSWEEP_MIRROR", None)
    else:
        os.environ["RAYSWEEP_MIRROR"] = str(mirror)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    yield


@pytest.fixture
def offline_env(tmp_path) -> dict:
    """A machine without network and without data, as a subprocess's environment: an empty cache
    (tmp_path / "cache"), no mirror, and a proxy on a closed local port, so a download fails at
    once (as with no route)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if k != "RAYSWEEP_MIRROR"}
    return env | {"RAYSWEEP_DATA_DIR": str(tmp_path / "cache"), "https_proxy": closed, "HTTPS_PROXY": closed}


@pytest.fixture(scope="session")
def ml1m(data_env):
    """ML-1M, for the few tests that need it (MovieLens may not be redistributed, so it does not
    ship): from the mirror, else through raysweep's own verified download; else the test skips.
    With a mirror (CI) a file that fails to load fails the test: only absent data may skip."""
    from raysweep.core.data import load_interactions
    from raysweep.core.errors import UserError

    if os.environ.get("RAYSWEEP_MIRROR"):
        return load_interactions("ml-1m")
    try:
        return load_interactions("ml-1m")
    except UserError as exc:
        pytest.skip(
            f"ML-1M is not available ({exc}): set RAYSWEEP_MIRROR to a folder holding ml-1m.txt(.gz), "
            "or run the tests with internet access"
        )


@pytest.hookimpl(tryfirst=True)  # before -m selects: the marks added here count
def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        # Whole sweeps belong to the long tests, but for one small sweep run end to end.
        if item.get_closest_marker("sweep") and not item.get_closest_marker("end_to_end"):
            item.add_marker(pytest.mark.long)
        # CI's plain-clone run leaves the sweep tests out to save time, which is sound only while
        # none of them needs the data mirror.
        if item.get_closest_marker("sweep") and "ml1m" in item.fixturenames:
            raise pytest.UsageError(f"{item.nodeid}: a sweep test must not need ML-1M")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """One two-node local Ray cluster for every sweep test (ray.init costs seconds; share it).

    The head has a logical GPU (num_gpus=1) so fractional-GPU scheduling can be checked on a
    machine without one. Only what this fixture started is stopped at the end. Workers of the
    lost-node test start later on their nodes with the environment those nodes started with.
    """
    ray = pytest.importorskip("ray", reason=NEEDS_RAY)
    from ray.cluster_utils import Cluster

    with loopback_only():  # Ray's processes make no request beyond this machine (raysweep.run)
        cluster = Cluster(
            initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1, "include_dashboard": False}
        )
        worker = cluster.add_node(num_cpus=2, resources={"worker_node": 2})
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (not a package: its siblings are importable while it loads)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module
