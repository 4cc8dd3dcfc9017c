"""Sweep files are validated into a typed spec before Ray starts: one line, file and key path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from raysweep.core.errors import UserError
from raysweep.sweep.spec import expand, load_spec

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"
GOOD = """
name: t
datasets: [synthetic-chains]
models:
  - {model: sasrec, loss: sampled_ce, negatives: [10, 30]}
  - {model: bpr}
seeds: [0, 1]
settings: {max_epochs: 2}
"""


def _write(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def test_expands_to_one_trial_per_cell(tmp_path):
    trials = expand(load_spec(_write(tmp_path, GOOD)))
    assert sorted((t.config.label, t.config.seed) for t in trials) == [
        ("BPR-MF", 0),
        ("BPR-MF", 1),
        ("SASRec+ 10", 0),
        ("SASRec+ 10", 1),
        ("SASRec+ 30", 0),
        ("SASRec+ 30", 1),
    ]
    assert len({t.key for t in trials}) == 6 and all(t.config.max_epochs == 2 for t in trials)


@pytest.mark.parametrize(
    "change, message",
    [
        (("seeds: [0, 1]", "seeds: [0, 1]\nbogus: 1"), "s.yaml: bogus: Extra inputs are not permitted"),
        (("negatives: [10, 30]", "negatives: [10, ten]"), "s.yaml: models[0].negatives"),
        (
            ("{max_epochs: 2}", "{max_epochs: two}"),
            "s.yaml: settings: setting 'max_epochs': Input should be a valid integer",
        ),
        (("{max_epochs: 2}", "{epochs: 2}"), "s.yaml: settings: unknown setting 'epochs'"),
        (("[synthetic-chains]", "[ml-2m]"), "s.yaml: datasets: unknown dataset 'ml-2m'"),
        (("- {model: bpr}", "- {model: bpr, loss: ce}"), "model 'bpr' (BPR-MF) takes no loss"),
        (
            ("negatives: [10, 30]", "negatives: [10, 0]"),
            "setting 'negatives': Input should be greater than or equal to 1",
        ),
        (("- {model: bpr}", "- {model: transformer}"), "s.yaml: models[1].model: Input should be"),
        (
            ("name: t", "name: t\nresources: {gpus: 2}"),
            "s.yaml: resources.gpus: Input should be less than or equal to 1",
        ),
        (("seeds: [0, 1]", "seeds: [0, 1"), "s.yaml, line"),
    ],
)
def test_bad_sweep_files_are_one_line(tmp_path, change, message):
    path = _write(tmp_path, GOOD.replace(*change))
    with pytest.raises(UserError, match=None) as info:
        expand(load_spec(path), str(path))
    assert message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_n_beyond_the_pool_is_refused_before_ray_starts(tmp_path):
    path = _write(tmp_path, GOOD.replace("negatives: [10, 30]", "negatives: [10, 290]"))
    result = subprocess.run(
        [sys.executable, "-m", "raysweep.run", str(path), "--dry-run"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert (
        result.stderr.startswith("error: ")
        and "N=290 negatives is more than the pool allows" in result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1


def test_shipped_sweeps_validate_and_dry_run():
    names = sorted(p.stem for p in SWEEPS.glob("*.yaml"))
    assert {"quickstart", "smoke", "beauty", "table2", "negatives", "losses"} <= set(names)
    for name in names:
        spec = load_spec(SWEEPS / f"{name}.yaml")
        assert expand(spec, name), name
    result = subprocess.run(
        [sys.executable, "-m", "raysweep.run", str(SWEEPS / "quickstart.yaml"), "--dry-run"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "SASRec+ 3000" in result.stdout and "trials" in result.stdout
    assert f"results in {Path.cwd() / 'runs' / 'quickstart'}" in result.stdout


def test_runs_directory_comes_from_the_environment_when_the_sweep_names_none(tmp_path):
    env = dict(os.environ, RAYSWEEP_RUNS_DIR=str(tmp_path / "shared"))
    result = subprocess.run(
        [sys.executable, "-m", "raysweep.run", str(SWEEPS / "quickstart.yaml"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert f"results in {tmp_path / 'shared' / 'quickstart'}" in result.stdout
