"""What a run directory holds, as values: a trial's record (`TrialRecord`, checked before it is
believed), the rows of the results table made from records, and the sweep's plan (checked, and
what it still misses). Where these live on disk is `rundir.RunDir`'s business."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from raysweep.core.config import TrialConfig, trial_key
from raysweep.core.errors import UserError


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
    data_sha256: str | None = None  # the dataset's content the trial read (older records: none)
    device_used_mb: float | None = None  # the whole GPU's memory in use at the end (CUDA only)
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
        """A record read back and checked (`check_record`); ValueError names what is wrong."""
        values = json.loads(text)
        if not isinstance(values, dict) or not {"key", "status", "stages", "label", "config"} <= set(values):
            raise ValueError("not a trial record")
        known = {f.name for f in dataclasses.fields(cls)} - {"context"}
        record = cls(
            **{k: v for k, v in values.items() if k in known},
            context={k: v for k, v in values.items() if k not in known},
        )
        check_record(record)
        return record


KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
STAGE = re.compile(r"seeds|search-[A-Za-z0-9_.-]{1,200}")
TEST_METRICS = ("hr@10", "ndcg@10", "hr@100", "ndcg@100")


def _metric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_record(r: TrialRecord) -> None:
    """A record's values are what raysweep writes, or it is damaged (ValueError): its key is the
    one its own settings give (so a key is never a path of the file's choosing), its label is its
    settings' label, its metrics are numbers in [0, 1] (never NaN or infinite), its epochs are
    positive integers."""
    if not isinstance(r.key, str) or not KEY.fullmatch(r.key):
        raise ValueError(f"its key {str(r.key)[:80]!r} is not a trial key")
    if not isinstance(r.config, dict):
        raise ValueError(f"its settings are a {type(r.config).__name__}, not a mapping")
    try:
        cfg = TrialConfig.from_dict(r.config, "settings")
        key, label = trial_key(cfg), cfg.label
    except (UserError, TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ValueError(f"its settings are not a trial's ({str(exc)[:200]})") from None
    if key != r.key:
        raise ValueError(f"its key {r.key!r} is not the one its settings give ({key})")
    if r.label != label:
        raise ValueError(f"its label {str(r.label)[:80]!r} is not its settings' ({label})")
    if (
        not isinstance(r.stages, list)
        or not r.stages
        or not all(isinstance(s, str) and STAGE.fullmatch(s) for s in r.stages)
    ):
        raise ValueError(f"its stages {str(r.stages)[:80]} are not stage names")
    if not isinstance(r.searched, dict) or not isinstance(r.context, dict):
        raise ValueError("its searched values or context are not a mapping")
    if r.data_sha256 is not None and not (
        isinstance(r.data_sha256, str) and re.fullmatch(r"[0-9a-f]{64}", r.data_sha256)
    ):
        raise ValueError(f"its data hash {str(r.data_sha256)[:80]!r} is not a SHA-256")
    if r.status == "failed":
        if not isinstance(r.error, str):
            raise ValueError("a failed record without its error")
        return
    if r.status != "ok":
        raise ValueError(f"its status {str(r.status)[:40]!r} is neither ok nor failed")
    if not isinstance(r.test, dict) or not all(_metric(r.test.get(m)) for m in TEST_METRICS):
        raise ValueError(f"its test metrics are not numbers in [0, 1]: {str(r.test)[:200]}")
    if not all(_metric(v) for v in r.test.values()):
        raise ValueError(f"its test metrics are not numbers in [0, 1]: {str(r.test)[:200]}")
    if not isinstance(r.val, dict) or not _metric(r.val.get("ndcg@10")):
        raise ValueError(f"its validation NDCG@10 is not a number in [0, 1]: {str(r.val)[:200]}")
    if not (_count(r.best_epoch) and _count(r.epochs) and r.best_epoch <= r.epochs):
        raise ValueError(f"its epochs (best {r.best_epoch!r} of {r.epochs!r}) are not positive integers")
    for name in ("train_seconds", "seconds_per_epoch", "peak_memory_mb", "device_used_mb"):
        value = getattr(r, name)
        if value is not None and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf
        ):
            raise ValueError(f"its {name} {value!r} is not a finite number >= 0")


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


@dataclass
class Damaged:
    """A record that cannot be trusted: where it is and why. It is listed, never counted."""

    path: Path
    reason: str

    def row(self) -> dict[str, Any]:
        return {
            "key": self.path.parent.name,
            "stages": "",
            "in_table2": False,
            "status": "damaged",
            "label": "",
            "error": f"{self.path}: {self.reason}",
        }


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


def records_table(records: list[TrialRecord], damaged: list[Damaged] = ()) -> pd.DataFrame:
    return pd.DataFrame([record_row(r) for r in records] + [d.row() for d in damaged])


def check_plan(plan: Any) -> dict[str, Any]:
    """plan.json's document, checked (ValueError names what is wrong): `stages` maps each stage
    to its kind, trials and, for a search, samples, whether it finished and the seeds that wait
    for its best setting; `data` maps each dataset to the SHA-256 of its interactions;
    `complete` is true once every stage ran."""
    if not isinstance(plan, dict) or not isinstance(plan.get("stages"), dict):
        raise ValueError("it has no stages")
    for name, stage in plan["stages"].items():
        if not isinstance(stage, dict) or stage.get("kind") not in ("search", "seeds"):
            raise ValueError(f"stage {str(name)[:80]!r} is not a stage (a kind and its trials)")
        if not isinstance(name, str) or not STAGE.fullmatch(name):
            raise ValueError(f"{str(name)[:80]!r} is not a stage name")
        for field_name in ("trials", "waiting"):
            trials = stage.get(field_name, [])
            if not isinstance(trials, list) or not all(
                isinstance(t, dict)
                and isinstance(t.get("dataset"), str)
                and isinstance(t.get("label"), str)
                and len(t["label"]) <= 200
                and isinstance(t.get("seed"), int)
                and isinstance(t.get("key", ""), str)
                for t in trials
            ):
                raise ValueError(f"stage {name!r}: its {field_name} are not trials (dataset, label, seed)")
        if stage["kind"] == "search" and not _count(stage.get("samples")):
            raise ValueError(f"stage {name!r}: a search without its number of samples")
    data = plan.get("data", {})
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError("its data hashes are not a mapping of dataset to hash")
    return plan


def missing_trials(plan: dict[str, Any] | None, results: pd.DataFrame) -> list[str]:
    """One line per planned trial without a finished or failed record, per search stage not yet
    finished, and per trial that waits for an unfinished search's best setting."""
    if plan is None:
        return []
    ended = results["status"].isin(["ok", "failed"]) if "status" in results else []
    keys = set(results["key"][ended]) if "key" in results else set()
    lines = []
    for name, stage in plan["stages"].items():
        if stage["kind"] == "search" and not stage.get("finished"):
            lines.append(
                f"{name}: the Optuna search ({stage['samples']} samples) has not finished; the seeds of "
                "its best setting wait for it"
            )
            lines += [
                f"{t['dataset']} {t['label']} seed {t['seed']} (the best setting of {name})"
                for t in stage.get("waiting", [])
            ]
        for trial in stage["trials"]:
            if trial["key"] not in keys:
                lines.append(f"{trial['dataset']} {trial['label']} seed {trial['seed']} ({name})")
    return lines
