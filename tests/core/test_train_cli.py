import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from raysweep.core.metrics import mean_metrics


def _run(*args, blocked=()):
    """`python -m raysweep.train ARGS`, with the packages in `blocked` made unimportable."""
    block = f"import runpy, sys; sys.modules.update(dict.fromkeys({list(blocked)!r})); "
    start = [
        "-c",
        block + "sys.argv[0] = 'raysweep.train'; runpy.run_module('raysweep.train', run_name='__main__')",
    ]
    return subprocess.run(
        [sys.executable, *(start if blocked else ["-m", "raysweep.train"]), *args],
        capture_output=True,
        text=True,
    )


def test_trial_writes_metrics_and_history(tmp_path):
    result = _run(
        "--dataset",
        "synthetic-chains",
        "--loss",
        "sampled_ce",
        "--negatives",
        "20",
        "--max-epochs",
        "2",
        "--hidden",
        "16",
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "epoch   2 | loss" in result.stdout and "val ndcg@10" in result.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["label"] == "SASRec+ 20" and metrics["config"]["negatives"] == 20
    assert metrics["config"]["max_len"] == 20 and set(metrics["test"]) >= {"hr@10", "ndcg@100", "mrr@10"}
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert (
        metrics["precision"] == ("bf16" if native else "fp32")
        and f"cpu, {metrics['precision']}, peak" in result.stdout
    )
    assert 0 < metrics["peak_memory_mb"] < 4096
    history = pd.read_parquet(tmp_path / "history.parquet")
    assert list(history["epoch"]) == [1, 2] and "val_ndcg@10" in history
    # Every test user's rank: the record's metrics follow from them exactly.
    ranks = pd.read_parquet(tmp_path / "ranks.parquet")["rank"]
    assert len(ranks) == 3000 and str(ranks.dtype) == "int32"
    assert mean_metrics(ranks.to_numpy()) == metrics["test"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_core_trains_without_ray_optuna_or_implicit(tmp_path):
    """What a GPU machine without Ray runs: a trial needs only torch, numpy, pandas and pyarrow."""
    result = _run(
        "--dataset",
        "synthetic-chains",
        "--loss",
        "ce",
        "--max-epochs",
        "1",
        "--hidden",
        "16",
        "--out",
        str(tmp_path),
        blocked=("ray", "optuna", "implicit"),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "metrics.json").read_text())["test"]["ndcg@10"] > 0


def test_bpr_without_implicit_is_one_line_exit_2(tmp_path):
    result = _run(
        "--dataset", "synthetic-chains", "--model", "bpr", "--out", str(tmp_path), blocked=("implicit",)
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model 'bpr' (BPR-MF) needs the implicit package" in lines[0], result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "nope"], "unknown dataset 'nope'"),
        (["--dataset", "beauty", "--model", "bpr", "--loss", "ce"], "model 'bpr' (BPR-MF) takes no loss"),
        (
            ["--dataset", "beauty", "--loss", "sampled_ce", "--negatives", "0"],
            "setting 'negatives': Input should be greater than or equal to 1",
        ),
        (["--dataset", "beauty", "--loss", "sampled_ce"], "loss 'sampled_ce' needs negatives N >= 1"),
        (
            ["--dataset", "beauty", "--loss", "ce", "--negatives", "5"],
            "only applies to the losses sampled_ce and gbce",
        ),
        (
            ["--dataset", "synthetic-chains", "--loss", "sampled_ce", "--negatives", "300"],
            "N=300 negatives is more than the pool allows",
        ),
        (["--dataset", "beauty", "--model", "sasrec"], "needs a loss"),
        (
            ["--dataset", "beauty", "--loss", "ce", "--hidden", "30", "--heads", "4"],
            "not divisible by 4 heads",
        ),
    ],
)
def test_impossible_settings_are_one_line_exit_2(tmp_path, args, message):
    result = _run(*args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_the_popularity_sampler_is_a_validated_setting_and_its_ranks_are_kept(tmp_path):
    from raysweep.core.config import TrialConfig
    from raysweep.core.errors import UserError
    from raysweep.core.trial import run_trial

    with pytest.raises(UserError, match="samplers"):
        TrialConfig.from_dict(dict(dataset="beauty", model="sasrec", loss="ce", samplers=["gaussian"]))
    with pytest.raises(UserError, match="sampled_n"):
        TrialConfig.from_dict(dict(dataset="beauty", model="sasrec", loss="ce", sampled_n=0))
    tiny = dict(dataset="synthetic-chains", model="sasrec", loss="ce", max_epochs=1, hidden=16, val_users=100)
    drawn = run_trial(TrialConfig.from_dict(dict(tiny, sampled_n=20)))
    assert drawn.sampled_ranks is not None and drawn.sampled_ranks.shape == drawn.ranks.shape
    assert drawn.sampled_ranks.min() >= 0 and drawn.sampled_ranks.max() <= 20
    assert (drawn.sampled_ranks <= drawn.ranks).all()  # never more negatives above it than all items
    assert run_trial(TrialConfig.from_dict(dict(tiny, samplers=["uniform"]))).sampled_ranks is None
