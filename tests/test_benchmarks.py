"""The one-card Table 2 runner (benchmarks/one_card.py), on synthetic data on the CPU."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.sweep
def test_one_card_runs_the_grid_records_failures_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "one_card.py"),
        str(ROOT / "sweeps" / "table2.yaml"),
        "--datasets",
        "synthetic-chains",
        "--max-epochs",
        "1",
        "--concurrent",
        "2",
        "--device",
        "cpu",
        "--out",
        str(run_dir),
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    results = pd.read_parquet(run_dir / "results.parquet").set_index("label")
    # BPR-MF's Optuna search needs Ray: it runs at its base settings, with its five seeds.
    assert "search-synthetic-chains-0: no Optuna search without Ray" in first.stdout
    assert (results.index == "BPR-MF").sum() == 5
    results = results[~results.index.duplicated()]
    # synthetic-chains has 300 items: N = 3000 cannot be drawn, and that trial alone fails, with the reason.
    assert sorted(results.index) == sorted(
        ["BPR-MF", "GRU4Rec", "BERT4Rec", "SASRec", "SASRec+", "SASRec+ 3000"]
    )
    assert results.loc["SASRec+ 3000", "status"] == "failed"
    assert "N=3000 negatives is more than the pool allows" in results.loc["SASRec+ 3000", "error"]
    ok = results[results["status"] == "ok"]
    assert len(ok) == 5 and (ok["epochs"] <= 100).all()
    assert all((run_dir / "trials" / key / "ranks.parquet").is_file() for key in ok["key"])
    assert ok.loc["SASRec", "test_ndcg@10"] > 0.5  # one epoch of the planted chains is enough for SASRec
    table = (run_dir / "report" / "table2.md").read_text()
    assert "| SASRec+ | 1 |" in table and "| BPR-MF | 5 |" in table and "## Failed trials" in table
    finished = {
        p.parent.name: json.loads(p.read_text())["finished_at"] for p in run_dir.glob("trials/*/result.json")
    }

    shutil.rmtree(run_dir / "report")
    again = subprocess.run(cmd + ["--no-report"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "report left out (--no-report)" in again.stdout and not (run_dir / "report").exists()
    assert "10 trials (9 already recorded" in again.stdout
    assert again.stdout.count("[one_card] start") == 1  # only the failed trial runs again
    for key, when in finished.items():
        record = json.loads((run_dir / "trials" / key / "result.json").read_text())
        assert record["finished_at"] == when or record["status"] == "failed"


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:  # the process ended while we looked
            pass
    return found


@pytest.mark.sweep
def test_one_card_stopped_ends_its_trials_and_reports_the_finished_ones(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "one_card.py"),
        str(ROOT / "sweeps" / "table2.yaml"),
        "--datasets",
        "synthetic-chains",
        "--max-epochs",
        "60",
        "--concurrent",
        "2",
        "--device",
        "cpu",
        "--out",
        str(run_dir),
    ]
    process = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines = []
    for line in process.stdout:  # the first trial to finish; BERT4Rec (60 epochs) is still running then
        lines.append(line)
        if line.startswith("[one_card] done"):
            break
    assert _processes_mentioning(str(run_dir / "work")), "a trial process should be running"
    # As a time cap does it: SIGTERM to the whole process group, the trial processes too, so a
    # trial may end before the runner sees the stop; it is unfinished, not failed.
    os.killpg(process.pid, signal.SIGTERM)
    out = "".join(lines) + process.stdout.read()
    assert process.wait(timeout=60) == 143, out
    assert "STOPPED after" in out and "trials unfinished" in out
    assert not _processes_mentioning(str(run_dir / "work")), "trial processes outlived the stop"
    done = pd.read_parquet(run_dir / "results.parquet")
    assert len(done) >= 1 and (done["status"] == "ok").all()
    first_done = (
        lines[-1].split("synthetic-chains ", 1)[1].split(":")[0]
    )  # "[one_card] done  DATASET LABEL: ..."
    assert f"| {first_done} | 1 |" in (run_dir / "report" / "table2.md").read_text()


def test_packing_picks_the_fewest_trials_near_the_best_rate():
    packing = load_benchmark("packing")
    assert packing.packing_choice({1: 1.0, 2: 1.53, 4: 1.40}) == 2  # this CPU's figures: past 2, slower
    assert packing.packing_choice({1: 1.0, 2: 1.9, 4: 3.5, 8: 3.6}) == 4  # 8 gains under 5 %
    assert packing.packing_choice({1: 1.0, 2: 1.9, 4: 3.0, 8: 3.6}) == 8


def test_speed_counts_the_ops_that_compute_and_leaves_out_views():
    import torch

    speed = load_benchmark("speed")
    a = torch.ones(4, 3, requires_grad=True)
    assert speed.kernel_ops(lambda: (a + 1).view(3, 4).t() * 2) == 2  # add, mul; view and t are views
    # Backward ops count too: add, mul, sum, then the seed gradient (ones_like) and mul's (mul);
    # expanding the seed and the leaf's detach are views.
    b = torch.ones(4, 3, requires_grad=True)
    assert speed.kernel_ops(lambda: ((b + 1) * 2).sum().backward()) == 5


@pytest.mark.long
def test_speed_prints_a_row_for_the_bundled_data(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--only", "beauty-sasrec-bce"]
        + ["--steps", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("| beauty-sasrec-bce |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    train, val, total = map(float, cells[1:4])
    assert train > 0 and val > 0 and abs(train + val - total) < 0.02
    assert "2 steps scaled to" in cells[-1]


def test_one_cards_command_line_gives_raysweep_train_the_trials_every_setting(tmp_path):
    """The GPU script runs each trial as `python -m raysweep.train` with every setting a flag: the
    flags parse back into the same settings (a list setting, samplers, included)."""
    from raysweep import train
    from raysweep.core.config import TrialConfig

    one_card = load_benchmark("one_card")
    settings = dict(dataset="beauty", model="sasrec", loss="sampled_ce", negatives=300, amp=False)
    cfg = TrialConfig.from_dict(settings | {"samplers": ["uniform"]})
    argv = one_card.command(cfg, tmp_path)[3:]  # after python -m raysweep.train
    args = vars(train._parser().parse_args(argv))
    args.pop("out")
    assert TrialConfig.from_dict(args) == cfg


def test_grid_only_finishes_a_sweep_run_with_the_keys_it_recorded_on_another_device():
    """The committed Beauty run trained mostly on a CPU: its sweep file on a card gives the same trial
    keys (the key leaves the device out), so an unpacked archive runs only what it lacks; BPR-MF,
    whose seeds follow its Optuna search, is left out rather than run at its base settings."""
    from raysweep.core.config import trial_key

    one_card = load_benchmark("one_card")
    sweep = ROOT / "sweeps" / "beauty.yaml"
    on_card = one_card.trials(sweep, ["beauty"], "cuda", None, cuda_graphs=True, grid_only=True)
    archive = pd.read_parquet(
        ROOT / "docs" / "results" / "beauty" / "results.parquet", columns=["key", "stages"]
    )
    recorded = set(archive.loc[archive["stages"].str.contains("seeds"), "key"])
    keys = {trial_key(c) for c in on_card}
    assert len(on_card) == 20 and not any(c.is_bpr for c in on_card)
    assert all(c.device == "cuda" and c.cuda_graphs for c in on_card)
    assert keys == {k for k in recorded if "-bpr-" not in k}
    with_search = one_card.trials(sweep, ["beauty"], "cuda", None)
    assert sum(c.is_bpr for c in with_search) == 5  # at its base settings, keys no run recorded
    assert not {trial_key(c) for c in with_search if c.is_bpr} & recorded


def test_a_trial_that_a_stop_ended_is_left_unfinished_not_recorded_as_failed(tmp_path):
    """A time cap signals the whole process group: a trial process may be dead (SIGTERM, exit -15)
    by the time the runner sees the stop. It stays among the running, for the rerun, and no
    failed record is written for it."""
    from raysweep.core.config import TrialConfig

    one_card = load_benchmark("one_card")

    class Ended:  # a trial process the stop's signal has already ended
        returncode = -15

        def poll(self):
            return self.returncode

    class StopDuringTheWait:  # the signal lands while the runner sleeps between polls
        calls = 0

        def is_set(self):
            self.calls += 1
            return self.calls > 1

    cfg = TrialConfig.from_dict(dict(dataset="synthetic-chains", model="sasrec", loss="ce"))
    log = tmp_path / "train.log"
    log.write_text("Terminated\n")
    trial = Ended()
    running = {trial: (cfg, tmp_path, 0.0, log)}
    run_dir = tmp_path / "run"
    assert one_card.run_all([], running, run_dir, {}, 1, 1, 0.0, StopDuringTheWait()) is False
    assert trial in running and not (run_dir / "trials").exists()
