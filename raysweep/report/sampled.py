"""Sampled metrics from full ranks, exactly: what HR@k and NDCG@k would have been had each test
user's target been ranked among n negatives drawn uniformly, without replacement, from the items
the user could be recommended (BERT4Rec's protocol draws n = 100), instead of among all items.

With the target's full rank r (the number of candidate items scored above it) among the pool of
P candidate negatives, the number of drawn negatives that outrank the target is hypergeometric
(P items, r of them "above", n draws), so the expected sampled metrics follow from r and P alone:
no sampling noise and no retraining (Krichene & Rendle, "On Sampled Metrics for Item
Recommendation", KDD 2020). A full-rank miss (the target seen before, a broken score) stays a miss.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special, stats

from raysweep.core.config import TrialConfig
from raysweep.core.errors import UserError
from raysweep.core.outputs import SAMPLED_COLUMN
from raysweep.core.split import Split
from raysweep.core.trial import load_split
from raysweep.report.comparisons import METRICS, Comparison, compare, holm_corrected, user_values
from raysweep.report.table2 import order, table2_rows
from raysweep.sweep.rundir import RunDir

SAMPLED_N = 100  # negatives per test user in BERT4Rec's sampled protocol


def negative_pool(split: Split) -> np.ndarray:
    """Per test user, how many items a sampler may draw as negatives: every item id but padding,
    the items of the user's history before the target, and the target itself."""
    lengths = np.diff(split.offsets)
    user = np.repeat(np.arange(split.num_users), lengths)
    last = np.zeros(len(split.items), dtype=bool)
    last[split.offsets[1:] - 1] = True
    history = np.unique(np.stack([user[~last], split.items[~last]]), axis=1)  # distinct (user, item)
    distinct = np.bincount(history[0], minlength=split.num_users)
    return split.num_items - distinct - 1


def hypergeom_pmf(j, population, successes, draws) -> np.ndarray:
    """P(j successes in `draws` draws without replacement), through log binomial coefficients
    (scipy.special.gammaln): the same values as scipy.stats.hypergeom.pmf, about a thousand
    times faster on a grid of users x ranks."""

    def log_choose(a, b):
        return special.gammaln(a + 1) - special.gammaln(b + 1) - special.gammaln(a - b + 1)

    j, population, successes, draws = np.broadcast_arrays(j, population, successes, draws)
    possible = (j <= successes) & (draws - j <= population - successes) & (j <= draws)
    with np.errstate(invalid="ignore"):
        log = (
            log_choose(successes, j)
            + log_choose(population - successes, draws - j)
            - log_choose(population, draws)
        )
    return np.where(possible, np.exp(np.where(possible, log, 0.0)), 0.0)


def uniform_sampled(ranks: np.ndarray, pool: np.ndarray, n: int = SAMPLED_N, k: int = 10) -> dict:
    """Per-user expected HR@k and NDCG@k when the target meets n uniformly drawn negatives (all
    of the pool where it holds fewer than n)."""
    ranks, pool = np.asarray(ranks, dtype=np.int64), np.asarray(pool, dtype=np.int64)
    miss = ranks > pool  # (a full-rank miss carries the catalogue's size, above any pool)
    above = np.minimum(ranks, pool)
    draws = np.minimum(n, pool)
    j = np.arange(k)[None, :]
    pmf = hypergeom_pmf(j, pool[:, None], above[:, None], draws[:, None])
    hr = np.where(miss, 0.0, pmf.sum(1))
    ndcg = np.where(miss, 0.0, (pmf / np.log2(j + 2)).sum(1))
    return {f"hr@{k}": hr, f"ndcg@{k}": ndcg}


PROTOCOLS = {"full": "full ranking", "uniform": "uniform-sampled", "popularity": "popularity-sampled"}


@dataclass
class SampledSection:
    """The report's "sampled vs full" part: per model NDCG@10 / HR@10 under each protocol, the
    orderings' agreement with full ranking, the paper's claims under each, and a figure."""

    table: pd.DataFrame
    agreement: list[str]  # Kendall's tau per dataset and protocol, and which pairs swap
    comparisons: list[Comparison]  # the paper's claims, per sampled protocol (dataset "beauty, uniform")
    notes: list[str]  # what could not be computed, and why
    figure: bytes | None


def _protocol_values(protocol: str, pool: np.ndarray | None, n: int):
    """A user's metric from one seed's ranks under `protocol` (`compare`'s `values`)."""
    if protocol == "uniform":
        return lambda ranks, metric: uniform_sampled(ranks, pool, n, int(metric.split("@")[1]))[metric]
    return lambda ranks, metric: user_values([ranks], metric)


def sampled_section(run: RunDir, results: pd.DataFrame, pairs: list[tuple[str, str]]) -> SampledSection:
    """Every Table 2 model's full, uniform-sampled (exact, from its full ranks) and popularity-
    sampled (where the trial drew them) HR@10 and NDCG@10, means over seeds."""
    ok = table2_rows(results)
    rows, agreement, comparisons, notes = [], [], [], []
    for dataset in dict.fromkeys(ok["dataset"]) if len(ok) else []:
        here = ok[ok["dataset"] == dataset]
        try:
            pool = negative_pool(load_split(TrialConfig.from_dict({"dataset": dataset, "model": "bpr"})))
        except UserError as exc:
            notes.append(f"{dataset}: sampled metrics skipped: its data is not here ({exc})")
            continue
        # Records written before raysweep stored sampled_n have none: they drew no negatives.
        drawn_n = here["sampled_n"].dropna() if "sampled_n" in here else pd.Series(dtype=float)
        n = int(drawn_n.iloc[0]) if len(drawn_n) else SAMPLED_N
        ranks: dict[str, dict[str, list[np.ndarray]]] = {"full": {}, "uniform": {}, "popularity": {}}
        for label, group in here.groupby("label", sort=False):
            keys = list(group.sort_values("seed")["key"])
            try:
                full = [run.ranks(k) for k in keys]
            except (OSError, ValueError, KeyError) as exc:
                notes.append(f"{dataset}: {label} skipped: a trial's ranks.parquet is unreadable ({exc})")
                continue
            if any(len(r) != len(pool) for r in full):
                notes.append(
                    f"{dataset}: {label} skipped: its ranks hold {len(full[0]):,} test users, the data "
                    f"{len(pool):,} (a record of other data?)"
                )
                continue
            ranks["full"][label] = ranks["uniform"][label] = full
            with contextlib.suppress(OSError, ValueError, KeyError):  # (older trials have none)
                ranks["popularity"][label] = [run.ranks(k, SAMPLED_COLUMN) for k in keys]
            row = {"Dataset": dataset, "Model": label, "Seeds": len(keys)}
            for protocol, by_label in ranks.items():
                if label not in by_label:
                    continue
                values = _protocol_values(protocol, pool, n)
                for metric in METRICS:
                    row[f"{METRICS[metric]} {protocol}"] = float(
                        np.mean([values(r, metric).mean() for r in by_label[label]])
                    )
            rows.append(row)
        table = pd.DataFrame([r for r in rows if r["Dataset"] == dataset])
        for protocol in ("uniform", "popularity"):
            column = f"NDCG@10 {protocol}"
            if column not in table or table[column].isna().any() or len(table) < 2:
                continue
            tau = stats.kendalltau(table["NDCG@10 full"], table[column]).statistic
            agreement.append(f"{dataset}: {PROTOCOLS[protocol]} NDCG@10 orders the models with Kendall's tau "
                             f"{tau:+.2f} against full ranking; {swaps(table, column)}")  # fmt: skip
            for a, b in dict.fromkeys(pairs):
                if a in ranks[protocol] and b in ranks[protocol]:
                    for metric in METRICS:
                        comparisons.append(
                            compare(f"{dataset}, {PROTOCOLS[protocol]}", a, b, ranks[protocol][a],
                                    ranks[protocol][b], metric, values=_protocol_values(protocol, pool, n))
                        )  # fmt: skip
    frame = pd.DataFrame(rows)
    if len(frame):  # Table 2's order
        frame = frame.sort_values(
            ["Dataset", "Model"], key=lambda c: c.map(order) if c.name == "Model" else c
        )
    return SampledSection(frame, agreement, holm_corrected(comparisons), notes, _figure(frame))


def swaps(table: pd.DataFrame, column: str) -> str:
    """The pairs of models whose order under `column` is the reverse of full ranking's."""
    flipped = []
    values = table.set_index("Model")
    labels = list(values.index)
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            full = values.at[a, "NDCG@10 full"] - values.at[b, "NDCG@10 full"]
            sampled = values.at[a, column] - values.at[b, column]
            if full * sampled < 0:
                high, low = (a, b) if sampled > 0 else (b, a)
                flipped.append(f"{high} above {low}")
    if not flipped:
        return "no pair of models changes order"
    return "these pairs swap (sampled order given): " + ", ".join(flipped)


def _figure(table: pd.DataFrame) -> bytes | None:
    """Sampled NDCG@10 against full NDCG@10, a point per model and protocol, a panel per dataset."""
    if table.empty:
        return None
    from raysweep.report.figures import _figure_png, _panels

    datasets = list(dict.fromkeys(table["Dataset"]))
    plt, fig, axes = _panels(datasets)
    for ax, dataset in zip(axes[0], datasets):
        here = table[table["Dataset"] == dataset]
        for protocol, marker in (("uniform", "o"), ("popularity", "s")):
            column = f"NDCG@10 {protocol}"
            if column not in here or here[column].isna().all():
                continue
            ax.scatter(here["NDCG@10 full"], here[column], marker=marker, label=PROTOCOLS[protocol])
            for _, row in here.iterrows():
                ax.annotate(row["Model"], (row["NDCG@10 full"], row[column]), fontsize=6,
                            xytext=(3, 2), textcoords="offset points")  # fmt: skip
        ax.set(
            xlabel="full-ranking NDCG@10", ylabel=f"sampled NDCG@10 ({SAMPLED_N} negatives)", title=dataset
        )
        ax.legend(fontsize=7)
        ax.margins(0.12)
    return _figure_png(plt, fig, "Sampled against full NDCG@10, the same trained models")
