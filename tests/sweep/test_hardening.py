"""Bad input, divergence and paths: each refused in one line before any work, or handled so that
nothing wrong is reported as a result."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from raysweep.core import data, metrics
from raysweep.core.atomic import atomic_write
from raysweep.core.errors import UserError
from raysweep.sweep import rundir as results
from raysweep.sweep.rundir import RunDir
from raysweep.sweep.spec import expand, load_spec, stage_name

ROOT = Path(__file__).resolve().parents[2]
GOOD = """
name: t
datasets: [synthetic-chains]
settings: {max_epochs: 1, val_users: 100, hidden: 16}
models:
  - {model: sasrec, loss: ce}
"""


def _cli(module, *args, cwd=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


def _one_line(result, message, code=2):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def _sweep(tmp_path, text, name="s.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_nan_and_infinite_scores_rank_as_misses():
    scores = torch.tensor(
        [
            [0.0, 1.0, 2.0, 3.0],
            [0.0, float("nan"), 2.0, 3.0],
            [0.0, 1.0, float("inf"), 3.0],
            [0.0, 1.0, 2.0, float("-inf")],
        ]
    )
    targets = torch.tensor([3, 3, 2, 3])
    none = torch.zeros(0, dtype=torch.long)
    ranks = metrics.rank_targets(scores, targets, none, none)
    assert ranks.tolist() == [0, 100, 100, 100]  # a NaN anywhere, or a target at +-inf: a miss, never a hit
    assert metrics.mean_metrics(ranks)["ndcg@10"] == 0.25  # never above 1, never inf


@pytest.mark.long
def test_a_diverging_trial_stops_with_one_line(tmp_path):
    result = _cli(
        "raysweep.train",
        "--dataset",
        "synthetic-chains",
        "--loss",
        "ce",
        "--lr",
        "1e6",
        "--hidden",
        "16",
        "--max-epochs",
        "3",
        "--out",
        tmp_path / "out",
    )
    _one_line(result, "diverged at epoch 1: the training loss is nan")
    assert not (tmp_path / "out" / "metrics.json").exists()


CHAINS = ["--dataset", "synthetic-chains", "--hidden", "16"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--loss", "ce", "--lr", "nan"], "setting 'lr': Input should be a finite number, got nan"),
        (
            ["--model", "bpr", "--regularization", "nan"],
            "setting 'regularization': Input should be a finite number",
        ),
        (["--loss", "ce", "--blocks", "1000000000"], "needs at least"),
        (["--loss", "ce", "--hidden", "100000000"], "needs at least"),
        (["--loss", "ce", "--max-len", "1000000000"], "needs at least"),
        (
            ["--loss", "gbce", "--negatives", "8", "--gbce-t", "1.5"],
            "setting 'gbce_t': Input should be less than or equal to 1, got 1.5",
        ),
        (
            ["--loss", "sampled_ce", "--negatives", "8", "--negatives-from", "in_batch", "--batch-size", "1"],
            "in-batch negatives come from the batch's other sequences, and batch_size is 1",
        ),
        (
            ["--loss", "gbce", "--negatives", "8", "--logq"],
            "negatives_from and logq apply to loss 'sampled_ce' only",
        ),
    ],
)
def test_impossible_settings_are_refused_before_any_work(tmp_path, args, message):
    result = _cli("raysweep.train", *CHAINS, *args, "--out", tmp_path / "out")
    _one_line(result, message)
    assert "epoch" not in result.stdout and not (tmp_path / "out").exists()


def test_out_pointing_at_a_file_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    result = _cli(
        "raysweep.train", "--dataset", "synthetic-chains", "--loss", "ce", "--out", tmp_path / "file"
    )
    _one_line(result, "--out")
    assert "exists and is not a folder" in result.stderr and "epoch" not in result.stdout


def test_a_dataset_with_nothing_to_learn_is_refused(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("".join(f"{u} {i}\n" for u in range(1, 50) for i in (u, u + 1, u + 2)))
    result = _cli("raysweep.train", "--dataset", path, "--loss", "ce", "--out", tmp_path / "out")
    _one_line(result, "no user has two training items")


def test_item_ids_far_beyond_the_catalogue_are_refused():
    with pytest.raises(UserError, match="item ids run up to 999,999,999,999 for 3 distinct items"):
        data.parse_interactions(b"1 1\n1 2\n1 999999999999\n", "big.txt")


def test_a_folder_is_not_a_data_file(tmp_path):
    (tmp_path / "x.txt").mkdir()
    with pytest.raises(UserError, match="x.txt: is a folder, not a data file"):
        data.load_interactions(str(tmp_path / "x.txt"))


@pytest.mark.long
def test_a_damaged_data_cache_is_rebuilt(tmp_path, capsys):
    frame = data.load_interactions("synthetic-chains", data_dir=tmp_path)
    cache = tmp_path / "synthetic-chains" / f"interactions.v{data.CACHE_VERSION}.parquet"
    cache.write_bytes(cache.read_bytes()[:100])
    again = data.load_interactions("synthetic-chains", data_dir=tmp_path)
    assert again.equals(frame) and "unreadable cache" in capsys.readouterr().err
    assert pd.read_parquet(cache).equals(frame)  # and the cache is whole again


@pytest.mark.parametrize(
    "text, message",
    [
        (GOOD.replace("name: t", "name: .."), "name: String should match pattern"),
        (
            GOOD.replace("settings:", "datasets: [beauty]\nsettings:"),
            "line 4: not valid YAML (duplicate key 'datasets')",
        ),
        (
            GOOD.replace(
                "{model: sasrec, loss: ce}",
                "{model: sasrec, loss: ce, search: {samples: 2, space: {hidden: {choice: [0, 16]}}}}",
            ),
            "models[0].search.space can produce hidden=0, which is not a valid trial: setting 'hidden': "
            "Input should be greater than or equal to 1",
        ),
        (
            GOOD.replace(
                "{model: sasrec, loss: ce}",
                "{model: sasrec, loss: ce, search: {samples: 2, space: {hidden: {uniform: [8, 64]}}}}",
            ),
            "uniform draws real numbers, but 'hidden' is an integer setting",
        ),
        (
            GOOD.replace(
                "{model: sasrec, loss: ce}",
                "{model: sasrec, loss: ce, search: {samples: 2, space: "
                "{lr: {loguniform: [0.001, 10000000000.0]}}}}",
            ),
            None,
        ),
        (
            "name: t\nx: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\ny: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
            "z: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nw: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
            "v: [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n",
            "expands to more than 100,000 values (YAML aliases?)",
        ),
        (GOOD + "compare: [[SASRec+, BERT4Rec]]\n", "compare[0]: unknown model 'BERT4Rec'"),
    ],
)
def test_bad_sweep_files_are_one_line_before_ray(tmp_path, text, message):
    path = _sweep(tmp_path, text)
    if message is None:  # a finite loguniform range whose ends are valid settings loads
        expand(load_spec(path), str(path))
        return
    with pytest.raises(UserError) as info:
        expand(load_spec(path), str(path))
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_grid_too_large_is_refused_without_building_it(tmp_path):
    spec = load_spec(
        _sweep(
            tmp_path,
            GOOD.replace(
                "{model: sasrec, loss: ce}",
                "{model: sasrec, loss: sampled_ce, negatives: [" + ", ".join(map(str, range(1, 1001))) + "]}",
            )
            + "seeds: ["
            + ", ".join(map(str, range(1000)))
            + "]\n",
        )
    )
    with pytest.raises(UserError, match="the grid has 1,000,000 trials, more than one sweep runs"):
        expand(spec)


def test_a_non_utf8_sweep_file_is_one_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_bytes(GOOD.encode() + b"\xff\xfe")
    with pytest.raises(UserError, match="not a UTF-8 text file"):
        load_spec(path)


def test_paths_never_escape_the_run_directory(tmp_path):
    # A searched dataset given by a relative path: the stage folder is one plain component.
    assert "/" not in stage_name("../data/mine.txt", 0) and ".." not in stage_name("../data/mine.txt", 0)
    # A dataset given by a relative path is made absolute once, where the sweep is loaded (Tune
    # runs each trial in a folder of its own).
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("1 1\n1 2\n1 3\n1 4\n")
    _sweep(tmp_path, GOOD.replace("[synthetic-chains]", "[d/mine.txt]"))
    previous = Path.cwd()
    os.chdir(tmp_path)
    try:
        assert load_spec(Path("s.yaml")).datasets == [str(tmp_path / "d" / "mine.txt")]
    finally:
        os.chdir(previous)


@pytest.mark.parametrize(
    "results_dir, message",
    [
        ("/etc", "a system folder cannot be a run directory"),
        ("/usr/share/raysweep", "a system folder cannot be a run directory"),
        ("HOME_NONEMPTY", "not empty and not a raysweep run directory"),
    ],
)
def test_results_must_be_a_folder_of_its_own(tmp_path, results_dir, message):
    if results_dir == "HOME_NONEMPTY":
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "thesis.tex").write_text("x")
        results_dir = tmp_path / "mine"
    path = _sweep(tmp_path, GOOD + f"results: {results_dir}\n")
    result = _cli("raysweep.run", path, "--dry-run")
    _one_line(result, message)


def test_an_unreachable_cluster_is_one_line_and_writes_nothing(tmp_path):
    path = _sweep(tmp_path, GOOD)
    result = _cli("raysweep.run", path, "--address", "127.0.0.1:1", "--results", tmp_path / "run", timeout=60)
    _one_line(result, "--address 127.0.0.1:1: no Ray cluster answers there")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "cpus, extra, message",
    [
        ("0", [], "--cpus 0: expected 1 to"),
        ("MORE", [], "the CPUs of this machine"),
        ("1", ["--address", "127.0.0.1:1"], "--cpus: only for a local Ray"),
        ("1", ["TWO_PER_TRIAL"], "asks for 2 CPUs and --cpus gives the local Ray 1"),
    ],
)
def test_cpus_that_cannot_work_are_one_line_and_write_nothing(tmp_path, cpus, extra, message):
    from raysweep.sweep.cluster import machine_cpus

    cpus = str(machine_cpus() + 1) if cpus == "MORE" else cpus
    text = GOOD + ("resources: {cpus: 2}\n" if "TWO_PER_TRIAL" in extra else "")
    extra = [a for a in extra if a != "TWO_PER_TRIAL"]
    path = _sweep(tmp_path, text)
    result = _cli("raysweep.run", path, "--cpus", cpus, *extra, "--results", tmp_path / "run")
    _one_line(result, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.sweep
@pytest.mark.end_to_end
def test_cpus_one_runs_the_trials_one_after_the_other(tmp_path):
    """Two one-core trials on a machine of two or more cores run side by side, unless --cpus 1
    gives the local Ray one core: then one starts after the other ended."""
    from raysweep.sweep.cluster import machine_cpus

    if machine_cpus() < 2:
        pytest.skip("needs a machine with two CPUs or more")
    text = GOOD.replace("models:", "seeds: [0, 1]\nmodels:")
    result = _cli("raysweep.run", _sweep(tmp_path, text), "--cpus", "1", "--results", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert "(CPUs 1, GPUs " in result.stdout
    records = [json.loads(p.read_text()) for p in (tmp_path / "run" / "trials").glob("*/result.json")]
    (a, b) = sorted((r["started_at"], r["finished_at"]) for r in records)
    assert a[1] <= b[0], f"the trials overlapped: {a} and {b}"


def test_an_unreadable_record_on_resume_is_one_line_before_ray(tmp_path):
    run_dir = tmp_path / "run"
    path = _sweep(tmp_path, GOOD)
    (run_dir / "trials" / "k").mkdir(parents=True)
    (run_dir / "spec.yaml").write_text(GOOD)
    (run_dir / "trials" / "k" / "result.json").write_text('{"key": "k", "status": ')
    result = _cli("raysweep.run", path, "--resume", "--results", run_dir)
    _one_line(result, "result.json: damaged trial record")
    assert "local Ray" not in result.stdout


def _run_dir_with_a_result(tmp_path) -> Path:
    from raysweep.core.config import TrialConfig, trial_key
    from raysweep.core.trial import run_trial
    from raysweep.sweep.records import finished_record

    cfg = TrialConfig.from_dict(
        dict(dataset="synthetic-chains", loss="ce", hidden=16, max_epochs=1, val_users=100)
    )
    result = run_trial(cfg)
    run_dir = tmp_path / "run"
    RunDir(run_dir).write_record(finished_record(result.summary(), trial_key(cfg), "seeds"), result)
    RunDir(run_dir).write_results()
    return run_dir


@pytest.mark.long
def test_the_report_reads_its_inputs_or_says_which_file_is_bad(tmp_path):
    run_dir = _run_dir_with_a_result(tmp_path)
    assert _cli("raysweep.report", run_dir).returncode == 0
    written = {p: p.read_bytes() for p in (run_dir / "report").iterdir()}
    # A missing history: one line naming it, and no file of the report replaced.
    [history] = list(run_dir.glob("trials/*/history.parquet"))
    history.unlink()
    _one_line(_cli("raysweep.report", run_dir), "history.parquet: the trial's training history is missing")
    assert {p: p.read_bytes() for p in (run_dir / "report").iterdir()} == written
    # A truncated or empty results table: one line naming it, and how to rebuild it.
    table = run_dir / "results.parquet"
    for damaged in (table.read_bytes()[:50], b""):
        table.write_bytes(damaged)
        _one_line(_cli("raysweep.report", run_dir), "results.parquet: unreadable results table")


def test_live_results_read_only_the_record_of_the_trial_that_ended(tmp_path, monkeypatch):
    run_dir = _run_dir_with_a_result(tmp_path)
    run = RunDir(run_dir)
    live = results.LiveResults(run, every=0)
    reads = []
    monkeypatch.setattr(run, "scan_records", lambda *a: pytest.fail("every record read again"))
    original = run.read_record
    monkeypatch.setattr(run, "read_record", lambda k: reads.append(k) or original(k))
    [key] = live.rows
    for _ in range(3):
        live.update(key)
    assert reads == [key] * 3 and len(pd.read_parquet(run_dir / "results.parquet")) == 1


def test_files_are_written_with_the_users_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f.json", lambda tmp: tmp.write_text(json.dumps({})))
    finally:
        os.umask(previous)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644


def test_memory_estimate_refuses_only_what_cannot_fit():
    from raysweep.core.memory import training_bytes

    beauty = dict(factors=128, num_users=40_226, num_items=54_542)
    paper = training_bytes("sasrec", "sampled_ce", 3000, 64, 2, 1, 50, 128, **beauty)
    assert paper < 2 * 2**30  # the paper's Beauty SASRec+ 3000 is far below any machine
    assert training_bytes("sasrec", "ce", None, 64, 10**9, 1, 50, 128, **beauty) > 10**15
    assert math.isfinite(paper)


def test_a_local_sweep_imports_no_ray_before_it_starts_one(tmp_path):
    """Ray reads its loopback switch when it is imported: anything that imports it before
    start_ray sets the switch opens Ray's ports beyond this machine."""
    pytest.importorskip("ray")
    spec = _sweep(tmp_path, GOOD)
    probe = f"""
import sys
from raysweep import run
from raysweep.sweep import cluster
def started(address, *options):
    print("ray imported before start_ray" if "ray" in sys.modules else "ray not yet imported")
    raise SystemExit(0)
cluster.start_ray = started
run.run_sweep({str(spec)!r}, results={str(tmp_path / "run")!r})
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ray not yet imported", out.stdout + out.stderr


def test_a_dry_run_downloads_nothing_and_names_what_is_not_here(tmp_path, offline_env):
    path = _sweep(tmp_path, GOOD.replace("[synthetic-chains]", "[synthetic-chains, ml-1m]"))
    result = subprocess.run(
        [sys.executable, "-m", "raysweep.run", str(path), "--dry-run", "--results", str(tmp_path / "r")],
        capture_output=True, text=True, env=offline_env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "downloading" not in result.stderr and not (tmp_path / "cache" / "ml-1m").exists()
    assert result.stdout.strip().splitlines()[-1] == (
        "not on this machine yet: ml-1m (a run downloads ml-1m.txt (9.1 MB) from the paper's repository "
        "on first use; its trials are unchecked)"
    )


def test_a_resumes_dry_run_says_which_trials_finished_before(tmp_path):
    run_dir = _run_dir_with_a_result(tmp_path)  # seed 0 of GOOD's one trial
    (run_dir / "spec.yaml").write_text(GOOD)
    path = _sweep(tmp_path, GOOD.replace("models:", "seeds: [0, 1]\nmodels:"))
    result = _cli("raysweep.run", path, "--resume", "--dry-run", "--results", run_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[1].split()[-1] == "before"
    assert lines[2].split()[-1] == "ok"
    assert lines[3].split()[-1].startswith("synthetic-chains-sasrec-ce-s1-")  # nothing before: blank
    assert lines[-1].endswith("; finished before: 1 of the 2 in the seeds stage")


SEARCHED = """
name: t
datasets: [synthetic-chains]
settings: {max_epochs: 1, val_users: 100, hidden: 16}
models:
  - model: bpr
    search: {samples: 3, space: {factors: {choice: [8, 16]}}}
"""


@pytest.mark.parametrize(
    "changed, message",
    [
        (GOOD.replace("max_epochs: 1", "max_epochs: 2"), "drops or changes this run's trial synthetic-"),
        (GOOD.replace("sasrec, loss: ce", "sasrec, loss: bce"), "drops or changes this run's trial"),
        (SEARCHED.replace("samples: 3", "samples: 4"), "changes this run's search search-synthetic-chains-0"),
        (
            SEARCHED.replace("models:", "models:\n  - {model: sasrec, loss: ce}"),
            "drops or changes this run's trial synthetic-chains-bpr-s0-",
        ),
    ],
)
def test_extend_refuses_a_sweep_file_that_changes_what_ran(tmp_path, changed, message):
    """--extend adds to a run; a file that would change a finished trial, or a search (its
    samples, or its place in the list: its stage's name), is refused before anything is written."""
    run_dir, started = tmp_path / "run", SEARCHED if "bpr" in changed else GOOD
    run_dir.mkdir()
    (run_dir / "spec.yaml").write_text(started)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    result = _cli("raysweep.run", _sweep(tmp_path, changed), "--extend", "--results", run_dir)
    _one_line(result, message)
    assert "--extend only adds trials to a run" in result.stderr
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    assert (run_dir / "spec.yaml").read_text() == started


def test_resume_with_a_changed_file_points_to_extend_and_extend_needs_a_run(tmp_path):
    run_dir = _run_dir_with_a_result(tmp_path)
    (run_dir / "spec.yaml").write_text(GOOD)
    more = _sweep(tmp_path, GOOD.replace("models:", "seeds: [0, 1]\nmodels:"))
    _one_line(
        _cli("raysweep.run", more, "--resume", "--results", run_dir),
        "the sweep file changed since this run started; resume with the same file, or pass --extend",
    )
    _one_line(
        _cli("raysweep.run", more, "--extend", "--results", tmp_path / "new"),
        "--extend adds trials to a run, and no run started here; drop --extend",
    )
    assert not (tmp_path / "new").exists()
    dry = _cli("raysweep.run", more, "--extend", "--dry-run", "--results", run_dir)
    assert dry.returncode == 0, dry.stderr
    assert "--extend: 1 Table 2 runs planned before, 2 now" in dry.stdout
    assert dry.stdout.strip().endswith("; finished before: 1 of the 2 in the seeds stage")


def test_the_dry_run_table_counts_search_samples_and_aligns_a_path_dataset(tmp_path):
    own = tmp_path / "a-long-folder-name" / "mine.txt"
    own.parent.mkdir()
    own.write_text("".join(f"{u} {i}\n" for u in range(1, 40) for i in range(1, 12)))
    spec = f"""
name: t
datasets: [synthetic-chains, {own}]
seeds: [0]
settings: {{max_epochs: 1, val_users: 20, hidden: 16}}
models:
  - {{model: sasrec, loss: ce}}
  - model: bpr
    seeds: [0, 1, 2]
    search: {{samples: 4, space: {{factors: {{choice: [8, 16]}}}}}}
"""
    result = _cli("raysweep.run", _sweep(tmp_path, spec), "--dry-run", "--results", tmp_path / "r")
    assert result.returncode == 0, result.stderr
    table = result.stdout.strip().splitlines()[1:-1]
    assert len({line.index("GPU") for line in table[1:]}) == 1  # one column, whatever the dataset's length
    assert sum("4 samples, then seeds 0, 1, 2" in line for line in table) == 2
    assert (
        result.stdout.strip()
        .splitlines()[-1]
        .startswith("16 trials at most: 2 in the seeds stage, 8 search samples in 2 searches, then 6 runs")
    )


QUIET = (  # a search stage (Optuna) and MLflow tracking beside a trial
    GOOD
    + """  - model: bpr
    settings: {factors: 8, iterations: 3}
    search: {samples: 1, space: {factors: {choice: [8]}}}
tracking: mlflow
"""
)


@pytest.mark.sweep
@pytest.mark.end_to_end
@pytest.mark.parametrize("verbose", [False, pytest.param(True, marks=pytest.mark.long)])
def test_a_normal_run_prints_raysweeps_lines_only(tmp_path, verbose):
    """Ray's token-authentication notice, Tune's result-file lines, Optuna's new-study line and
    MLflow's INFO lines are left out unless --verbose (token auth on, as a user has it)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"} | {"HOME": str(tmp_path)}
    args = [str(_sweep(tmp_path, QUIET)), "--results", str(tmp_path / "run"), *(["--verbose"] * verbose)]
    result = subprocess.run(
        [sys.executable, "-m", "raysweep.run", *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr
    lines = (result.stdout + result.stderr).strip().splitlines()
    foreign = [line for line in lines if not line.startswith("[raysweep]")]
    if verbose:
        assert any("Token authentication is enabled" in line for line in foreign)
        assert any("A new study created" in line for line in foreign)
    else:
        assert foreign == []
