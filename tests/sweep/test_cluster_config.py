"""cluster.yaml passes Ray's own cluster-config validation and keeps the cluster closed."""

from pathlib import Path

import pytest
import yaml
from conftest import NEEDS_RAY

pytest.importorskip("ray", reason=NEEDS_RAY)
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

CLUSTER = Path(__file__).resolve().parents[2] / "cluster.yaml"


def _config():
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_passes_rays_validation():
    validate_config(prepare_config(_config()))


def test_validation_would_catch_a_broken_config():
    config = _config()
    config["available_node_types"]["gpu_worker"]["bogus"] = 1
    with pytest.raises(Exception, match="bogus"):
        validate_config(prepare_config(config))


def test_only_ssh_is_open_and_dashboard_stays_on_loopback():
    config = _config()
    rules = config["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
    assert all(not r["CidrIp"].startswith("0.0.0.0") for rule in rules for r in rule["IpRanges"])
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert all("RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"]) for _ in [0])
    assert config["available_node_types"]["gpu_worker"]["min_workers"] == 0
    text = CLUSTER.read_text().lower()
    assert "aws_secret_access_key" not in text and "aws_access_key_id" not in text
