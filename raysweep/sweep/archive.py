"""A run's finished trials in one Parquet file, to commit beside its report or carry to another
machine, and back into a run directory that `--resume` finishes.

    python -m raysweep.archive pack RUN_DIR FILE      # every trial's record, history and ranks
    python -m raysweep.archive unpack FILE RUN_DIR    # a run directory to resume or report
    python -m raysweep.run SWEEP --resume --results RUN_DIR

A row per trial: its record (result.json's text), its history (the rows of history.parquet as
JSON) and its test ranks; the sweep file and its plan.json ride in the file's metadata, so the
run it unpacks into resumes only with the same sweep. Unpacking adds the trials a run directory
lacks and leaves those it has; a resumed sweep returns them at once from their records, and a
search stage that the plan marks finished is not sampled again.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysweep.core.atomic import atomic_write, check_output_path
from raysweep.core.errors import UserError
from raysweep.core.outputs import SAMPLED_COLUMN
from raysweep.sweep.records import TrialRecord, check_plan
from raysweep.sweep.rundir import RunDir

SPEC_KEY, PLAN_KEY = b"raysweep.spec", b"raysweep.plan"
RANKS = pa.list_(pa.int32())
# (archives written before popularity-sampled ranks were kept have no sampled_ranks column)
OLD_SCHEMA = pa.schema(
    [("key", pa.string()), ("record", pa.string()), ("history", pa.string()), ("ranks", RANKS)]
)
SCHEMA = OLD_SCHEMA.append(pa.field("sampled_ranks", RANKS))


def _ranks_of(frame) -> tuple[np.ndarray, np.ndarray | None]:
    sampled = frame[SAMPLED_COLUMN].to_numpy(np.int32) if SAMPLED_COLUMN in frame else None
    return frame["rank"].to_numpy(np.int32), sampled


def pack(run_dir: Path, out: Path) -> int:
    """Write every trial of `run_dir` to `out`; returns how many."""
    check_output_path(Path(out).parent, "where an archive is written")
    run = RunDir(run_dir)
    if not run.spec.is_file():
        raise UserError(f"{run_dir}: no spec.yaml here (is it a raysweep run directory?)")
    rows = []
    for record in run.load_records():
        history, both = run.parts(record.key, lambda f: json.dumps(f.to_dict("records")), _ranks_of)
        ranks, sampled = both or (None, None)
        row = {"key": record.key, "record": record.to_json(), "history": history, "ranks": ranks}
        rows.append(row | {"sampled_ranks": sampled})
    # (its plan says which searches finished: a resume does not sample them again)
    plan = run.plan_file.read_bytes() if run.plan_file.is_file() else b""
    table = pa.Table.from_pylist(
        rows, schema=SCHEMA.with_metadata({SPEC_KEY: run.spec.read_bytes(), PLAN_KEY: plan})
    )
    atomic_write(Path(out), lambda tmp: pq.write_table(table, tmp))
    return len(rows)


def _check_row(row: dict) -> None:
    """A row is a trial as raysweep wrote it (ValueError otherwise): its record checked
    (`check_record`: its key is the one its settings give, so no key is a path of the file's
    choosing), a finished trial's history a list of epochs and its ranks non-negative."""
    record = row["record"] = TrialRecord.from_json(row["record"])
    if record.key != row["key"]:
        raise ValueError(f"the row of {str(row['key'])[:80]!r} holds the record of {record.key}")
    if row["history"] is not None:
        history = row["history"] = json.loads(row["history"])
        if not isinstance(history, list) or not all(
            isinstance(h, dict) and isinstance(h.get("epoch"), int) for h in history
        ):
            raise ValueError(f"{record.key}: its history is not a list of epochs")
    if record.ok and (row["history"] is None or row["ranks"] is None or not len(row["ranks"])):
        raise ValueError(f"{record.key}: a finished trial without its history and test ranks")
    if row["ranks"] is not None and len(row["ranks"]) and row["ranks"].min() < 0:
        raise ValueError(f"{record.key}: a negative test rank")
    sampled = row.get("sampled_ranks")
    whole = row["ranks"] is not None and sampled is not None and len(sampled) == len(row["ranks"])
    if sampled is not None and (not whole or sampled.min() < 0):
        raise ValueError(f"{record.key}: its sampled ranks are not one non-negative rank per test user")


def read(path: Path) -> tuple[bytes, bytes, list[dict]]:
    """The sweep file's and plan.json's bytes, and the rows, every row parsed and checked: an
    archive is taken whole or not at all."""
    try:
        table = pq.read_table(path)
        metadata = table.schema.metadata or {}
        spec, plan = metadata[SPEC_KEY], metadata.get(PLAN_KEY, b"")
        if table.schema.remove_metadata().equals(OLD_SCHEMA):
            table = table.append_column("sampled_ranks", pa.nulls(len(table), RANKS))
        if not table.schema.remove_metadata().equals(SCHEMA):
            raise ValueError(
                f"its columns are {table.schema.remove_metadata().to_string()!r}, not a raysweep archive's"
            )
        spec.decode("utf-8")
        if plan:
            check_plan(json.loads(plan))
        rows = table.drop_columns(["ranks", "sampled_ranks"]).to_pylist()
        for name in ("ranks", "sampled_ranks"):
            for row, ranks in zip(rows, table.column(name).combine_chunks()):
                row[name] = ranks.values.to_numpy() if ranks.is_valid else None  # no Python ints
        for number, row in enumerate(rows):
            try:
                _check_row(row)
            except (ValueError, TypeError, RecursionError) as exc:
                raise ValueError(f"row {number}: {exc}") from None
        keys = [row["key"] for row in rows]
        if len(set(keys)) != len(keys):
            raise ValueError("a trial appears twice")
    except FileNotFoundError:
        raise UserError(f"{path}: no such archive") from None
    except KeyError:
        raise UserError(f"{path}: not a raysweep archive (no sweep file in its metadata)") from None
    except (OSError, ValueError, TypeError, RecursionError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(
            f"{path}: damaged archive, nothing was written ({str(exc).splitlines()[0][:300]})"
        ) from None
    return spec, plan, rows


def unpack(path: Path, run_dir: Path) -> tuple[int, int]:
    """Add the archive's trials that `run_dir` lacks; returns (added, already there). The whole
    archive is read and checked, and the run directory locked, before anything is written."""
    spec, plan, rows = read(Path(path))
    run = RunDir.checked(run_dir)
    if run.spec.is_file() and run.spec.read_bytes() != spec:
        raise UserError(f"{run_dir}: holds another sweep than {path} (their sweep files differ)")
    run.create()
    with run.lock():
        ours = run.read_plan()
        theirs = json.loads(plan) if plan else {}
        for name, digest in theirs.get("data", {}).items():
            if (ours or {}).get("data", {}).get(name, digest) != digest:
                raise UserError(
                    f"{run_dir}: its dataset {name} is not the one the archive's trials read (their "
                    "interactions hash differently); nothing was written"
                )
        todo = []
        for row in rows:
            done = run.read_record(row["key"])
            if done is None or (not done.ok and row["record"].ok):
                todo.append(row)
        for row in todo:
            parts = {name: row[name] for name in ("history", "ranks")}
            run.write_record(row["record"], **parts, sampled=row["sampled_ranks"])
        if plan and ours is None:
            run.write_plan(plan)
        if not run.spec.is_file():
            atomic_write(run.spec, lambda tmp: tmp.write_bytes(spec))
        run.write_results()  # so that raysweep.report reads it as it reads any run
    return len(todo), len(rows) - len(todo)
