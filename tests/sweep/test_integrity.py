"""Evidence that cannot be forged or mislabelled: archives and records are checked before they
are believed, an interrupted or changed run never reads as complete, paths resolve before they
are judged, and a local sweep sends nothing beyond this machine."""

import json
import os
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import NEEDS_RAY

from raysweep.core.config import TrialConfig, trial_key
from raysweep.core.errors import UserError
from raysweep.report import render as report
from raysweep.run import run_sweep
from raysweep.sweep import archive
from raysweep.sweep.records import TrialRecord
from raysweep.sweep.rundir import RunDir

SPEC = "name: forged\ndatasets: [synthetic-chains]\nmodels: [{model: sasrec, loss: ce}]\n"


def _record(dataset="synthetic-chains", seed=0, loss="ce", ndcg=0.2) -> tuple[TrialRecord, np.ndarray]:
    cfg = TrialConfig.from_dict({"dataset": dataset, "model": "sasrec", "loss": loss, "seed": seed})
    ranks = np.arange(50, dtype=np.int32) % 20
    test = {"hr@10": 0.0533, "ndcg@10": ndcg, "mrr@10": 0.1, "hr@100": 0.9, "ndcg@100": 0.3, "mrr@100": 0.1}
    record = TrialRecord(
        key=trial_key(cfg),
        stages=["seeds"],
        status="ok",
        label=cfg.label,
        config=cfg.to_dict(),
        val={"ndcg@10": 0.2},
        test=test,
        best_epoch=2,
        epochs=3,
        train_seconds=3.0,
        seconds_per_epoch=1.0,
    )
    return record, ranks


def _run_dir(tmp_path: Path, records, name="run") -> Path:
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "spec.yaml").write_text(SPEC)
    for record, ranks in records:
        RunDir(run_dir).write_record(record, history=[{"epoch": 1, "val_ndcg@10": 0.1}], ranks=ranks)
    RunDir(run_dir).write_results()
    return run_dir


def _forge(source: Path, target: Path, change) -> Path:
    """A copy of the archive `source` with `change(rows)` applied to its rows (dicts)."""
    table = pq.read_table(source)
    rows = table.to_pylist()
    change(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), target)
    return target


def _packed(tmp_path: Path) -> Path:
    run_dir = _run_dir(tmp_path, [_record(seed=0), _record(seed=1)], name="source")
    archive.pack(run_dir, tmp_path / "good.parquet")
    return tmp_path / "good.parquet"


def _set_key(key):
    def change(rows):
        record = json.loads(rows[0]["record"])
        record["key"] = rows[0]["key"] = key
        rows[0]["record"] = json.dumps(record)

    return change


@pytest.mark.parametrize(
    "key",
    ["/tmp/raysweep-planted/k", "..", "../../other-run/trials/KEY", "", "a\x00b", "sub/dir"],
)
def test_an_archive_key_is_never_a_path(tmp_path, key):
    forged = _forge(_packed(tmp_path), tmp_path / "forged.parquet", _set_key(key))
    neighbour = _run_dir(tmp_path, [], name="other-run")
    with pytest.raises(UserError, match="damaged archive, nothing was written") as error:
        archive.unpack(forged, tmp_path / "target" / "run")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "target").exists() and not Path("/tmp/raysweep-planted").exists()
    assert not (neighbour / "trials").exists()


def test_an_archive_key_must_be_the_one_its_settings_give(tmp_path):
    good = _packed(tmp_path)
    other = json.loads(pq.read_table(good).to_pylist()[1]["record"])["key"]
    forged = _forge(good, tmp_path / "forged.parquet", _set_key(other))  # another trial's key
    with pytest.raises(UserError, match="is not the one its settings give"):
        archive.unpack(forged, tmp_path / "target")
    assert not (tmp_path / "target").exists()


def _in_record(change):
    def apply(rows):
        record = json.loads(rows[1]["record"])
        change(record)
        rows[1]["record"] = json.dumps(record)

    return apply


@pytest.mark.parametrize(
    "change, message",
    [
        (_in_record(lambda r: r["test"].pop("ndcg@10")), "test metrics"),
        (_in_record(lambda r: r.pop("test")), "test metrics"),
        (_in_record(lambda r: r.update(config=[1, 2])), "settings are a list"),
        (_in_record(lambda r: r.update(best_epoch="3")), "epochs"),
        (_in_record(lambda r: r["test"].update({"hr@10": float("nan")})), "test metrics"),
        (lambda rows: rows[1].update(history='[{"epoch": "one"}]'), "history"),
        (lambda rows: rows[1].update(history="not json"), "Expecting value"),
        (lambda rows: rows[1].update(ranks=[-1, 2]), "negative test rank"),
    ],
    ids=["no-ndcg", "no-test", "config-list", "epoch-string", "nan", "history", "history-json", "rank"],
)
def test_a_malformed_archive_is_refused_whole_before_anything_is_written(tmp_path, change, message):
    good = _packed(tmp_path)
    forged = _forge(good, tmp_path / "forged.parquet", change)
    target = tmp_path / "target"
    with pytest.raises(UserError, match="row 1: ") as error:
        archive.unpack(forged, target)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not target.exists()
    archive.unpack(good, target)  # nothing was left behind: the good archive then goes in at once
    assert len(list((target / "trials").glob("*/result.json"))) == 2


def test_an_archive_with_ranks_as_text_is_refused(tmp_path):
    good = pq.read_table(_packed(tmp_path))
    table = good.set_column(3, "ranks", pa.array([str(r) for r in good.column("ranks").to_pylist()]))
    pq.write_table(table.replace_schema_metadata(good.schema.metadata), tmp_path / "text.parquet")
    with pytest.raises(UserError, match="its columns are .*not a raysweep archive's"):
        archive.unpack(tmp_path / "text.parquet", tmp_path / "target")
    assert not (tmp_path / "target").exists()


def test_unpack_waits_for_no_one_it_refuses_beside_a_live_driver(tmp_path):
    good = _packed(tmp_path)
    run_dir = tmp_path / "live"
    run_dir.mkdir()
    with RunDir(run_dir).lock(), pytest.raises(UserError, match="another raysweep process"):
        archive.unpack(good, run_dir)
    assert not (run_dir / "trials").exists()


def _shown(run_dir: Path) -> str:
    report.write_report(RunDir(run_dir))
    return (run_dir / "report" / "table2.md").read_text()


@pytest.mark.parametrize(
    "change",
    [
        '"ndcg@10": NaN',
        '"ndcg@10": Infinity',
        '"ndcg@10": 1e400',
        '"ndcg@10": null',
        '"ndcg@10": "0.2"',
        '"ndcg@10": -0.1',
        '"ndcg@10": 1.5',
        '"best_epoch": -1',
        '"seed": 1.5',
    ],
)
def test_a_record_with_impossible_values_is_listed_as_damaged_never_counted(tmp_path, change):
    good, ranks = _record(dataset="beauty", seed=0, ndcg=0.0327)  # the paper's SASRec+ on Beauty
    bad, _ = _record(dataset="beauty", seed=1)
    run_dir = _run_dir(tmp_path, [(good, ranks)])
    name, value = change.split(": ")
    text = bad.to_json()
    for old in ('"ndcg@10": 0.2', '"best_epoch": 2', '"seed": 1'):
        if old.startswith(name):
            text = text.replace(old, change)
    (run_dir / "trials" / bad.key).mkdir()
    (run_dir / "trials" / bad.key / "result.json").write_text(text)
    RunDir(run_dir).write_results()
    shown = _shown(run_dir)
    row = next(line for line in shown.splitlines() if line.startswith("| SASRec+ |"))
    assert row.startswith("| SASRec+ | 1 |") and "0.0327 (paper 0.0327, +0.0 %)" in row  # the good seed
    assert "## Damaged records (not counted)" in shown and bad.key in shown
    assert "nan %" not in shown


def test_a_hand_edited_results_table_is_not_believed(tmp_path):
    import pandas as pd

    run_dir = _run_dir(tmp_path, [_record(seed=0), _record(seed=1)])
    table = pd.read_parquet(run_dir / "results.parquet")
    table["seed"] = ["zero", "1"]
    table.loc[1, "test_ndcg@10"] = float("nan")
    table.to_parquet(run_dir / "results.parquet")
    shown = _shown(run_dir)
    assert "reproduced" not in shown and "No trial has finished yet." in shown
    assert shown.count("edited by hand") == 2


def test_a_damaged_plan_or_record_is_one_line_for_report_rebuild(tmp_path):
    run_dir = _run_dir(tmp_path, [_record(seed=0)])
    (run_dir / "plan.json").write_text(json.dumps({"stages": {"seeds": [1, 2]}}))
    result = subprocess.run(
        [sys.executable, "-m", "raysweep.report", str(run_dir), "--rebuild"], capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "damaged sweep plan" in result.stderr


def test_a_huge_label_is_damage_not_a_legend(tmp_path):
    good, ranks = _record(seed=0)
    bad, _ = _record(seed=1)
    run_dir = _run_dir(tmp_path, [(good, ranks)])
    bad.label = "x" * 30_000_000
    (run_dir / "trials" / bad.key).mkdir()
    (run_dir / "trials" / bad.key / "result.json").write_text(bad.to_json())
    RunDir(run_dir).write_results()
    shown = _shown(run_dir)
    assert "is not its settings' (SASRec+)" in shown and len(shown) < 20_000


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_no_value_reaches_the_page_as_markup(tmp_path):
    """A dataset path holding markup, and a forged label, end up as text on the page."""
    folder = tmp_path / '"><script>alert(1)<'
    folder.mkdir()
    data = folder / "script><img src=x onerror=alert(2)>.txt"
    data.write_text("".join(f"{u} {i}\n" for u in range(1, 30) for i in range(1, 8)))
    record, ranks = _record(dataset=str(data))
    forged, _ = _record(dataset=str(data), seed=1)
    run_dir = _run_dir(tmp_path, [(record, ranks)])
    forged.label = "<img src=y onerror=alert(3)>"
    (run_dir / "trials" / forged.key).mkdir()
    (run_dir / "trials" / forged.key / "result.json").write_text(forged.to_json())
    RunDir(run_dir).write_results()
    report.write_report(RunDir(run_dir))
    page = (run_dir / "report" / "index.html").read_text()
    parser = _Tags()
    parser.feed(page)
    assert "script" not in {tag for tag, _ in parser.tags}
    assert not [attrs for _, attrs in parser.tags if any(name.startswith("on") for name in attrs)]
    assert all(
        attrs.get("src", "data:").startswith("data:image/png") for tag, attrs in parser.tags if tag == "img"
    )
    assert "&lt;script&gt;alert(1)" in page and "onerror=alert(3)" in page  # shown, as text


@pytest.mark.long
@pytest.mark.parametrize("how", ["link", "dotdot"])
def test_system_folders_are_judged_after_links_and_dotdot(tmp_path, how):
    link = tmp_path / "link"
    link.symlink_to("/etc")
    target = link / "x" if how == "link" else tmp_path / ("../" * 20) / "etc" / "x"
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC)
    good = _packed(tmp_path)
    run_dir = _run_dir(tmp_path, [_record()], "packable")
    for command in (
        ["raysweep.run", str(spec), "--results", str(target), "--dry-run"],
        ["raysweep.archive", "unpack", str(good), str(target)],
        ["raysweep.archive", "pack", str(run_dir), str(target / "a.parquet")],
        ["raysweep.train", "--dataset", "synthetic-chains", "--model", "bpr", "--out", str(target)],
    ):
        result = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (command, result.stderr)
        assert "a system folder cannot be" in result.stderr and "resolves to /etc/x" in result.stderr
        assert result.stderr.strip().count("\n") == 0, result.stderr


def _dry_run(tmp_path, text: str) -> subprocess.CompletedProcess:
    spec = tmp_path / "s.yaml"
    spec.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "raysweep.run", str(spec), "--dry-run", "--results", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "text, message",
    [
        (SPEC + "resources: {cpus: 1000}\n", "resources.cpus: each trial asks for 1000 CPUs"),
        (SPEC + "resources: {cpus: .inf}\n", "resources.cpus: Input should be a finite number"),
        (SPEC + "seeds: [18446744073709551617]\n", "setting 'seed': Input should be less than 4294967296"),
        (SPEC + "seeds: [-1]\n", "setting 'seed': Input should be greater than or equal to 0"),
        (SPEC + "settings: {extra: {day: 2024-01-01}}\n", "extra must hold plain JSON values"),
        (
            "name: x\ndatasets: [/tmp/" + "a" * 300 + ".txt]\nmodels: [{model: sasrec, loss: ce}]\n",
            "cannot be a data file (File name too long)",
        ),
        (
            SPEC.replace("loss: ce}", "loss: ce, datasets: []}"),
            "models[0].datasets: List should have at least 1 item",
        ),
    ],
    ids=["cpus", "inf", "seed-big", "seed-negative", "date", "long-name", "no-datasets"],
)
def test_impossible_sweeps_are_one_line_at_dry_run(tmp_path, text, message):
    result = _dry_run(tmp_path, text)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert not (tmp_path / "r").exists()


def test_yaml_merge_keys_and_yaml_12_floats(tmp_path):
    result = _dry_run(
        tmp_path,
        "name: x\ndatasets: [synthetic-chains]\nsettings: &budget {max_epochs: 3, lr: 1e-3}\n"
        "models:\n  - {model: sasrec, loss: ce, settings: {<<: *budget, max_epochs: 5}}\n",
    )
    assert result.returncode == 0, result.stderr
    from raysweep.sweep.spec import expand, load_spec

    [trial] = expand(load_spec(tmp_path / "s.yaml"))
    assert trial.config.lr == 0.001 and trial.config.max_epochs == 5


def test_a_resume_on_changed_data_is_refused_before_ray(tmp_path):
    data = tmp_path / "mine.txt"
    data.write_text("".join(f"{u} {i}\n" for u in range(1, 30) for i in range(1, 8)))
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: x\ndatasets: [{data}]\nmodels: [{{model: sasrec, loss: ce}}]\n")
    run_dir = tmp_path / "run"
    run_sweep(spec, dry_run=True, results=run_dir)  # checks, and hashes the file
    run_dir.mkdir()
    (run_dir / "spec.yaml").write_bytes(spec.read_bytes())
    from raysweep.core.data import load_interactions
    from raysweep.core.split import leave_one_out

    digest = leave_one_out(load_interactions(str(data)), str(data)).sha256()
    plan = {"stages": {"seeds": {"kind": "seeds", "trials": []}}, "data": {str(data): digest}}
    (run_dir / "plan.json").write_text(json.dumps(plan))
    run_sweep(spec, dry_run=True, resume=True, results=run_dir)  # the same data: accepted
    data.write_text(data.read_text().replace("29 7\n", "29 6\n29 7\n"))
    with pytest.raises(UserError, match=f"dataset {data} changed since this run started"):
        run_sweep(spec, dry_run=True, resume=True, results=run_dir)
    assert RunDir(run_dir).read_plan()["data"] == {str(data): digest}


def test_a_trial_records_the_hash_of_what_it_read(tmp_path):
    from raysweep.core.data import load_interactions
    from raysweep.core.split import leave_one_out
    from raysweep.core.trial import run_trial

    cfg = TrialConfig.from_dict(
        {"dataset": "synthetic-chains", "model": "sasrec", "loss": "ce", "max_epochs": 1, "hidden": 8}
    )
    result = run_trial(cfg)
    expected = leave_one_out(load_interactions("synthetic-chains"), "synthetic-chains").sha256()
    assert result.summary()["data_sha256"] == expected and len(expected) == 64


# --- Whole sweeps: interruptions at each stage boundary, SIGTERM, and the network ---------------

SEARCHED = """
name: searched
datasets: [synthetic-chains]
settings: {max_epochs: 2, patience: 2, val_users: 200, hidden: 16}
models:
  - {model: sasrec, loss: ce}
  - model: bpr
    seeds: [0, 1]
    settings: {factors: 8, iterations: 5}
    search: {samples: 2, seed: 0, space: {factors: {choice: [8, 16]}}}
resources: {cpus: 1}
"""


def _driver(tmp_path, env: dict, text: str = SEARCHED, wait_for: str | None = None, sig=None):
    spec = tmp_path / "s.yaml"
    spec.write_text(text)
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "raysweep.run", str(spec), "--results", str(run_dir)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        if wait_for is not None and wait_for in line:
            process.send_signal(sig)
            wait_for = None
    process.wait(timeout=600)
    return process.returncode, "".join(lines), run_dir


@pytest.mark.sweep
@pytest.mark.parametrize(
    "point, code, state",
    [
        ("search-end", 130, "incomplete: 3 trial(s) not run"),
        ("seeds-end", 0, "complete"),
    ],
)
def test_a_signal_at_a_stage_boundary_reads_as_what_it_is(tmp_path, point, code, state):
    pytest.importorskip("ray", reason=NEEDS_RAY)
    returncode, out, run_dir = _driver(tmp_path, {"RAYSWEEP_SIGNAL_DRIVER_AT": point})
    assert returncode == code, out
    page = (run_dir / "report" / "index.html").read_text()
    assert f"the sweep is {state}" in page, page
    shown = (run_dir / "report" / "table2.md").read_text()
    if code:
        assert "INTERRUPTED (SIGINT)" in out and "BPR-MF seed 1 (the best setting of search-" in shown
        assert "(the sweep is complete)" not in page
    else:
        assert "INTERRUPTED" not in out and "Missing trials" not in shown


@pytest.mark.sweep
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_in_the_seeds_stage_lists_the_searched_model_as_missing(tmp_path, signame):
    pytest.importorskip("ray", reason=NEEDS_RAY)
    slow = SEARCHED.replace("max_epochs: 2, patience: 2", "max_epochs: 400, patience: 400")
    returncode, out, run_dir = _driver(
        tmp_path, {}, slow, wait_for="start  synthetic-chains SASRec+", sig=getattr(signal, signame)
    )
    assert returncode == 128 + getattr(signal, signame), out
    assert f"INTERRUPTED ({signame}): the sweep is incomplete" in out and "--resume" in out
    shown = (run_dir / "report" / "table2.md").read_text()
    assert "**The sweep is incomplete" in shown
    missing = shown.split("## Missing trials")[1]
    assert "SASRec+ seed 0" in missing and "BPR-MF seed" in missing, shown


NETWORK_AUDIT = """
import json, os, sys
def hook(event, args):
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        where = args[1]
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
                   "socket.gethostbyaddr"):
        where = args[0]
    else:
        return
    where = where[0] if isinstance(where, tuple) else where
    if isinstance(where, bytes):
        where = where.decode(errors="replace")
    with open(os.environ["RAYSWEEP_NET_LOG"], "a") as log:
        log.write(json.dumps([os.path.basename(sys.argv[0] or "?"), event, where], default=repr) + "\\n")
sys.addaudithook(hook)
"""


@pytest.mark.sweep
def test_a_local_sweep_contacts_nothing_beyond_loopback(tmp_path):
    """Every connect and name lookup of every Python process of a local sweep (driver, Ray's
    dashboard and agents, workers, trials), recorded by an audit hook that each one loads."""
    import ipaddress

    pytest.importorskip("ray", reason=NEEDS_RAY)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(NETWORK_AUDIT)
    log = tmp_path / "net.log"
    path = os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])
    env = {"PYTHONPATH": path, "RAYSWEEP_NET_LOG": str(log), "RAY_ADDRESS": ""}
    returncode, out, run_dir = _driver(tmp_path, env)
    time.sleep(2)
    assert returncode == 0, out
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(process == "dashboard.py" for process, _, _ in events), "the audit saw no Ray process"
    outside = []
    for process, event, host in events:
        if not isinstance(host, str) or host.startswith("/") or host == "" or "\x00" in host:
            continue  # a Unix socket
        try:
            loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            outside.append((process, event, host))
    assert not outside, outside


@pytest.mark.sweep
def test_an_untracked_sweep_imports_no_mlflow(tmp_path):
    pytest.importorskip("ray", reason=NEEDS_RAY)
    home = tmp_path / "home"
    home.mkdir()
    returncode, out, _ = _driver(tmp_path, {"HOME": str(home), "RAYSWEEP_DATA_DIR": str(tmp_path / "d")})
    assert returncode == 0, out
    assert not (home / ".config" / "mlflow").exists()
