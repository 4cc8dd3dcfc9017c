"""The results table: one row per trial, built from the per-trial records.

The records (`trials/<key>/result.json`, each written by rename) are the source of truth;
`results.parquet` is derived from them and rewritten atomically whenever a trial ends, so
every trial appears exactly once however often the driver was killed and resumed.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raysweep import faults
from raysweep.atomic import atomic_write
from raysweep.config import TrialConfig
from raysweep.errors import UserError


def record_dir(run_dir: Path, key: str) -> Path:
    return Path(run_dir) / "trials" / key


def read_record(run_dir: Path, key: str) -> dict[str, Any] | None:
    path = record_dir(run_dir, key) / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_record(run_dir: Path, key: str, record: dict[str, Any], history: list[dict] | None = None,
                 ranks: np.ndarray | None = None) -> None:
    from raysweep.train import ranks_frame

    folder = record_dir(run_dir, key)
    if history is not None:
        atomic_write(folder / "history.parquet", lambda tmp: pd.DataFrame(history).to_parquet(tmp, index=False))
    if ranks is not None:
        atomic_write(folder / "ranks.parquet", lambda tmp: ranks_frame(ranks).to_parquet(tmp, index=False))
    # result.json last: its presence means the trial is finished, history and ranks included.
    atomic_write(folder / "result.json", lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))


def finished_record(result: dict[str, Any], key: str, stage: str, **context: Any) -> dict[str, Any]:
    """A finished trial's record: what `run_trial` returned (or its metrics.json), less the
    per-epoch history, plus where and how it ran (`context`: host, node_id, searched, ...)."""
    return {**{k: v for k, v in result.items() if k not in ("history", "ranks")}, "key": key, "stages": [stage], "status": "ok",
            **context}


def failed_record(cfg: TrialConfig, key: str, stage: str, error: str, **context: Any) -> dict[str, Any]:
    """A failed trial's record: its settings and the error (a traceback or a log's tail)."""
    return {"key": key, "stages": [stage], "status": "failed", "error": error, "label": cfg.label,
            "config": cfg.to_dict(), **context}


def load_records(run_dir: Path) -> list[dict]:
    records = []
    for path in sorted((Path(run_dir) / "trials").glob("*/result.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: unreadable trial record ({exc}); delete {path.parent} to run that trial "
                            "again") from None
    return records


def record_row(r: dict) -> dict[str, Any]:
    """One row of results.parquet from one trial's record."""
    row = {"key": r["key"], "stages": ",".join(r["stages"]), "in_table2": "seeds" in r["stages"],
           "status": r["status"], "label": r["label"],
           **{k: v for k, v in r["config"].items() if k not in ("extra", "data_dir", "mirror")},
           "searched": json.dumps(r.get("searched") or {}, sort_keys=True)}
    if r["status"] == "ok":
        row.update({f"test_{k}": v for k, v in r["test"].items()})
        row.update({"best_val_ndcg@10": r["val"]["ndcg@10"], "best_epoch": r["best_epoch"], "epochs": r["epochs"],
                    "train_seconds": r["train_seconds"], "seconds_per_epoch": r["seconds_per_epoch"],
                    "peak_memory_mb": r.get("peak_memory_mb"),
                    "device": r["device"], "precision": r.get("precision")})  # (None: a record from before it was kept)
    else:
        lines = (r.get("error") or "").strip().splitlines()
        row["error"] = lines[-1] if lines else ""  # the exception line of the traceback
    row.update({"node_id": r.get("node_id"), "host": r.get("host")})
    return row


def records_table(records: list[dict]) -> pd.DataFrame:
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
        self.rows = {r["key"]: record_row(r) for r in load_records(run_dir)}
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
        raise UserError(f"{path}: unreadable results table ({str(exc).splitlines()[0]}); rebuild it with "
                        "python -m raysweep.report (it reads the trial records)") from None


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
            lines.append(f"{name}: the Optuna search ({stage['samples']} samples) has not finished; the seeds of "
                         "its best setting wait for it")
        for trial in stage["trials"]:
            if trial["key"] not in keys:
                lines.append(f"{trial['dataset']} {trial['label']} seed {trial['seed']} ({name})")
    return lines
