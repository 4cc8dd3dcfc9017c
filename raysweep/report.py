"""The report of a run directory: the paper's Table 2 with the paper beside every result, paired
comparisons over users, Figures 1 and 2, and one self-contained page with all of it.

    python -m raysweep.report RUN_DIR [--rebuild]

writes RUN_DIR/report/:
- table2.md: per dataset, each cell ours (mean ± std over seeds) with the paper's value and
  the relative difference, and a verdict per model ("reproduced": HR@10 and NDCG@10 within
  5 % of the paper or inside our seeds' range; else "above" / "below"); then the paired
  comparisons, the failed trials and, for an unfinished sweep, the missing ones;
- table2.csv: the same numbers as raw columns (ours, std, paper, difference);
- figure1.png (validation NDCG@10 by epoch), figure2.png (test NDCG@10 against N, with the
  reference models and the paper's values);
- index.html: all of the above in one file, with the sweep's progress (the driver rewrites it
  while the sweep runs).

Only the seeds stage enters Table 2. `--rebuild` first rebuilds results.parquet from the records.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from raysweep import comparisons as paired
from raysweep.atomic import atomic_write
from raysweep.errors import UserError, cli
from raysweep.paper import CLAIMS, paper_row
from raysweep.results import missing_trials, read_plan, read_results, write_results

PAPER_ORDER = ["BPR-MF", "GRU4Rec", "BERT4Rec", "SASRec", "SASRec+"]
METRICS = [
    ("test_hr@10", "HR@10", "hr10"),
    ("test_hr@100", "HR@100", "hr100"),
    ("test_ndcg@10", "NDCG@10", "ndcg10"),
    ("test_ndcg@100", "NDCG@100", "ndcg100"),
]
OTHERS = [("train_seconds", "Training time (s)", "seconds"), ("best_epoch", "Best epoch", "best_epoch")]
TOLERANCE = 0.05  # "reproduced": within 5 % of the paper
REFERENCES = {"SASRec+": ("-", "C1"), "SASRec": ("--", "C2"), "BERT4Rec": (":", "C3")}


def _order(label: str) -> tuple:
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


def _table2_rows(results: pd.DataFrame) -> pd.DataFrame:
    ok, _ = trusted(results)
    if ok.empty:
        return ok
    return ok[(ok["status"] == "ok") & ok["in_table2"].astype(bool)]


def _verdict(group: pd.DataFrame, paper) -> str:
    """reproduced / above / below / mixed, from HR@10 and NDCG@10 against the paper."""
    off = []
    for column, key in (("test_hr@10", "hr10"), ("test_ndcg@10", "ndcg10")):
        ours, theirs = group[column].astype(float), getattr(paper, key)
        inside = len(ours) > 1 and ours.min() <= theirs <= ours.max()
        if abs(ours.mean() / theirs - 1) > TOLERANCE and not inside:
            off.append(np.sign(ours.mean() - theirs))
    if not off:
        return "reproduced"
    return {1.0: "above", -1.0: "below"}.get(off[0], "mixed") if len(set(off)) == 1 else "mixed"


def table2(results: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset x model: each column's mean and std over seeds, the paper's value and
    the relative difference (raw numbers; `table2_markdown` formats them), peak memory, verdict."""
    rows = []
    ok = _table2_rows(results)
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
        row["Verdict"] = _verdict(group, paper) if paper else ""
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["_order"] = table["Model"].map(_order)
    return (
        table.sort_values(["Dataset", "_order"], kind="stable").drop(columns="_order").reset_index(drop=True)
    )


def _cell(row: pd.Series, name: str, digits: int) -> str:
    mean, std, theirs = row[name], row[f"{name} std"], row[f"{name} paper"]
    text = f"{mean:.{digits}f}" + ("" if math.isnan(std) or std == 0 else f" ± {std:.{digits}f}")
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
        rows.append(
            {
                "Dataset": row["Dataset"],
                "Model": row["Model"],
                "Seeds": row["Seeds"],
                **cells,
                "Peak memory (MB)": "" if math.isnan(memory) else f"{memory:,.0f}",
                "Verdict": row["Verdict"],
            }
        )
    return pd.DataFrame(rows, columns=["Dataset", *COLUMNS])


@dataclass
class Parts:
    """Everything a report holds, built before any file is replaced."""

    table: pd.DataFrame
    comparisons: list[paired.Comparison]
    notes: list[str]  # comparisons that could not be made, and why
    failed: pd.DataFrame
    damaged: pd.DataFrame  # records that failed their checks: listed, never counted
    missing: list[str]
    state: str  # "complete", or "incomplete: ..." (what is missing), from the sweep's plan
    figure1: bytes | None
    figure2: bytes | None


def _markdown_table(frame: pd.DataFrame) -> list[str]:
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return lines


def comparison_table(items: list[paired.Comparison]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "Dataset": c.dataset,
                "A": c.a,
                "B": c.b,
                "Metric": paired.METRICS[c.metric],
                "A - B": f"{c.diff:+.4f}",
                "95 % CI (users)": f"[{c.low:+.4f}, {c.high:+.4f}]",
                "CI half-width": f"{(c.high - c.low) / 2:.4f}",
                "Std over seeds (A / B)": " / ".join(
                    "-" if math.isnan(s) else f"{s:.4f}" for s in (c.std_a, c.std_b)
                ),
                "Seeds (A / B)": f"{c.seeds_a} / {c.seeds_b}",
                "p (Wilcoxon)": f"{c.p:.2g}",
                "p (Holm)": f"{c.p_holm:.2g}",
            }
            for c in items
        ]
    )


def markdown(parts: Parts) -> str:
    out = ["# Table 2: test metrics (full ranking, seen items removed)", ""]
    if parts.state != "complete":
        out += [
            f"**The sweep is {parts.state}** (`python -m raysweep.run SWEEP --resume` finishes it); what is "
            "missing is listed at the end.",
            "",
        ]
    shown = formatted(parts.table)
    if shown.empty:
        out += ["No trial has finished yet.", ""]
    for dataset, group in shown.groupby("Dataset", sort=False):
        out += [f"## {dataset}", "", *_markdown_table(group[COLUMNS]), ""]
    if len(shown):
        out += [
            "Each cell: ours (mean ± std over seeds), then the paper's value and our difference from it. "
            f"Verdict: HR@10 and NDCG@10 within {TOLERANCE:.0%} of the paper, or the paper inside our seeds' "
            'range, is "reproduced"; else above or below it.',
            "",
        ]
    if parts.comparisons or parts.notes:
        out += [
            "## Paired comparisons",
            "",
            "Per test user, A - B of the metric (a user's value is the mean over the model's seeds); 95 % "
            "paired bootstrap CI over users; two-sided Wilcoxon signed-rank test over users, Holm-corrected "
            "over every comparison here.",
            "",
        ]
        out += [f"- {c.sentence()}" for c in parts.comparisons if c.metric == "ndcg@10"]
        out += [f"- {note}" for note in parts.notes]
        if parts.comparisons:
            out += ["", *_markdown_table(comparison_table(parts.comparisons))]
        out.append("")
    if len(parts.failed):
        out += ["## Failed trials", ""]
        out += [
            f"- {r['dataset']} {r['label']} seed {r['seed']} ({r['stages']}): {r.get('error') or 'failed'}"
            for _, r in parts.failed.iterrows()
        ]
        out.append("")
    if len(parts.damaged):
        out += ["## Damaged records (not counted)", ""]
        out += [f"- {r['key']}: {r.get('error')}" for _, r in parts.damaged.iterrows()]
        out.append("")
    if parts.missing:
        out += ["## Missing trials", "", *[f"- {line}" for line in parts.missing], ""]
    return "\n".join(out)


def _ranks(run_dir: Path, key: str, cache: dict) -> np.ndarray:
    if key not in cache:
        cache[key] = pd.read_parquet(Path(run_dir) / "trials" / key / "ranks.parquet")["rank"].to_numpy()
    return cache[key]


def compare_models(
    run_dir: Path, results: pd.DataFrame, pairs: list[tuple[str, str]], cache: dict | None = None
) -> tuple[list[paired.Comparison], list[str]]:
    """Every pair of `pairs` (the paper's claims, then the sweep's) on each dataset that has both,
    for NDCG@10 and HR@10, Holm-corrected together. A trial whose ranks.parquet cannot be read
    skips its comparisons, with a note that names the file."""
    cache = {} if cache is None else cache
    ranks_cache, done = cache.setdefault("ranks", {}), cache.setdefault("comparisons", {})
    ok = _table2_rows(results)
    items, notes = [], []
    for dataset in dict.fromkeys(ok["dataset"]) if len(ok) else []:
        keys = {
            label: list(group.sort_values("seed")["key"])
            for label, group in ok[ok["dataset"] == dataset].groupby("label")
        }
        for a, b in dict.fromkeys(pairs):
            if a not in keys or b not in keys:
                continue
            try:
                ranks_a = [_ranks(run_dir, k, ranks_cache) for k in keys[a]]
                ranks_b = [_ranks(run_dir, k, ranks_cache) for k in keys[b]]
            except (OSError, ValueError, KeyError) as exc:
                notes.append(f"{dataset}: {a} vs {b} skipped: a trial's ranks.parquet is unreadable ({exc})")
                continue
            for metric in paired.METRICS:
                ident = (dataset, a, b, metric, tuple(keys[a]), tuple(keys[b]))
                if ident not in done:
                    try:
                        done[ident] = paired.compare(dataset, a, b, ranks_a, ranks_b, metric)
                    except ValueError as exc:
                        notes.append(f"{dataset}: {a} vs {b} skipped: {exc}")
                        break
                items.append(done[ident])
    return paired.holm_corrected(items), notes


def sweep_pairs(run_dir: Path) -> list[tuple[str, str]]:
    """The paper's claims, then the pairs the sweep file names under `compare:`."""
    spec = Path(run_dir) / "spec.yaml"
    extra = []
    if spec.is_file():
        try:
            document = yaml.safe_load(spec.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise UserError(f"{spec}: unreadable sweep file ({str(exc).splitlines()[0]})") from None
        extra = document.get("compare") if isinstance(document, dict) else None
        extra = extra if isinstance(extra, list) else []
    return [
        *CLAIMS,
        *[
            tuple(pair)
            for pair in extra
            if isinstance(pair, list) and len(pair) == 2 and all(isinstance(name, str) for name in pair)
        ],
    ]


def _figure_png(plt, fig, title: str) -> bytes:
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _panels(datasets: list[str], rows: int = 1):
    """A figure with one panel per dataset (matplotlib without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        rows, len(datasets), figsize=(4.8 * len(datasets), 3.8 * rows), squeeze=False, layout="constrained"
    )
    return plt, fig, axes


def _family(row: pd.Series) -> str:
    """A curve of Figure 2: the trial's label with its N taken out (SASRec+ 300 -> SASRec+ N)."""
    return re.sub(rf"\b{int(row['negatives'])}\b", "N", row["label"], count=1)


def figure2(results: pd.DataFrame) -> bytes | None:
    """Test NDCG@10 against N (log axis), one curve per sampled loss, the reference models as
    lines and the paper's values (thin lines, an open marker at SASRec+ 3000); a second row,
    where peak memory is known, plots NDCG@10 against it. None without sampled trials."""
    ok = _table2_rows(results)
    sampled = ok[ok["negatives"].notna()] if len(ok) else ok
    if sampled.empty:
        return None
    datasets = list(dict.fromkeys(sampled["dataset"]))
    memory = "peak_memory_mb" in ok and ok["peak_memory_mb"].notna().any()
    plt, fig, axes = _panels(datasets, rows=2 if memory else 1)
    from matplotlib import ticker

    for column, dataset in enumerate(datasets):
        ax = axes[0][column]
        here = sampled[sampled["dataset"] == dataset]
        for family, curve in here.groupby(here.apply(_family, axis=1), sort=True):
            stats = curve.groupby("negatives")["test_ndcg@10"].agg(["mean", "std"])
            ax.errorbar(
                stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3, label=family
            )
        for label, (style, color) in REFERENCES.items():
            ours = ok[(ok["dataset"] == dataset) & (ok["label"] == label)]["test_ndcg@10"]
            if len(ours):
                ax.axhline(ours.mean(), linestyle=style, color=color, label=label)
            published = paper_row(dataset, label)
            if published:
                ax.axhline(
                    published.ndcg10,
                    linestyle=style,
                    color=color,
                    linewidth=0.7,
                    alpha=0.6,
                    label=f"paper {label}",
                )
        published = paper_row(dataset, "SASRec+ 3000")
        if published:
            ax.plot(
                [3000],
                [published.ndcg10],
                marker="o",
                markerfacecolor="none",
                color="black",
                linestyle="",
                label="paper SASRec+ 3000",
            )
        ax.set(xscale="log", xlabel="negatives N", ylabel="test NDCG@10", title=dataset)
        ax.legend(fontsize=7)
        if memory:
            ax = axes[1][column]
            with_memory = ok[(ok["dataset"] == dataset) & ok["peak_memory_mb"].notna()]
            for label, group in with_memory.groupby("label"):
                ax.scatter(group["peak_memory_mb"], group["test_ndcg@10"], s=18)
                ax.annotate(label, (group["peak_memory_mb"].mean(), group["test_ndcg@10"].mean()), fontsize=6)
            ax.set(
                xscale="log",
                xlabel="peak memory (MB)",
                ylabel="test NDCG@10",
                title=f"{dataset}: quality per memory",
            )
            # Memory spans about a decade: label 1-2-5 steps, not every minor tick in 10^k form.
            ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
            ax.xaxis.set_major_formatter(ticker.StrMethodFormatter("{x:,.0f}"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    return _figure_png(plt, fig, "Figure 2: NDCG@10 against the number of negatives")


def _history(run_dir: Path, key: str) -> pd.DataFrame:
    path = Path(run_dir) / "trials" / key / "history.parquet"
    if not path.is_file():
        raise UserError(f"{path}: the trial's training history is missing; nothing was rewritten")
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{path}: unreadable training history ({str(exc).splitlines()[0]}); nothing was rewritten"
        ) from None


def figure1(results: pd.DataFrame, run_dir: Path) -> bytes | None:
    """Validation NDCG@10 by epoch per model (first seed), one panel per dataset."""
    from matplotlib.ticker import MaxNLocator

    ok = _table2_rows(results)
    ok = ok[ok["model"] != "bpr"] if len(ok) else ok
    if ok.empty:
        return None
    datasets = list(dict.fromkeys(ok["dataset"]))
    plt, fig, axes = _panels(datasets)
    for ax, dataset in zip(axes[0], datasets):
        rows = ok[ok["dataset"] == dataset].sort_values("seed").drop_duplicates("label")
        many = len(rows) > 10  # matplotlib's default cycle repeats after ten colours
        if many:
            ax.set_prop_cycle(color=plt.cm.tab20.colors)
        for _, row in sorted(rows.iterrows(), key=lambda r: _order(r[1]["label"])):
            history = _history(run_dir, row["key"])
            ax.plot(history["epoch"], history["val_ndcg@10"], label=row["label"])
        ax.set(xlabel="epoch", ylabel="validation NDCG@10", title=dataset)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, **({"loc": "upper left", "bbox_to_anchor": (1, 1)} if many else {}))
    return _figure_png(plt, fig, "Figure 1: validation NDCG@10 by epoch")


def sweep_state(plan: dict[str, Any] | None, missing: list[str]) -> str:
    """ "complete" only when the plan says every stage ran and no planned trial lacks a result."""
    trials = sum(1 for line in missing if not line.startswith("search-"))
    searches = len(missing) - trials
    if missing:
        return "incomplete: " + ", ".join(
            part
            for part in (
                f"{trials} trial(s) not run" if trials else "",
                f"{searches} search(es) not finished" if searches else "",
            )
            if part
        )
    if plan is None:
        return "incomplete: it has no plan.json, so what it meant to run is not known"
    if plan.get("complete") is False:  # (plans written before raysweep kept this mark have none)
        return "incomplete: it was stopped before its last stage ended"
    return "complete"


def progress_line(results: pd.DataFrame, parts: Parts, progress: dict[str, Any] | None) -> str:
    counts = results["status"].value_counts() if len(results) else pd.Series(dtype=int)
    forged = int((parts.damaged["status"] == "ok").sum()) if len(parts.damaged) else 0
    done, failed = int(counts.get("ok", 0)) - forged, int(counts.get("failed", 0))
    damaged = f", {len(parts.damaged)} damaged" if len(parts.damaged) else ""
    if progress is None:
        return f"{done} done, {failed} failed{damaged}; the sweep is {parts.state}"
    updated = time.strftime("%Y-%m-%d %H:%M:%S")
    return (
        f"{done} done, {failed} failed{damaged}, {progress['running']} running, "
        f"{progress['waiting']} waiting (stage {progress['stage']}; updated {updated})"
    )


def _slug(text: str) -> str:
    """A value as an HTML id: letters, digits, '-' and '_' only (ids are attributes: nothing of
    the value may close them)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(text))[:80]


def index_html(name: str, parts: Parts, progress: str, live: bool) -> str:
    """One self-contained page: figures inline, no script, no outside file."""

    def esc(text: str) -> str:
        return html.escape(str(text))

    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>raysweep: {esc(name)}</title>",
    ]
    if live:
        out.append('<meta http-equiv="refresh" content="30">')  # the driver rewrites the page as trials end
    out += [
        "<style>body{font-family:sans-serif;margin:2em;max-width:90em}table{border-collapse:collapse;"
        "font-size:90%}td,th{border:1px solid #ccc;padding:3px 6px}th{background:#eee}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>raysweep: {esc(name)}</h1>",
        f'<p id="progress">{esc(progress)}</p>',
        "<h2>Table 2</h2>",
    ]
    shown = formatted(parts.table)
    if shown.empty:
        out.append("<p>No trial has finished yet.</p>")
    for dataset, group in shown.groupby("Dataset", sort=False):
        out += [
            f"<h3>{esc(dataset)}</h3>",
            group[COLUMNS].to_html(
                index=False, classes="table2", border=0, table_id=f"table2-{_slug(dataset)}"
            ),
        ]
    if parts.comparisons or parts.notes:
        out += ["<h2>Paired comparisons</h2>", "<ul>"]
        out += [f"<li>{esc(c.sentence())}</li>" for c in parts.comparisons if c.metric == "ndcg@10"]
        out += [f"<li>{esc(note)}</li>" for note in parts.notes] + ["</ul>"]
        if parts.comparisons:
            out.append(
                comparison_table(parts.comparisons).to_html(index=False, border=0, table_id="comparisons")
            )
    for title, png in (("Figure 1", parts.figure1), ("Figure 2", parts.figure2)):
        if png is not None:
            out += [
                f"<h2>{title}</h2>",
                f'<img alt="{title}" src="data:image/png;base64,{base64.b64encode(png).decode()}">',
            ]
    if len(parts.failed):
        out += ["<h2>Failed trials</h2>", "<ul>"]
        out += [
            f"<li>{esc(r['dataset'])} {esc(r['label'])} seed {r['seed']} ({esc(r['stages'])}): "
            f"{esc(r.get('error') or 'failed')}</li>"
            for _, r in parts.failed.iterrows()
        ] + ["</ul>"]
    if len(parts.damaged):
        out += ["<h2>Damaged records (not counted)</h2>", "<ul>"]
        out += [f"<li>{esc(r['key'])}: {esc(r.get('error'))}</li>" for _, r in parts.damaged.iterrows()]
        out.append("</ul>")
    if parts.missing:
        out += [
            "<h2>Missing trials</h2>",
            "<ul>",
            *[f"<li>{esc(line)}</li>" for line in parts.missing],
            "</ul>",
        ]
    return "\n".join(out + ["</body></html>", ""])


def build(run_dir: Path, cache: dict | None = None) -> tuple[Parts, pd.DataFrame]:
    results = read_results(run_dir)
    plan = read_plan(run_dir)
    ok, damaged = trusted(results)
    missing = missing_trials(plan, ok)
    items, notes = compare_models(run_dir, ok, sweep_pairs(run_dir), cache)
    failed = ok[ok["status"] == "failed"] if len(ok) else ok
    parts = Parts(
        table2(ok),
        items,
        notes,
        failed,
        damaged,
        missing,
        sweep_state(plan, missing),
        figure1(ok, run_dir),
        figure2(ok),
    )
    return parts, results


def write_report(
    run_dir: Path, progress: dict[str, Any] | None = None, cache: dict | None = None
) -> list[Path]:
    """Every part of the report is built first; only then are the files replaced (each by rename).
    `progress` (running, waiting, stage) marks a page the driver rewrites while the sweep runs."""
    run_dir = Path(run_dir)
    parts, results = build(run_dir, cache)
    name = run_dir.name
    files = {
        "table2.md": markdown(parts).encode(),
        "table2.csv": parts.table.to_csv(index=False).encode(),
        "figure1.png": parts.figure1,
        "figure2.png": parts.figure2,
        "index.html": index_html(
            name, parts, progress_line(results, parts, progress), live=progress is not None
        ).encode(),
    }
    written = []
    for file, content in files.items():
        if content is not None:
            atomic_write(run_dir / "report" / file, lambda tmp, content=content: tmp.write_bytes(content))
            written.append(run_dir / "report" / file)
    return written


class LivePage:
    """The report rewritten while a sweep runs, in a thread of its own so that Tune's loop never
    waits for a figure: each request replaces one not yet served, and the report is written at
    most every `every` seconds, and never more than a tenth of the time (a build takes longer
    as trials accumulate, and the page must not take a trial's CPU). `close` writes what is
    still requested and ends the thread."""

    def __init__(self, run_dir: Path, every: float = 10.0):
        self.run_dir, self.every = Path(run_dir), every
        self.build_seconds = 0.0
        self.cache: dict = {}
        self.wanted: dict[str, Any] | None = None
        self.closing = False
        self.written_at = 0.0
        self.reported: set[str] = set()
        self.condition = threading.Condition()
        self.thread = threading.Thread(target=self._serve, name="raysweep-live-page", daemon=True)
        self.thread.start()

    def request(self, progress: dict[str, Any]) -> None:
        with self.condition:
            self.wanted = progress
            self.condition.notify()

    def close(self) -> None:
        with self.condition:
            self.closing = True
            self.condition.notify()
        self.thread.join()

    def _serve(self) -> None:
        while True:
            with self.condition:
                while self.wanted is None and not self.closing:
                    self.condition.wait()
                if self.wanted is None:
                    return
                # (a request wakes the thread early: the deadline still holds)
                deadline = self.written_at + max(self.every, 9 * self.build_seconds)
                while not self.closing and (left := deadline - time.monotonic()) > 0:
                    self.condition.wait(left)
                progress, self.wanted = self.wanted, None
            began = time.monotonic()
            try:
                write_report(self.run_dir, progress, self.cache)
            except (UserError, OSError, ValueError) as exc:  # the sweep goes on; say so once per problem
                if str(exc) not in self.reported:
                    self.reported.add(str(exc))
                    print(
                        f"[raysweep] the live page could not be written: {exc}", file=sys.stderr, flush=True
                    )
            self.written_at = time.monotonic()
            self.build_seconds = self.written_at - began


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raysweep.report", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--rebuild", action="store_true", help="rebuild results.parquet from the trial records first"
    )
    args = parser.parse_args(argv)
    if args.rebuild:
        write_results(args.run_dir)
    for path in write_report(args.run_dir):
        print(path)
    print((args.run_dir / "report" / "table2.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
