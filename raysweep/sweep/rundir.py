"""A run directory, and its one owner: `RunDir` spells every path inside it, holds its lock, and
reads and writes its plan, its trial records and its results table.

    RUN/spec.yaml          the sweep file the run started with
    RUN/plan.json          what the sweep means to run (`records.check_plan`)
    RUN/trials/KEY/        result.json (the record, written last), history.parquet, ranks.parquet,
                           state.pt and progress.json (a running trial's saved state, and
                           where it is within its epoch)
    RUN/results.parquet    one row per record, derived from the records
    RUN/report/            the report; RUN/tune/ Ray Tune's state; RUN/mlflow.db MLflow's store

The records are the source of truth: a trial whose record exists is finished, however often
the driver was killed and resumed, and the results table is rebuilt from them.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from raysweep.core.atomic import atomic_write, check_output_path
from raysweep.core.errors import UserError
from raysweep.core.outputs import HISTORY_FILE, RANKS_FILE, write_history_and_ranks
from raysweep.sweep import faults
from raysweep.sweep.records import Damaged, TrialRecord, check_plan, record_row, records_table

if TYPE_CHECKING:
    from raysweep.core.trial import TrialResult

DRIVER_FILES = {".lock", ".write-probe"}
RECORD_FILE, STATE_FILE, PROGRESS_FILE = "result.json", "state.pt", "progress.json"


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def checked(cls, path: Path) -> RunDir:
        """The run directory, resolved (links and '..'); refused if it is a system folder or inside
        one, or a non-empty folder that holds something other than a raysweep run."""
        real = check_output_path(path, "a run directory")
        if real.is_dir() and not (real / "spec.yaml").is_file():
            others = [p.name for p in real.iterdir() if p.name not in DRIVER_FILES]
            if others:
                raise UserError(
                    f"{path}: not empty and not a raysweep run directory (it holds {sorted(others)[0]!r}); "
                    "set 'results' to a new folder"
                )
        elif real.exists() and not real.is_dir():
            raise UserError(f"{path}: exists and is not a folder")
        return cls(real)

    def __str__(self) -> str:
        return str(self.path)

    # -- paths ------------------------------------------------------------------------------------
    @property
    def spec(self) -> Path:
        return self.path / "spec.yaml"

    @property
    def plan_file(self) -> Path:
        return self.path / "plan.json"

    @property
    def results_file(self) -> Path:
        return self.path / "results.parquet"

    @property
    def report(self) -> Path:
        return self.path / "report"

    @property
    def tune(self) -> Path:
        return self.path / "tune"

    @property
    def mlflow_store(self) -> str:
        return f"sqlite:///{self.path / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.path / "mlflow-artifacts"

    def trial(self, key: str) -> Path:
        return self.path / "trials" / key

    def state_file(self, key: str) -> Path:
        """A running trial's saved training state (beside its record, not in a Tune checkpoint)."""
        return self.trial(key) / STATE_FILE

    def progress_file(self, key: str) -> Path:
        """Where a running trial is within its epoch (`trainable.StepProgress`)."""
        return self.trial(key) / PROGRESS_FILE

    def read_progress(self, key: str) -> dict[str, Any] | None:
        """A running trial's progress within its epoch, or None (none yet, or unreadable)."""
        try:
            progress = json.loads(self.progress_file(key).read_text())
        except (OSError, ValueError):
            return None
        fields = ("epoch", "step", "steps", "seconds")
        ok = isinstance(progress, dict) and all(isinstance(progress.get(f), int | float) for f in fields)
        return progress if ok else None

    # -- the driver's hold on it ------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self):
        """One process changes a run directory at a time (a driver, or `archive unpack`): a second
        is refused, not interleaved."""
        from filelock import FileLock, Timeout

        lock = FileLock(self.path / ".lock", timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise UserError(
                f"{self}: another raysweep process (a driver or an unpack) is using this run directory"
            ) from None
        except OSError as exc:
            raise UserError(f"{self}: results directory is not writable ({exc.strerror})") from None
        try:
            yield
        finally:
            lock.release()

    def create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{self}: cannot create the results directory ({exc.strerror})") from None

    def prepare(self, spec_path: Path, resume: bool, extend: bool = False) -> bool:
        """Make sure results can be written before any trial starts; refuse to mix two sweeps.
        `extend`: the sweep file replaces the run's, once `stages.check_extension` accepted it.
        True if this call started the run directory (wrote its spec.yaml)."""
        started = self.spec.is_file()
        if started and not resume:
            plan = self.read_plan()
            if plan is not None and plan.get("complete") is True:
                raise UserError(
                    f"{self}: this sweep already finished here (its report: {self.report / 'index.html'}); "
                    "for a new run give another run directory (--results DIR)"
                )
            raise UserError(
                f"{self}: a sweep already ran here and did not finish; pass --resume to finish it, or "
                "give another run directory (--results DIR)"
            )
        if started and not extend and self.spec.read_bytes() != spec_path.read_bytes():
            raise UserError(
                f"{self}: the sweep file changed since this run started; resume with the same file, "
                "or pass --extend if the new file only adds trials (seeds, models, datasets)"
            )
        try:
            probe = self.path / ".write-probe"
            probe.write_bytes(bytes(1 << 20))  # a full disk fails here, not in the middle of a trial
            probe.unlink()
        except OSError as exc:
            raise UserError(f"{self}: results directory is not writable ({exc.strerror})") from None
        if not started or extend:
            atomic_write(self.spec, lambda tmp: shutil.copyfile(spec_path, tmp))
        for leftover in [*self.path.glob(".*.tmp"), *self.path.glob("trials/*/.*.tmp")]:
            leftover.unlink()  # half-written files of a killed driver or trial; never renamed, never read
        return not started

    def forget_start(self) -> None:
        """Undo `prepare` of a run that never started (Ray failed to come up)."""
        self.spec.unlink(missing_ok=True)
        self.plan_file.unlink(missing_ok=True)

    # -- the plan ---------------------------------------------------------------------------------
    def read_plan(self) -> dict[str, Any] | None:
        """plan.json, checked (`records.check_plan`), or None where the driver wrote none."""
        if not self.plan_file.is_file():
            return None
        try:
            return check_plan(json.loads(self.plan_file.read_text()))
        except (OSError, ValueError, RecursionError) as exc:
            raise UserError(f"{self.plan_file}: damaged sweep plan ({str(exc)[:300]})") from None

    def write_plan(self, plan: dict[str, Any] | bytes) -> None:
        text = plan if isinstance(plan, bytes) else (json.dumps(plan, indent=1) + "\n").encode()
        atomic_write(self.plan_file, lambda tmp: tmp.write_bytes(text))

    # -- the records ------------------------------------------------------------------------------
    def _read(self, path: Path) -> TrialRecord:
        try:
            return TrialRecord.from_json(path.read_text())
        except (OSError, ValueError, TypeError, RecursionError) as exc:
            raise UserError(
                f"{path}: damaged trial record ({str(exc)[:300]}); delete {path.parent} to run that "
                "trial again"
            ) from None

    def read_record(self, key: str) -> TrialRecord | None:
        path = self.trial(key) / RECORD_FILE
        return self._read(path) if path.is_file() else None

    def write_record(
        self,
        record: TrialRecord,
        result: TrialResult | None = None,
        history: list[dict] | None = None,
        ranks: np.ndarray | None = None,
        sampled: np.ndarray | None = None,
    ) -> None:
        """The trial's history and ranks (from `result`, or given), then result.json last: its
        presence means the trial is finished, history and ranks included."""
        folder = self.trial(record.key)
        if result is not None:
            history, ranks, sampled = result.history, result.ranks, result.sampled_ranks
        write_history_and_ranks(folder, history, ranks, sampled)
        atomic_write(folder / RECORD_FILE, lambda tmp: tmp.write_text(record.to_json()))

    def _record_paths(self) -> list[Path]:
        return sorted((self.path / "trials").glob(f"*/{RECORD_FILE}"))

    def load_records(self) -> list[TrialRecord]:
        """Every record; the first damaged one is an error (a resume or a pack refuses to go on)."""
        return [self._read(path) for path in self._record_paths()]

    def scan_records(self) -> tuple[list[TrialRecord], list[Damaged]]:
        """Every record that reads back whole and checked, and the damaged ones apart."""
        records, damaged = [], []
        for path in self._record_paths():
            try:
                records.append(self._read(path))
            except UserError as exc:
                damaged.append(Damaged(path, str(exc).removeprefix(f"{path}: ")))
        return records, damaged

    def history(self, key: str) -> pd.DataFrame:
        path = self.trial(key) / HISTORY_FILE
        if not path.is_file():
            raise UserError(f"{path}: the trial's training history is missing; nothing was rewritten")
        try:
            return pd.read_parquet(path)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"{path}: unreadable training history ({str(exc).splitlines()[0]}); nothing was rewritten"
            ) from None

    def ranks(self, key: str, column: str = "rank") -> np.ndarray:
        """The trial's test ranks, or another column of its ranks.parquet (SAMPLED_COLUMN: its
        popularity-sampled ranks); OSError, ValueError or KeyError if the file is damaged or
        has no such column."""
        return pd.read_parquet(self.trial(key) / RANKS_FILE)[column].to_numpy()

    def parts(self, key: str, convert_history, convert_ranks) -> tuple[Any, Any]:
        """A trial's history and ranks as files hold them, converted (None where a failed trial has none)."""
        out = []
        for name, convert in ((HISTORY_FILE, convert_history), (RANKS_FILE, convert_ranks)):
            path = self.trial(key) / name
            if not path.is_file():
                out.append(None)
                continue
            try:
                out.append(convert(pd.read_parquet(path)))
            except (OSError, ValueError) as exc:
                raise UserError(
                    f"{path}: unreadable ({str(exc).splitlines()[0]}); nothing was written"
                ) from None
        return tuple(out)

    # -- the results table ------------------------------------------------------------------------
    def write_table(self, table: pd.DataFrame) -> None:
        def write(tmp: Path) -> None:
            table.to_parquet(tmp, index=False)
            faults.driver_point("results-write")

        atomic_write(self.results_file, write)

    def write_results(self) -> pd.DataFrame:
        """results.parquet rebuilt from every record (at a stage's end; `LiveResults` between)."""
        table = records_table(*self.scan_records())
        self.write_table(table)
        return table

    def read_results(self) -> pd.DataFrame:
        if not self.results_file.is_file():
            raise UserError(f"{self}: no results.parquet here (is it a raysweep run directory?)")
        try:
            return pd.read_parquet(self.results_file)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise UserError(
                f"{self.results_file}: unreadable results table ({str(exc).splitlines()[0]}); rebuild it "
                "with python -m raysweep.report --rebuild (it reads the trial records)"
            ) from None


class LiveResults:
    """results.parquet kept current while a stage runs, at a constant cost per finished trial:
    the records are read once, then only the record of each trial that ends, and the table is
    written at most every `every` seconds (and whenever `flush` is called)."""

    def __init__(self, run: RunDir, every: float = 5.0):
        self.run, self.every = run, every
        records, damaged = run.scan_records()
        self.rows = {r.key: record_row(r) for r in records} | {d.row()["key"]: d.row() for d in damaged}
        self.written_at: float | None = None
        self.dirty = False

    def update(self, key: str) -> None:
        try:
            record = self.run.read_record(key)
            row = None if record is None else record_row(record)
        except UserError as exc:
            path = self.run.trial(key) / RECORD_FILE
            row = Damaged(path, str(exc).removeprefix(f"{path}: ")).row()
        if row is not None:
            self.rows[key] = row
            self.dirty = True
        if self.written_at is None or time.monotonic() - self.written_at >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.dirty or self.written_at is None:
            self.run.write_table(pd.DataFrame(list(self.rows.values())))
            self.written_at, self.dirty = time.monotonic(), False
