"""The results table: one row per trial, built from the per-trial records.

The records (`trials/<key>/result.json`, each written by rename) are the source of truth;
`results.parquet` is derived from them and rewritten atomically whenever a trial ends, so
every trial appears exactly once however often the driver was killed and resumed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from raysweep import faults
from raysweep.atomic import atomic_write
from raysweep.config import TrialConfig


def record_dir(run_dir: Path, key: str) -> Path:
    return Path(run_dir) / "trials" / key


def read_record(run_dir: Path, key: str) -> dict[str, Any] | None:
    path = record_dir(run_dir, key) / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_record(run_dir: Path, key: str, record: dict[str, Any], history: list[dict] | None = None) -> None:
    folder = record_dir(run_dir, key)
    if history is not None:
        atomic_write(folder / "history.parquet", lambda tmp: pd.DataFrame(history).to_parquet(tmp, index=False))
    # result.json last: its presence means the trial is finished, history included.
    atomic_write(folder / "result.json", lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))


def finished_record(result: dict[str, Any], key: str, stage: str, **context: Any) -> dict[str, Any]:
    """A finished trial's record: what `run_trial` returned (or its metrics.json), less the
    per-epoch history, plus where and how it ran (`context`: host, node_id, searched, ...)."""
    return {**{k: v for k, v in result.items() if k != "history"}, "key": key, "stages": [stage], "status": "ok",
            **context}


def failed_record(cfg: TrialConfig, key: str, stage: str, error: str, **context: Any) -> dict[str, Any]:
    """A failed trial's record: its settings and the error (a traceback or a log's tail)."""
    return {"key": key, "stages": [stage], "status": "failed", "error": error, "label": cfg.label,
            "config": cfg.to_dict(), **context}


def load_records(run_dir: Path) -> list[dict]:
    records = []
    for path in sorted((Path(run_dir) / "trials").glob("*/result.json")):
        records.append(json.loads(path.read_text()))
    return records


def records_table(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in records:
        row = {"key": r["key"], "stages": ",".join(r["stages"]), "in_table2": "seeds" in r["stages"],
               "status": r["status"], "label": r["label"],
               **{k: v for k, v in r["config"].items() if k not in ("extra", "data_dir", "mirror")},
               "searched": json.dumps(r.get("searched") or {}, sort_keys=True)}
        if r["status"] == "ok":
            row.update({f"test_{k}": v for k, v in r["test"].items()})
            row.update({"best_val_ndcg@10": r["val"]["ndcg@10"], "best_epoch": r["best_epoch"], "epochs": r["epochs"],
                        "train_seconds": r["train_seconds"], "seconds_per_epoch": r["seconds_per_epoch"],
                        "device": r["device"], "precision": r.get("precision")})  # (None: a record from before it was kept)
        else:
            lines = (r.get("error") or "").strip().splitlines()
            row["error"] = lines[-1] if lines else ""  # the exception line of the traceback
        row.update({"node_id": r.get("node_id"), "host": r.get("host")})
        rows.append(row)
    return pd.DataFrame(rows)


def write_results(run_dir: Path) -> pd.DataFrame:
    table = records_table(load_records(run_dir))

    def write(tmp: Path) -> None:
        table.to_parquet(tmp, index=False)
        faults.driver_point("results-write")

    atomic_write(Path(run_dir) / "results.parquet", write)
    return table


def read_results(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(Path(run_dir) / "results.parquet")
