"""A trial's files, as `raysweep.train --out` and a sweep's run directory both write them:
history.parquet (one row per epoch), ranks.parquet (each test user's target rank) and, for a lone
trial, metrics.json (its summary, written last: its presence means the others are whole)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from raysweep.core.atomic import atomic_write

if TYPE_CHECKING:
    from raysweep.core.trial import TrialResult

HISTORY_FILE, RANKS_FILE, METRICS_FILE = "history.parquet", "ranks.parquet", "metrics.json"
SAMPLED_COLUMN = "popularity_rank"  # ranks.parquet's column of popularity-sampled ranks


def ranks_frame(ranks: np.ndarray, sampled: np.ndarray | None = None) -> pd.DataFrame:
    """ranks.parquet: row u is test user u's 0-based target rank (a miss: metrics.miss_rank), and
    where the popularity-sampled protocol ran, its rank among the drawn negatives beside it."""
    frame = pd.DataFrame({"rank": np.asarray(ranks, dtype=np.int32)})
    if sampled is not None:
        frame[SAMPLED_COLUMN] = np.asarray(sampled, dtype=np.int32)
    return frame


def write_history_and_ranks(
    folder: Path,
    history: list[dict[str, Any]] | None,
    ranks: np.ndarray | None,
    sampled: np.ndarray | None = None,
) -> None:
    """history.parquet and ranks.parquet, each under a temporary name, then renamed."""
    if history is not None:
        atomic_write(folder / HISTORY_FILE, lambda tmp: pd.DataFrame(history).to_parquet(tmp, index=False))
    if ranks is not None:
        atomic_write(
            folder / RANKS_FILE, lambda tmp: ranks_frame(ranks, sampled).to_parquet(tmp, index=False)
        )


def write_result(result: TrialResult, out: Path) -> None:
    """history.parquet, ranks.parquet, then metrics.json (last: its presence means all are there)."""
    write_history_and_ranks(out, result.history, result.ranks, result.sampled_ranks)
    atomic_write(
        out / METRICS_FILE, lambda tmp: tmp.write_text(json.dumps(result.summary(), indent=2) + "\n")
    )
