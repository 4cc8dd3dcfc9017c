"""cluster.yaml, judged by what Ray's own cluster code does with it: it passes Ray's validation,
Ray leaves its security group alone (Ray's own group would open SSH to the world), its image is
not Ray's outdated default, `.venv` and `runs` stay home, and no sweep leaves a card idle."""

import math
from pathlib import Path

import pytest
import yaml
from conftest import NEEDS_RAY

pytest.importorskip("ray", reason=NEEDS_RAY)
from ray.autoscaler._private.aws import config as aws  # noqa: E402
from ray.autoscaler._private.command_runner import SSHCommandRunner  # noqa: E402
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

from raysweep.sweep.spec import load_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster.yaml"


def _config():
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_passes_rays_validation():
    validate_config(prepare_config(_config()))


def test_validation_would_catch_a_broken_config():
    config = _config()
    config["available_node_types"]["gpu_worker"]["bogus"] = 1
    with pytest.raises(Exception, match="bogus"):
        validate_config(prepare_config(config))


def test_ray_creates_no_security_group_and_opens_nothing(monkeypatch):
    """Ray's AWS bootstrap makes a group, with SSH open to 0.0.0.0/0, for any node type without
    SecurityGroupIds; with the user's group on every node type it touches none."""
    assert aws._create_default_ssh_inbound_rules()[0]["IpRanges"] == [{"CidrIp": "0.0.0.0/0"}]
    monkeypatch.setattr(aws, "_upsert_security_groups", lambda *a: pytest.fail("Ray would make a group"))
    config = prepare_config(_config())
    before = {k: dict(v["node_config"]) for k, v in config["available_node_types"].items()}
    aws._configure_security_group(config)
    assert {k: v["node_config"] for k, v in config["available_node_types"].items()} == before
    assert "security_group" not in config["provider"]  # (rules Ray would add to a group it made)


def test_the_image_is_named_not_rays_default():
    """Ray maps `latest_dlami` (or no ImageId) to a fixed Ubuntu 18.04 image whose Python is too
    old for raysweep; the cluster names its own image, which Ray passes on unchanged."""
    config = prepare_config(_config())
    images = {k: v["node_config"]["ImageId"] for k, v in config["available_node_types"].items()}
    aws._check_ami(config)
    assert {k: v["node_config"]["ImageId"] for k, v in config["available_node_types"].items()} == images
    assert all(image.startswith("ami-") and image.lower() != "latest_dlami" for image in images.values())
    assert "base-oss-nvidia-driver-gpu-ubuntu-22.04" in CLUSTER.read_text()  # how to find its id


def test_nodes_mount_efs_as_nfs_and_get_a_cuda_torch():
    setup = " ".join(_config()["setup_commands"])
    assert "apt-get update" in setup and "nfs-common" in setup and "amazon-efs-utils" not in setup
    assert "mount -t nfs4" in setup and "download.pytorch.org/whl/cu" in setup
    for node in _config()["available_node_types"].values():
        assert node["node_config"]["SubnetIds"] and node["node_config"]["SecurityGroupIds"]


def test_file_mounts_leave_environments_and_runs_behind():
    config = _config()
    args = SSHCommandRunner._create_rsync_filter_args(None, config)
    excluded = [args[i + 1] for i, a in enumerate(args) if a == "--exclude"]
    assert {".venv", "runs", ".git"} <= set(excluded)
    assert "dir-merge,- .gitignore" in args


def test_dashboard_stays_on_loopback_and_every_node_uses_the_token():
    config = _config()
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    assert config["available_node_types"]["gpu_worker"]["min_workers"] == 0
    text = CLUSTER.read_text().lower()
    assert "aws_secret_access_key" not in text and "aws_access_key_id" not in text


def test_no_sweep_leaves_part_of_a_card_idle():
    """On the cluster's GPU worker, the CPUs a sweep's trials ask for let every GPU share run."""
    worker = _config()["available_node_types"]["gpu_worker"]["resources"]
    for path in sorted((ROOT / "sweeps").glob("*.yaml")):
        resources = load_spec(path).resources
        if not resources.gpus:
            continue
        shares = math.floor(worker["GPU"] / resources.gpus + 1e-9)
        fits = math.floor(worker["CPU"] / resources.cpus)
        assert fits >= shares, (
            f"{path.name}: {resources.cpus:g} CPUs a trial let {fits} of {shares} shares run"
        )
