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

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raysweep.atomic import atomic_write
from raysweep.errors import UserError, cli
from raysweep.results import TrialRecord, load_records, read_record, record_dir, write_record, write_results

SPEC_KEY, PLAN_KEY = b"raysweep.spec", b"raysweep.plan"


def pack(run_dir: Path, out: Path) -> int:
    """Write every trial of `run_dir` to `out`; returns how many."""
    run_dir = Path(run_dir)
    spec = run_dir / "spec.yaml"
    if not spec.is_file():
        raise UserError(f"{run_dir}: no spec.yaml here (is it a raysweep run directory?)")
    plan = run_dir / "plan.json"  # which searches finished: a resume does not sample them again
    rows = []
    for record in load_records(run_dir):
        folder = record_dir(run_dir, record.key)
        rows.append(
            {
                "key": record.key,
                "record": record.to_json(),
                "history": _read_part(folder / "history.parquet", lambda f: json.dumps(f.to_dict("records"))),
                "ranks": _read_part(folder / "ranks.parquet", lambda f: f["rank"].to_numpy(np.int32)),
            }
        )
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("record", pa.string()),
            ("history", pa.string()),
            ("ranks", pa.list_(pa.int32())),
        ],
        metadata={SPEC_KEY: spec.read_bytes(), PLAN_KEY: plan.read_bytes() if plan.is_file() else b""},
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    atomic_write(Path(out), lambda tmp: pq.write_table(table, tmp))
    return len(rows)


def _read_part(path: Path, convert):
    if not path.is_file():
        return None  # a failed trial has neither
    try:
        return convert(pd.read_parquet(path))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({str(exc).splitlines()[0]}); nothing was written") from None


def read(path: Path) -> tuple[bytes, bytes, list[dict]]:
    """The sweep file's and plan.json's bytes, and the rows, each row's record parsed and checked."""
    try:
        table = pq.read_table(path)
        metadata = table.schema.metadata or {}
        spec, plan = metadata[SPEC_KEY], metadata.get(PLAN_KEY, b"")
        if plan and not isinstance(json.loads(plan).get("stages"), dict):
            raise ValueError("its plan.json has no stages")
        rows = table.drop_columns(["ranks"]).to_pylist()
        for row, ranks in zip(rows, table.column("ranks").combine_chunks()):
            row["ranks"] = ranks.values.to_numpy() if ranks.is_valid else None  # no Python ints
        for row in rows:
            row["record"] = TrialRecord.from_json(row["record"])
            if row["record"].key != row["key"]:
                raise ValueError(f"the row of {row['key']} holds the record of {row['record'].key}")
    except FileNotFoundError:
        raise UserError(f"{path}: no such archive") from None
    except KeyError:
        raise UserError(f"{path}: not a raysweep archive (no sweep file in its metadata)") from None
    except (OSError, ValueError, TypeError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"{path}: unreadable archive ({str(exc).splitlines()[0]})") from None
    return spec, plan, rows


def unpack(path: Path, run_dir: Path) -> tuple[int, int]:
    """Add the archive's trials that `run_dir` lacks; returns (added, already there). Everything
    is read and checked before anything is written."""
    from raysweep.run import check_run_dir

    spec, plan, rows = read(Path(path))
    run_dir = Path(run_dir).absolute()
    check_run_dir(run_dir)
    here = run_dir / "spec.yaml"
    if here.is_file() and here.read_bytes() != spec:
        raise UserError(f"{run_dir}: holds another sweep than {path} (their sweep files differ)")
    added = 0
    for row in rows:
        record = row["record"]
        done = read_record(run_dir, record.key)
        if done is not None and (done.ok or not record.ok):
            continue
        history = json.loads(row["history"]) if row["history"] is not None else None
        write_record(run_dir, record, history=history, ranks=row["ranks"])
        added += 1
    if plan and not (run_dir / "plan.json").is_file():
        atomic_write(run_dir / "plan.json", lambda tmp: tmp.write_bytes(plan))
    if not here.is_file():
        atomic_write(here, lambda tmp: tmp.write_bytes(spec))
    write_results(run_dir)  # so that raysweep.report reads it as it reads any run
    return added, len(rows) - added


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raysweep.archive", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="write a run directory's trials to one Parquet file")
    packing.add_argument("run_dir", type=Path)
    packing.add_argument("file", type=Path)
    unpacking = commands.add_parser("unpack", help="add an archive's trials to a run directory")
    unpacking.add_argument("file", type=Path)
    unpacking.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        print(f"packed {pack(args.run_dir, args.file)} trials of {args.run_dir} into {args.file}")
    else:
        added, there = unpack(args.file, args.run_dir)
        print(
            f"unpacked {added} trials into {args.run_dir} ({there} already there); finish the sweep "
            f"with: python -m raysweep.run SWEEP --resume --results {args.run_dir}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
