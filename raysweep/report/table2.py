"""The paper's Table 2 from a run's results: per dataset and model, each metric's mean and std over
seeds beside the paper's value, and a verdict that knows its noise (`_verdict`; "not comparable:
..." where the trials did not run the paper's protocol). Only the seeds stage enters it, and only
rows a report may believe (`trusted`).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
from scipy import stats

from raysweep.core.config import PAPER_DATASETS, TrialConfig
from raysweep.report.paper import paper_row

PAPER_ORDER = ["BPR-MF", "GRU4Rec", "BERT4Rec", "SASRec", "SASRec+"]
METRICS = [
    ("test_hr@10", "HR@10", "hr10"),
    ("test_hr@100", "HR@100", "hr100"),
    ("test_ndcg@10", "NDCG@10", "ndcg10"),
    ("test_ndcg@100", "NDCG@100", "ndcg100"),
]
OTHERS = [("train_seconds", "Training time (s)", "seconds"), ("best_epoch", "Best epoch", "best_epoch")]
TOLERANCE = 0.05  # "reproduced": within 5 % of the paper (or the paper inside our interval)
MIN_SEEDS = 3  # fewer seeds: the verdict names its seed count and only the 5 % band judges
# The settings the paper fixes that move its numbers; a row that differs in one is not its row.
PROTOCOL = ("hidden", "max_len", "val_users", "patience")


def order(label: str) -> tuple:
    """The paper's rows first, then each family of N (SASRec+ N, gSASRec N (t=0.75), ...) by N."""
    if label in PAPER_ORDER:
        return (PAPER_ORDER.index(label), "", 0)
    match = re.search(r" (\d+)(?= |$)", label)
    if match is None:
        return (len(PAPER_ORDER) + 1, label, 0)
    return (len(PAPER_ORDER), label[: match.start(1)] + "N" + label[match.end(1) :], int(match.group(1)))


def trusted(results: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The results table split into rows a report may count and damaged rows it only lists: a
    record that failed its checks (status "damaged"), and, in a table edited by hand, a finished
    row whose metrics are not numbers in [0, 1], whose seed is not an integer or whose label is
    not a plain short name."""
    if results.empty:
        return results, results
    metrics = [c for c, _, _ in METRICS if c in results]
    finished = results["status"] == "ok"
    values = results[metrics].apply(pd.to_numeric, errors="coerce")
    sane = values.ge(0).all(axis=1) & values.le(1).all(axis=1) & (len(metrics) == len(METRICS))
    seeds = pd.to_numeric(results.get("seed"), errors="coerce")
    sane &= seeds.notna() & (seeds == seeds.round())
    labels = results["label"].astype(str)
    sane &= labels.str.len().between(1, 200) & results["dataset"].astype(str).str.len().le(4096)
    forged = finished & ~sane
    damaged = results.assign(
        error=results.get("error", pd.Series(None, index=results.index)).where(
            ~forged, "its metrics, seed or label are not a trial's (edited by hand?)"
        )
    )[forged | (results["status"] == "damaged")]
    counted = ~forged & (results["status"] != "damaged")
    ok = results[counted].copy()
    ok[metrics] = values[counted]
    return ok, damaged


def table2_rows(results: pd.DataFrame) -> pd.DataFrame:
    ok, _ = trusted(results)
    if ok.empty:
        return ok
    return ok[(ok["status"] == "ok") & ok["in_table2"].astype(bool)]


def seeds_interval(values: pd.Series) -> tuple[float, float]:
    """The 95 % t interval of the mean over seeds (nan with fewer than 2)."""
    if len(values) < 2:
        return (math.nan, math.nan)
    sem = values.std() / math.sqrt(len(values))
    if sem == 0:
        return (values.mean(), values.mean())
    return tuple(stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=sem))


def _verdict(group: pd.DataFrame, paper) -> str:
    """From HR@10 and NDCG@10 against the paper. With MIN_SEEDS or more seeds a metric agrees when
    the paper's value lies inside our 95 % interval of the mean or within 5 % of the mean, and
    the verdict is reproduced / above / below / mixed; with fewer seeds the interval is too wide
    to mean anything, so only the 5 % band judges and the verdict names its seed count."""
    seeds = len(group)
    off = []
    for column, key in (("test_hr@10", "hr10"), ("test_ndcg@10", "ndcg10")):
        ours, theirs = group[column].astype(float), getattr(paper, key)
        low, high = seeds_interval(ours) if seeds >= MIN_SEEDS else (math.nan, math.nan)
        if abs(ours.mean() / theirs - 1) > TOLERANCE and not low <= theirs <= high:
            off.append(np.sign(ours.mean() - theirs))
    if not off:
        word = "reproduced" if seeds >= MIN_SEEDS else f"within {TOLERANCE:.0%}"
    elif len(set(off)) == 1:
        word = {1.0: "above", -1.0: "below"}[off[0]]
    else:
        word = "mixed"
    return word if seeds >= MIN_SEEDS else f"{seeds} seed{'s' * (seeds > 1)}: {word}"


def protocol_gap(group: pd.DataFrame) -> str:
    """What keeps these trials from the paper's protocol, '' if nothing: an epoch cap below the
    paper's that cut a trial before its patience ran out, or a setting the paper fixes
    (`PROTOCOL`) set otherwise."""
    first = group.iloc[0]
    if first.get("model") in (None, "bpr") or first.get("dataset") not in PAPER_DATASETS:
        return ""  # (BPR-MF's budget is its searched iterations; a file of one's own has no paper)
    kind = {k: first.get(k) for k in ("dataset", "model", "loss") if pd.notna(first.get(k))}
    if pd.notna(first.get("negatives")):
        kind["negatives"] = int(first["negatives"])
    paper = TrialConfig.from_dict(kind)
    gaps = []
    if {"epochs", "best_epoch", "max_epochs", "patience"} <= set(group.columns):
        left = group["epochs"] - group["best_epoch"]  # epochs without a gain when it ended
        # (a cap at the paper's own budget, 100 epochs or BERT4Rec's 200, cut the paper's runs too)
        cut = (group["epochs"] >= group["max_epochs"]) & (left < group["patience"])
        if (cut & (group["max_epochs"] < paper.max_epochs)).any():
            gaps.append(f"{int(group['max_epochs'].max())}-epoch budget")
    for name in PROTOCOL:
        if name in group and set(group[name]) != {getattr(paper, name)}:
            ours = "/".join(f"{v:g}" for v in sorted(set(group[name].astype(float))))
            gaps.append(f"{name} {ours} (paper {getattr(paper, name):g})")
    return ", ".join(gaps)


def device_label(device: object) -> str:
    """'cpu' -> 'CPU', 'cuda:0 (NVIDIA H200)' -> 'NVIDIA H200'."""
    text = str(device) if pd.notna(device) else "unknown device"
    inside = re.search(r"\((.+)\)$", text)
    return inside.group(1) if inside else text.upper() if text == "cpu" else text


def by_device(group: pd.DataFrame, column: str, digits: int, thousands: str = "") -> str:
    """'CPU 6457.9 ± 1242.6 (2); NVIDIA H200 236.0 (1)': a row whose seeds ran on different devices
    states time and memory per device, since a mean over them describes neither."""
    parts = []
    for device, values in group.groupby(group["device"].map(device_label), sort=True)[column]:
        values = values.astype(float).dropna()
        if len(values):
            spread = _spread(values.std(), digits) if len(values) > 1 else ""
            parts.append(f"{device} {values.mean():{thousands}.{digits}f}{spread} ({len(values)})")
    return "; ".join(parts)


def table2(results: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset x model: each column's mean and std over seeds, the paper's value and
    the relative difference (raw numbers; `table2_markdown` formats them), peak memory, verdict.
    Where a row's seeds ran on different devices, its time and memory are NaN and said per device
    in the "... by device" columns."""
    rows = []
    ok = table2_rows(results)
    for (dataset, label), group in ok.groupby(["dataset", "label"], sort=False) if len(ok) else []:
        paper = paper_row(dataset, label)
        row = {"Dataset": dataset, "Model": label, "Seeds": len(group)}
        for column, name, key in METRICS + OTHERS:
            values = group[column].astype(float)
            row[name] = values.mean()
            row[f"{name} std"] = values.std() if len(values) > 1 else float("nan")
            row[f"{name} paper"] = getattr(paper, key) if paper else float("nan")
            if (column, name, key) in METRICS:
                row[f"{name} diff %"] = (
                    100 * (values.mean() / getattr(paper, key) - 1) if paper else float("nan")
                )
        memory = (
            group["peak_memory_mb"].astype(float) if "peak_memory_mb" in group else pd.Series(dtype=float)
        )
        row["Peak memory (MB)"] = memory.mean() if memory.notna().any() else float("nan")
        if "device" in group and group["device"].map(device_label).nunique() > 1:
            for column, name, digits, thousands in (
                ("train_seconds", "Training time (s)", 1, ""),  # (as the other rows show them)
                ("peak_memory_mb", "Peak memory (MB)", 0, ","),
            ):
                row[name] = row[f"{name} std"] = float("nan")
                row[f"{name} by device"] = (
                    by_device(group, column, digits, thousands) if column in group else ""
                )
        gap = protocol_gap(group) if paper else ""
        row["Verdict"] = f"not comparable: {gap}" if gap else _verdict(group, paper) if paper else ""
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["_order"] = table["Model"].map(order)
    return (
        table.sort_values(["Dataset", "_order"], kind="stable").drop(columns="_order").reset_index(drop=True)
    )


def _spread(std: float, digits: int) -> str:
    """' ± std', with a spread too small for the digits shown said as such, not as ± 0.0000."""
    if math.isnan(std):
        return ""
    if std < 1e-12:
        return " ± 0"
    if round(std, digits) == 0:
        return f" ± <{10**-digits:.{digits}f}"
    return f" ± {std:.{digits}f}"


def _cell(row: pd.Series, name: str, digits: int) -> str:
    mean, std, theirs = row[name], row[f"{name} std"], row[f"{name} paper"]
    text = f"{mean:.{digits}f}" + _spread(std, digits)
    if math.isnan(theirs):
        return text
    if f"{name} diff %" in row:
        return f"{text} (paper {theirs:.4f}, {row[f'{name} diff %']:+.1f} %)"
    return f"{text} (paper {theirs:g})"


COLUMNS = [
    "Model",
    "Seeds",
    "HR@10",
    "HR@100",
    "NDCG@10",
    "NDCG@100",
    "Training time (s)",
    "Best epoch",
    "Peak memory (MB)",
    "Verdict",
]


def formatted(table: pd.DataFrame) -> pd.DataFrame:
    """Table 2 as it is shown: ours ± std (paper, difference) in each cell."""
    rows = []
    for _, row in table.iterrows():
        digits = {name: 4 for _, name, _ in METRICS} | {
            "Training time (s)": 1,
            "Best epoch": 1 if row["Seeds"] > 1 else 0,
        }
        cells = {name: _cell(row, name, d) for name, d in digits.items()}
        memory = row["Peak memory (MB)"]
        memory = "" if math.isnan(memory) else f"{memory:,.0f}"
        if isinstance(row.get("Training time (s) by device"), str):  # seeds on different devices
            theirs = row["Training time (s) paper"]
            paper = "" if math.isnan(theirs) else f" (paper {theirs:g})"
            cells["Training time (s)"] = row["Training time (s) by device"] + paper
            memory = row["Peak memory (MB) by device"]
        rows.append(
            {
                "Dataset": row["Dataset"],
                "Model": row["Model"],
                "Seeds": row["Seeds"],
                **cells,
                "Peak memory (MB)": memory,
                "Verdict": row["Verdict"],
            }
        )
    return pd.DataFrame(rows, columns=["Dataset", *COLUMNS])
