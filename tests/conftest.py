import importlib.util
import os
import sys
from pathlib import Path

import pytest

from raysweep import losses

NEEDS_RAY = "the sweep layer's tests need Ray (pip install -e '.[test]'); the core's run without it"
# The variants that run PyTorch's own chunked CE (F.linear_cross_entropy with options), a code path
# that PyTorch < 2.13 does not have (the GPU image's 2.11): there losses uses _ChunkedCE, which the
# other variant of each test checks. CI's torch 2.13 runs both.
NEEDS_TORCH_CE = pytest.mark.skipif(not losses.TORCH_CHUNKED_CE,
                                    reason="this PyTorch has no F.linear_cross_entropy options (torch < 2.13)")

# The local mirror of upstream: ../shared/data beside the checkout, or RAYSWEEP_MIRROR where the
# checkout travels alone (the lent GPU machine: benchmarks/gpu_session.sh points it at .device/).
MIRROR = Path(os.environ.get("RAYSWEEP_MIRROR") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


@pytest.fixture(scope="session", autouse=True)
def data_env(tmp_path_factory):
    """One data cache for the whole session, and the local mirror of upstream (../shared/data)."""
    assert MIRROR.is_dir(), f"the local data mirror {MIRROR} is missing (tests need ML-1M from it)"
    os.environ["RAYSWEEP_DATA_DIR"] = str(tmp_path_factory.mktemp("data"))
    os.environ["RAYSWEEP_MIRROR"] = str(MIRROR)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    yield


def pytest_collection_modifyitems(config, items):
    import torch

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
    machine without one. Only what this fixture started is stopped at the end.
    """
    ray = pytest.importorskip("ray", reason=NEEDS_RAY)
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1, "include_dashboard": False})
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
