"""The integrity probes: seventeen ways a report could lie, write outside its run, or crash, each
run as a user would run it (a command line), printed as a Markdown table row: the probe, the
command, its exit code and the first line it printed.

    PYTHONPATH=<a raysweep tree> python benchmarks/integrity.py [--quick] > probes.md

It uses only the command lines and the trial-key function, so it runs against any raysweep
tree, before a fix and after it. `--quick` leaves out the probes that run whole local sweeps
(interruptions, SIGTERM, the network record, MLflow's import), which take minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SPEC = "name: probe\ndatasets: [synthetic-chains]\nmodels: [{model: sasrec, loss: ce}]\n"
BUDGET = "settings: {max_epochs: 2, patience: 2, val_users: 200, hidden: 16}\n"
SEARCHED = (
    "name: probe\ndatasets: [synthetic-chains]\n" + BUDGET + "models:\n  - {model: sasrec, loss: ce}\n"
    "  - model: bpr\n    seeds: [0, 1]\n    settings: {factors: 8, iterations: 5}\n"
    "    search: {samples: 2, seed: 0, space: {factors: {choice: [8, 16]}}}\nresources: {cpus: 1}\n"
)
AUDIT = """
import json, os, sys
def hook(event, args):
    if event in ("socket.connect", "socket.sendto"):
        where = args[1]
    elif event == "socket.getaddrinfo":
        where = args[0]
    else:
        return
    where = where[0] if isinstance(where, tuple) else where
    with open(os.environ["PROBE_NET_LOG"], "a") as log:
        log.write(json.dumps([os.path.basename(sys.argv[0] or "?"), event, where], default=repr) + "\\n")
sys.addaudithook(hook)
"""


def record(dataset: str = "beauty", seed: int = 0, ndcg: float = 0.0327) -> dict:
    try:
        from raysweep.core.config import TrialConfig, trial_key
    except ImportError:  # a tree from before the three sub-packages
        from raysweep.config import TrialConfig, trial_key

    cfg = TrialConfig.from_dict({"dataset": dataset, "model": "sasrec", "loss": "ce", "seed": seed})
    return {
        "key": trial_key(cfg),
        "stages": ["seeds"],
        "status": "ok",
        "label": cfg.label,
        "config": cfg.to_dict(),
        "val": {"ndcg@10": 0.03},
        "test": {"hr@10": 0.0533, "ndcg@10": ndcg, "mrr@10": 0.02, "hr@100": 0.13, "ndcg@100": 0.05},
        "best_epoch": 2,
        "epochs": 3,
        "train_seconds": 3.0,
    }


def archive(path: Path, records: list[dict], plan: dict | None = None) -> Path:
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("record", pa.string()),
            ("history", pa.string()),
            ("ranks", pa.list_(pa.int32())),
        ],
        metadata={
            b"raysweep.spec": SPEC.encode(),
            b"raysweep.plan": json.dumps(plan).encode() if plan else b"",
        },
    )
    rows = [
        {
            "key": r["key"],
            "record": json.dumps(r),
            "history": '[{"epoch": 1, "val_ndcg@10": 0.1}]',
            "ranks": [1, 5],
        }
        for r in records
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def run(args: list[str], env: dict | None = None, timeout: int = 600) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or "Error" in line or "INTERRUPTED" in line]
    return result.returncode, (errors or lines or [""])[-1 if not errors else 0]


def forged_record_report(tmp: Path, name: str, forged_text: str) -> tuple[int, str]:
    """A run of two good records, one of whose result.json is then replaced by `forged_text`, reported
    with --rebuild: the SASRec+ row of Table 2 (does it count the forged seed? its verdict?)."""
    run_dir = tmp / name
    records = [record(seed=0), record(seed=1)]
    code, line = run(
        ["raysweep.archive", "unpack", str(archive(tmp / f"{name}.parquet", records)), str(run_dir)]
    )
    if code:
        return code, line
    (run_dir / "trials" / records[1]["key"] / "result.json").write_text(forged_text)
    code, line = run(["raysweep.report", str(run_dir), "--rebuild"])
    table = (
        (run_dir / "report" / "table2.md").read_text() if (run_dir / "report" / "table2.md").is_file() else ""
    )
    row = next((r for r in table.splitlines() if r.startswith("| SASRec+ |")), "")
    cells = [c.strip() for c in row.split("|")]
    shown = f"seeds {cells[2]}, NDCG@10 {cells[5]}, verdict {cells[-2]}" if row else line
    return code, shown + (" [listed as damaged]" if "Damaged records" in table else "")


def sweep(tmp: Path, name: str, text: str, env: dict | None = None, signal_on: str | None = None, sig=None):
    spec = tmp / f"{name}.yaml"
    spec.write_text(text)
    run_dir = tmp / name
    process = subprocess.Popen(
        [sys.executable, "-m", "raysweep.run", str(spec), "--results", str(run_dir)],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip())
        if signal_on and signal_on in line and ("Wrote the latest" in line or signal_on != "/seeds-"):
            process.send_signal(sig)
            signal_on = None
    process.wait(timeout=900)
    page = (
        (run_dir / "report" / "index.html").read_text()
        if (run_dir / "report" / "index.html").is_file()
        else ""
    )
    status = page.split('<p id="progress">')[1].split("</p>")[0] if '<p id="progress">' in page else "no page"
    said = next((line for line in lines if "INTERRUPTED" in line), "")
    return process.returncode, f"{said[:90]} | page: {status}"


def probes(tmp: Path, quick: bool):
    good = record(seed=0)
    yield (
        "1 archive key absolute",
        *run(
            [
                "raysweep.archive",
                "unpack",
                str(archive(tmp / "k1.parquet", [{**good, "key": "/tmp/raysweep-probe/k"}])),
                str(tmp / "r1"),
            ]
        ),
    )
    for key, tag in (("..", "1 archive key .."), ("../../other-run/trials/KEY", "1 archive key ../../other")):
        yield (
            tag,
            *run(
                [
                    "raysweep.archive",
                    "unpack",
                    str(archive(tmp / "k.parquet", [{**good, "key": key}])),
                    str(tmp / "r1b" / "run"),
                ]
            ),
        )
    for value, tag in (
        ("NaN", "2 NaN NDCG@10"),
        ("Infinity", "2 inf NDCG@10"),
        ('"0.2"', "2 string NDCG@10"),
    ):
        forged = record(seed=1)
        forged["test"]["ndcg@10"] = "@@"
        yield tag, *forged_record_report(tmp, f"r2-{tag[2:5]}", json.dumps(forged).replace('"@@"', value))
    spec = tmp / "data.yaml"
    data = tmp / "mine.txt"
    data.write_text("".join(f"{u} {i}\n" for u in range(1, 30) for i in range(1, 8)))
    spec.write_text(
        f"name: d\ndatasets: [{data}]\n{BUDGET}"
        "models: [{model: sasrec, loss: ce}]\nresources: {cpus: 1}\n"
    )
    if not quick:
        code, line = run(["raysweep.run", str(spec), "--results", str(tmp / "r4")])
        data.write_text(data.read_text().replace("29 7\n", "29 6\n29 7\n"))
        yield (
            "4 resume after the data changed",
            *run(["raysweep.run", str(spec), "--resume", "--results", str(tmp / "r4")]),
        )
    no_test = record(seed=1)
    del no_test["test"]
    yield (
        "5 unpack, a record without test metrics",
        *run(
            ["raysweep.archive", "unpack", str(archive(tmp / "m.parquet", [good, no_test])), str(tmp / "r5")]
        ),
    )
    listed = record(seed=1)
    listed["config"] = [1, 2]
    yield (
        "5 unpack, settings a list",
        *run(
            ["raysweep.archive", "unpack", str(archive(tmp / "m2.parquet", [good, listed])), str(tmp / "r5b")]
        ),
    )
    (tmp / "r6").mkdir()
    from filelock import FileLock

    with FileLock(tmp / "r6" / ".lock"):
        yield (
            "6 unpack beside a live driver",
            *run(["raysweep.archive", "unpack", str(archive(tmp / "l.parquet", [good])), str(tmp / "r6")]),
        )
    folder = tmp / '"><script>alert(1)<'
    folder.mkdir()
    evil = folder / "script>.txt"
    evil.write_text(data.read_text())
    code, line = run(
        [
            "raysweep.archive",
            "unpack",
            str(archive(tmp / "x.parquet", [record(dataset=str(evil))])),
            str(tmp / "r7"),
        ]
    )
    code, line = run(["raysweep.report", str(tmp / "r7")])
    page = (
        (tmp / "r7" / "report" / "index.html").read_text()
        if (tmp / "r7" / "report" / "index.html").is_file()
        else ""
    )
    yield "7 markup in a dataset path", code, f"page holds a <script> tag: {'<script>' in page}"
    link = tmp / "link"
    link.symlink_to("/etc")
    yield (
        "8 --results LINK/x (LINK -> /etc)",
        *run(["raysweep.run", str(tmp / "data.yaml"), "--results", str(link / "x"), "--dry-run"]),
    )
    yield (
        "8 unpack into /tmp/a/../../etc/x",
        *run(["raysweep.archive", "unpack", str(archive(tmp / "s.parquet", [good])), "/tmp/a/../../etc/x"]),
    )
    if not quick:
        hooks = tmp / "hooks"
        hooks.mkdir()
        (hooks / "sitecustomize.py").write_text(AUDIT)
        log = tmp / "net.log"
        env = {
            "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]),
            "PROBE_NET_LOG": str(log),
        }
        code, _ = sweep(tmp, "r9", SPEC + BUDGET, env)
        seen = sorted(
            {
                (p, e, w)
                for p, e, w in map(json.loads, log.read_text().splitlines())
                if isinstance(w, str) and not w.startswith("/")
            }
        )
        outside = sorted({w for _, _, w in seen if w not in ("127.0.0.1", "localhost", "::1")})
        yield "9 a local sweep's connects and lookups", code, f"beyond loopback: {outside or 'none'}"
        yield (
            "10 SIGTERM once a trial runs",
            *sweep(
                tmp,
                "r10",
                SEARCHED.replace("max_epochs: 2, patience: 2", "max_epochs: 400, patience: 400"),
                signal_on="start  synthetic-chains",
                sig=signal.SIGTERM,
            ),
        )
    bad_plan = tmp / "r11"
    code, line = run(
        [
            "raysweep.archive",
            "unpack",
            str(archive(tmp / "p.parquet", [good], {"stages": {"seeds": [1]}})),
            str(bad_plan),
        ]
    )
    yield (
        "11 report --rebuild, plan stages not mappings",
        *(run(["raysweep.report", str(bad_plan), "--rebuild"]) if code == 0 else (code, line)),
    )
    for text, tag in (
        (SPEC + "resources: {cpus: 1000}\n", "12 resources cpus 1000"),
        (SPEC + "resources: {cpus: .inf}\n", "12 resources cpus .inf"),
        (SPEC + "seeds: [18446744073709551617]\n", "13 seed 2^64+1"),
        (SPEC + "seeds: [-1]\n", "13 seed -1"),
        (SPEC + "settings: {extra: {day: 2024-01-01}}\n", "13 a date in settings.extra"),
        (
            "name: x\ndatasets: [/tmp/" + "a" * 300 + ".txt]\nmodels: [{model: sasrec, loss: ce}]\n",
            "14 a 300-byte file name",
        ),
        (
            "name: x\ndatasets: [synthetic-chains]\nsettings: &b {max_epochs: 3}\nmodels:\n"
            "  - {model: sasrec, loss: ce, settings: {<<: *b, patience: 2}}\n",
            "15 YAML merge key",
        ),
        (SPEC + "settings: {lr: 1e-3}\n", "16 lr: 1e-3"),
        (SPEC.replace("loss: ce}", "loss: ce, datasets: []}"), "17 an entry with datasets: []"),
    ):
        path = tmp / "p.yaml"
        path.write_text(text)
        yield tag, *run(["raysweep.run", str(path), "--dry-run", "--results", str(tmp / "r12")])
    if not quick:
        home = tmp / "home"
        home.mkdir()
        code, _ = sweep(tmp, "r17", SPEC + BUDGET, {"HOME": str(home)})
        yield (
            "17 MLflow without tracking",
            code,
            f"~/.config/mlflow written: {(home / '.config' / 'mlflow').exists()}",
        )
    # (signals from outside, on the driver's own lines, so that any version can be probed)
    for cue, tag, name in (
        ("best {", "3 SIGINT between search and seeds", "r3-between"),
        ("/seeds-", "3 SIGINT after the last trial", "r3-last"),
    ):
        if quick:
            continue
        yield tag, *sweep(tmp, name, SEARCHED, signal_on=cue, sig=signal.SIGINT)
    if not quick:
        yield (
            "3 SIGINT once the seeds stage runs",
            *sweep(
                tmp,
                "r3-first",
                SEARCHED.replace("max_epochs: 2, patience: 2", "max_epochs: 400, patience: 400"),
                signal_on="start  synthetic-chains SASRec+",
                sig=signal.SIGINT,
            ),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="leave out the probes that run whole sweeps")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as folder:
        os.environ["RAYSWEEP_DATA_DIR"] = str(Path(folder) / "cache")
        print("| probe | exit | what it printed |\n|---|---|---|", flush=True)
        for name, code, line in probes(Path(folder), args.quick):
            shown = line.replace(folder, "$TMP").replace("|", "/")[:160]
            print(f"| {name} | {code} | {shown} |", flush=True)
            time.sleep(0.1)


if __name__ == "__main__":
    main()
