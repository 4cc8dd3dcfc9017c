"""The report's figures, as PNG bytes: Figure 1 (validation NDCG@10 by epoch, per dataset) and
Figure 2 (test NDCG@10 against the number of negatives N, with the reference models, the paper's
values, and quality against peak memory)."""

from __future__ import annotations

import io
import re

import pandas as pd

from raysweep.report.paper import paper_row
from raysweep.report.table2 import device_label, order, table2_rows
from raysweep.sweep.rundir import RunDir

REFERENCES = {"SASRec+": ("-", "C1"), "SASRec": ("--", "C2"), "BERT4Rec": (":", "C3")}


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
    ok = table2_rows(results)
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
            _memory_panel(ax, with_memory, dataset, ticker)
    return _figure_png(plt, fig, "Figure 2: NDCG@10 against the number of negatives")


def _memory_panel(ax, rows: pd.DataFrame, dataset: str, ticker) -> None:
    """NDCG@10 against peak memory, a labelled point per model, a marker per device where trials
    ran on more than one (a CPU's resident set and a GPU's memory are different budgets). Labels
    point inward (left of the points in the right half) so they stay inside the axes; a log axis
    only where memory spans a decade or more, else a linear one with a few round ticks."""
    from matplotlib.lines import Line2D

    devices = rows["device"].map(device_label) if "device" in rows else pd.Series("", index=rows.index)
    markers = dict(zip(sorted(devices.unique()), "o^sDv*"))
    means = rows.groupby("label")[["peak_memory_mb", "test_ndcg@10"]].mean()
    low, high = means["peak_memory_mb"].min(), means["peak_memory_mb"].max()
    for label, group in rows.groupby("label"):
        color = None  # one colour per model, whatever its devices
        for device, part in group.groupby(devices[group.index]):
            points = ax.scatter(
                part["peak_memory_mb"], part["test_ndcg@10"], s=18, marker=markers[device], color=color
            )
            color = points.get_facecolor()[0]
        x, y = means.loc[label]
        right = high > low and (x - low) / (high - low) > 0.5
        ax.annotate(
            label, (x, y), xytext=(-4 if right else 4, 3), textcoords="offset points",
            ha="right" if right else "left", fontsize=6,
        )  # fmt: skip
    if len(markers) > 1:
        kinds = [
            Line2D(
                [],
                [],
                marker=m,
                linestyle="",
                color="gray",
                label=f"{d}: {'resident set' if d == 'CPU' else 'device'}",
            )
            for d, m in markers.items()
        ]
        ax.legend(handles=kinds, fontsize=6, loc="lower right")
    ax.set(xlabel="peak memory (MB)", ylabel="test NDCG@10", title=f"{dataset}: quality per memory")
    if high >= 10 * low:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    else:
        ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=5))
    ax.xaxis.set_major_formatter(ticker.StrMethodFormatter("{x:,.0f}"))
    ax.margins(x=0.12, y=0.12)


def figure1(results: pd.DataFrame, run: RunDir) -> bytes | None:
    """Validation NDCG@10 by epoch per model (first seed), one panel per dataset."""
    from matplotlib.ticker import MaxNLocator

    ok = table2_rows(results)
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
        for _, row in sorted(rows.iterrows(), key=lambda r: order(r[1]["label"])):
            history = run.history(row["key"])
            ax.plot(history["epoch"], history["val_ndcg@10"], label=row["label"])
        ax.set(xlabel="epoch", ylabel="validation NDCG@10", title=dataset)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, **({"loc": "upper left", "bbox_to_anchor": (1, 1)} if many else {}))
    return _figure_png(plt, fig, "Figure 1: validation NDCG@10 by epoch")
