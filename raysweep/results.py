"""Trial records and the results table built from them.

The records (`trials/<key>/result.json`, each written by rename after the trial's
history.parquet and ranks.parquet) are the source of truth; `results.parquet` is derived from
them, so every trial appears exactly once however often the driver was killed and resumed.
`plan.json` lists what the sweep means to run, so a report can say what is still missing.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raysweep import faults
from raysweep.atomic import atomic_write
from raysweep.config import TrialConfig
from raysweep.errors import UserError
from raysweep.trial import TrialResult, write_history_and_ranks


@dataclass
class TrialRecord:
    """One trial's result.json: a finished trial's summary (`TrialResult.summary`) or a failed
    trial's error, where it ran, and the stages that claim it ("seeds" puts it in Table 2)."""

    key: str
    stages: list[str]
    status: str  # "ok" or "failed"
    label: str
    config: dict[str, Any]
    searched: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    val: dict[str, float] | None = None
    test: dict[str, float] | None = None
    best_epoch: int | None = None
    epochs: int | None = None
    train_seconds: float | None = None
    seconds_per_epoch: float | None = None
    peak_memory_mb: float | None = None
    device: str | None = None
    precision: str | None = None
    node: str | None = None
    context: dict[str, Any] = field(
        default_factory=dict
    )  # host, node_id, started_at, finished_at, resources, ...

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> str:
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "context"}
        return (
            json.dumps({**{k: v for k, v in body.items() if v is not None}, **self.context}, indent=2) + "\n"
        )

    @classmethod
    def from_json(cls, text: str) -> TrialRecord:
        values = json.loads(text)
        if not isinstance(values, dict) or not {"key", "status", "stages", "label", "config"} <= set(values):
            raise ValueError("not a trial record")
        known = {f.name for f in dataclasses.fields(cls)} - {"context"}
        return cls(
            **{k: v for k, v in values.items() if k in known},
            context={k: v for k, v in values.items() if k not in known},
        )


def finished_record(
    summary: dict[str, Any], key: str, stage: str, searched: dict[str, Any] | None = None, **context: Any
) -> TrialRecord:
    """A finished trial's record from its summary (`TrialResult.summary()` or a metrics.json)."""
    return TrialRecord(
        key=key, stages=[stage], status="ok", searched=searched or {}, context=context, **summary
    )


def failed_record(
    cfg: TrialConfig, key: str, stage: str, error: str, searched: dict[str, Any] | None = None, **context: Any
) -> TrialRecord:
    """A failed trial's record: its settings and the error (a traceback or a log's tail)."""
    return TrialRecord(
        key=key,
        stages=[stage],
        status="failed",
        label=cfg.label,
        config=cfg.to_dict(),
        searched=searched or {},
        error=error,
        context=context,
    )


def record_dir(run_dir: Path, key: str) -> Path:
    return Path(run_dir) / "trials" / key


def _read(path: Path) -> TrialRecord:
    try:
        return TrialRecord.from_json(path.read_text())
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(
            f"{path}: unreadable trial record ({exc}); delete {path.parent} to run that trial again"
        ) from None


def read_record(run_dir: Path, key: str) -> TrialRecord | None:
    path = record_dir(run_dir, key) / "result.json"
    return _read(path) if path.is_file() else None


def write_record(
    run_dir: Path,
    record: TrialRecord,
    result: TrialResult | None = None,
    history: list[dict] | None = None,
    ranks: np.ndarray | None = None,
) -> None:
    """The trial's history and ranks (from `result`, or given), then result.json last: its
    presence means the trial is finished, history and ranks included."""
    folder = record_dir(run_dir, record.key)
    if result is not None:
        history, ranks = result.history, result.ranks
    write_history_and_ranks(folder, history, ranks)
    atomic_write(folder / "result.json", lambda tmp: tmp.write_text(record.to_json()))


def load_records(run_dir: Path) -> list[TrialRecord]:
    return [_read(path) for path in sorted((Path(run_dir) / "trials").glob("*/result.json"))]


def record_row(r: TrialRecord) -> dict[str, Any]:
    """One row of results.parquet from one trial's record."""
    row = {
        "key": r.key,
        "stages": ",".join(r.stages),
        "in_table2": "seeds" in r.stages,
        "status": r.status,
        "label": r.label,
        **{k: v for k, v in r.config.items() if k not in ("extra", "data_dir", "mirror")},
        "searched": json.dumps(r.searched, sort_keys=True),
    }
    if r.ok:
        row.update({f"test_{k}": v for k, v in r.test.items()})
        row.update(
            {
                "best_val_ndcg@10": r.val["ndcg@10"],
                "best_epoch": r.best_epoch,
                "epochs": r.epochs,
                "train_seconds": r.train_seconds,
                "seconds_per_epoch": r.seconds_per_epoch,
                "peak_memory_mb": r.peak_memory_mb,
                "device": r.device,
                "precision": r.precision,
            }
        )
    else:
        lines = (r.error or "").strip().splitlines()
        row["error"] = lines[-1] if lines else ""  # the exception line of the traceback
    row.update({"node_id": r.context.get("node_id"), "host": r.context.get("host")})
    return row


def records_table(records: list[TrialRecord]) -> pd.DataFrame:
    return pd.DataFrame([record_row(r) for r in records])


def write_table(run_dir: Path, table: pd.DataFrame) -> None:
    def write(tmp: Path) -> None:
        table.to_parquet(tmp, index=False)
        faults.driver_point("results-write")

    atomic_write(Path(run_dir) / "results.parquet", write)


def write_results(run_dir: Path) -> pd.DataFrame:
    """results.parquet rebuilt from every record (at a stage's end; `LiveResults` between)."""
    table = records_table(load_records(run_dir))
    write_table(run_dir, table)
    return table


class LiveResults:
    """results.parquet kept current while a stage runs, at a constant cost per finished trial:
    the records are read once, then only the record of each trial that ends, and the table is
    written at most every `every` seconds (and whenever `flush` is called)."""

    def __init__(self, run_dir: Path, every: float = 5.0):
        self.run_dir, self.every = Path(run_dir), every
        self.rows = {r.key: record_row(r) for r in load_records(run_dir)}
        self.written_at: float | None = None
        self.dirty = False

    def update(self, key: str) -> None:
        record = read_record(self.run_dir, key)
        if record is not None:
            self.rows[key] = record_row(record)
            self.dirty = True
        if self.written_at is None or time.monotonic() - self.written_at >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.dirty or self.written_at is None:
            write_table(self.run_dir, pd.DataFrame(list(self.rows.values())))
            self.written_at, self.dirty = time.monotonic(), False


def read_results(run_dir: Path) -> pd.DataFrame:
    path = Path(run_dir) / "results.parquet"
    if not path.is_file():
        raise UserError(f"{run_dir}: no results.parquet here (is it a raysweep run directory?)")
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(
            f"{path}: unreadable results table ({str(exc).splitlines()[0]}); rebuild it with "
            "python -m raysweep.report --rebuild (it reads the trial records)"
        ) from None


def read_plan(run_dir: Path) -> dict[str, Any] | None:
    """The sweep's plan.json (stages and their trials), or None where the driver wrote none."""
    path = Path(run_dir) / "plan.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["stages"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: unreadable sweep plan ({exc})") from None


def missing_trials(plan: dict[str, Any] | None, results: pd.DataFrame) -> list[str]:
    """One line per planned trial without a record, and per search stage not yet finished."""
    if plan is None:
        return []
    keys = set(results["key"]) if "key" in results else set()
    lines = []
    for name, stage in plan.items():
        if stage["kind"] == "search" and not stage.get("finished"):
            lines.append(
                f"{name}: the Optuna search ({stage['samples']} samples) has not finished; the seeds of "
                "its best setting wait for it"
            )
        for trial in stage["trials"]:
            if trial["key"] not in keys:
                lines.append(f"{trial['dataset']} {trial['label']} seed {trial['seed']} ({name})")
    return lines
