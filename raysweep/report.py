"""The paper's Table 2, Figure 1 and Figure 2 from a run directory.

    python -m raysweep.report RUN_DIR

writes RUN_DIR/report/: table2.md and table2.csv (per dataset: Model | HR@10 | HR@100 |
NDCG@10 | NDCG@100 | Training time (s) | Best epoch; mean ± std over seeds), figure2.png
(test NDCG@10 against N on a log axis, SASRec+, SASRec and BERT4Rec as reference lines) and
figure1.png (validation NDCG@10 by epoch per model). Only the seeds stage enters Table 2;
failed trials are listed under it.
"""
from __future__ import annotations

import argparse
import io
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from raysweep.atomic import atomic_write
from raysweep.errors import UserError, cli
from raysweep.results import missing_trials, read_plan, read_results

PAPER_ORDER = ["BPR-MF", "GRU4Rec", "BERT4Rec", "SASRec", "SASRec+"]
COLUMNS = {"test_hr@10": "HR@10", "test_hr@100": "HR@100", "test_ndcg@10": "NDCG@10",
           "test_ndcg@100": "NDCG@100", "train_seconds": "Training time (s)", "best_epoch": "Best epoch"}
REFERENCE_LINES = {"SASRec+": "-", "SASRec": "--", "BERT4Rec": ":"}


def _order(label: str) -> tuple:
    if label in PAPER_ORDER:
        return (PAPER_ORDER.index(label), 0)
    match = re.fullmatch(r"SASRec\+ (\d+)", label)
    return (len(PAPER_ORDER), int(match.group(1))) if match else (len(PAPER_ORDER) + 1, label)


def _cell(values: pd.Series, digits: int) -> str:
    if len(values) == 1 or values.std() == 0 or np.isnan(values.std()):
        return f"{values.mean():.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def table2(results: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset x model: the metrics' mean (± std over seeds)."""
    ok = _table2_rows(results)
    rows = []
    for (dataset, label), group in ok.groupby(["dataset", "label"], sort=False):
        row = {"Dataset": dataset, "Model": label, "Seeds": len(group)}
        for column, name in COLUMNS.items():
            digits = 4 if column.startswith("test_") else 1 if column == "train_seconds" or len(group) > 1 else 0
            row[name] = _cell(group[column].astype(float), digits)
        rows.append(row)
    table = pd.DataFrame(rows, columns=["Dataset", "Model", "Seeds", *COLUMNS.values()])
    if table.empty:
        return table
    table["_order"] = table["Model"].map(_order)
    return table.sort_values(["Dataset", "_order"], kind="stable").drop(columns="_order").reset_index(drop=True)


def table2_markdown(table: pd.DataFrame, failed: pd.DataFrame, missing: list[str]) -> str:
    parts = ["# Table 2: test metrics (full ranking, seen items removed)\n"]
    if missing:
        parts.append(f"\n**The sweep is incomplete: {len(missing)} planned trial(s) or search(es) have no result "
                     "yet** (`python -m raysweep.run SWEEP --resume` finishes them); see the end of this page.\n")
    if table.empty:
        parts.append("\nNo trial has finished yet.\n")
    for dataset, group in table.groupby("Dataset", sort=False):
        parts.append(f"\n## {dataset}\n")
        columns = [c for c in group.columns if c != "Dataset"]
        parts.append("| " + " | ".join(columns) + " |")
        parts.append("|" + "---|" * len(columns))
        for _, row in group.iterrows():
            parts.append("| " + " | ".join(str(row[c]) for c in columns) + " |")
    if len(failed):
        parts.append("\n## Failed trials\n")
        for _, row in failed.iterrows():
            parts.append(f"- {row['dataset']} {row['label']} seed {row['seed']} ({row['stages']}): "
                         f"{row.get('error') or 'failed'}")
    if missing:
        parts.append("\n## Missing trials\n")
        parts.extend(f"- {line}" for line in missing)
    return "\n".join(parts) + "\n"


def _figure_png(plt, fig, title: str) -> bytes:
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _panels(datasets: list[str]):
    """A figure with one panel per dataset (matplotlib without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6), squeeze=False)
    return plt, fig, zip(axes[0], datasets)


def figure2(results: pd.DataFrame) -> bytes | None:
    """Test NDCG@10 against N (log axis), one panel per dataset; None if no SASRec+ N trials."""
    ok = _table2_rows(results)
    sampled = ok[(ok["loss"] == "sampled_ce") & (ok["model"] == "sasrec")]
    if sampled.empty:
        return None
    plt, fig, panels = _panels(list(dict.fromkeys(sampled["dataset"])))
    for ax, dataset in panels:
        curve = sampled[sampled["dataset"] == dataset].groupby("negatives")["test_ndcg@10"].agg(["mean", "std"])
        ax.errorbar(curve.index, curve["mean"], yerr=curve["std"].fillna(0), marker="o", capsize=3,
                    label="SASRec+ N")
        for label, style in REFERENCE_LINES.items():
            ref = ok[(ok["dataset"] == dataset) & (ok["label"] == label)]["test_ndcg@10"]
            if len(ref):
                ax.axhline(ref.mean(), linestyle=style, color="gray" if label != "SASRec+" else "black", label=label)
        ax.set(xscale="log", xlabel="negatives N", ylabel="test NDCG@10", title=dataset)
        ax.legend(fontsize=8)
    return _figure_png(plt, fig, "Figure 2: NDCG@10 against the number of negatives")


def _history(run_dir: Path, key: str) -> pd.DataFrame:
    path = Path(run_dir) / "trials" / key / "history.parquet"
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable training history ({str(exc).splitlines()[0]}); nothing was "
                        "rewritten") from None


def figure1(results: pd.DataFrame, run_dir: Path) -> bytes | None:
    """Validation NDCG@10 by epoch per model (first seed), one panel per dataset."""
    ok = _table2_rows(results)
    ok = ok[ok["model"] != "bpr"]
    if ok.empty:
        return None
    plt, fig, panels = _panels(list(dict.fromkeys(ok["dataset"])))
    for ax, dataset in panels:
        rows = ok[ok["dataset"] == dataset].sort_values("seed").drop_duplicates("label")
        for _, row in sorted(rows.iterrows(), key=lambda r: _order(r[1]["label"])):
            history = _history(run_dir, row["key"])
            ax.plot(history["epoch"], history["val_ndcg@10"], label=row["label"])
        ax.set(xlabel="epoch", ylabel="validation NDCG@10", title=dataset)
        ax.legend(fontsize=8)
    return _figure_png(plt, fig, "Figure 1: validation NDCG@10 by epoch")


def _table2_rows(results: pd.DataFrame) -> pd.DataFrame:
    if results.empty:
        return results
    return results[(results["status"] == "ok") & results["in_table2"]]


def write_report(run_dir: Path) -> list[Path]:
    """Every part of the report is built first; only then are the files replaced (each by rename)."""
    run_dir = Path(run_dir)
    results = read_results(run_dir)
    missing = missing_trials(read_plan(run_dir), results)
    out = run_dir / "report"
    table = table2(results)
    failed = results[results["status"] != "ok"] if len(results) else results
    parts = {"table2.md": table2_markdown(table, failed, missing).encode(),
             "table2.csv": table.to_csv(index=False).encode(),
             "figure2.png": figure2(results), "figure1.png": figure1(results, run_dir)}
    written = []
    for name, content in parts.items():
        if content is not None:
            atomic_write(out / name, lambda tmp, content=content: tmp.write_bytes(content))
            written.append(out / name)
    return written


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raysweep.report", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    for path in write_report(args.run_dir):
        print(path)
    print((args.run_dir / "report" / "table2.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
