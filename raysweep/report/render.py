"""A run's report: every part built first (`build`), laid out once as a list of blocks
(`sections`), and that one list written as Markdown (table2.md) and as one self-contained page
(index.html, figures inline, no script); then table2.csv and the figures. Files are replaced by
rename only once everything is built.
"""

from __future__ import annotations

import base64
import html
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd

from raysweep.core.atomic import atomic_write
from raysweep.core.config import BUDGET, PAPER_BUDGET, TrialConfig
from raysweep.report import comparisons as paired
from raysweep.report.figures import figure1, figure2
from raysweep.report.paper import CLAIMS
from raysweep.report.sampled import SampledSection, sampled_section
from raysweep.report.table2 import COLUMNS, MIN_SEEDS, PROTOCOL, TOLERANCE, formatted, table2, trusted
from raysweep.sweep.records import missing_trials
from raysweep.sweep.rundir import RunDir
from raysweep.sweep.spec import read_spec


@dataclass
class Parts:
    """Everything a report holds, built before any file is replaced."""

    header: list[str]  # the sweep: what it is, and its budget beside the paper's
    table: pd.DataFrame
    comparisons: list[paired.Comparison]
    notes: list[str]  # comparisons that could not be made, and why
    failed: pd.DataFrame
    damaged: pd.DataFrame  # records that failed their checks: listed, never counted
    missing: list[str]
    state: str  # "complete", or "incomplete: ..." (what is missing), from the sweep's plan
    figure1: bytes | None
    figure2: bytes | None
    sampled: SampledSection | None = None


# The blocks a report is made of; each renderer writes every kind.
@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Paragraph:
    text: str  # **bold** and `code` marks, in Markdown's way


@dataclass
class Table:
    frame: pd.DataFrame
    html_id: str
    css: str | None = None  # the HTML class: "table2" for Table 2's tables


@dataclass
class Items:
    lines: list[str]


@dataclass
class Figure:
    title: str
    png: bytes


def comparison_table(items: list[paired.Comparison]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "Dataset": c.dataset,
                "A": c.a,
                "B": c.b,
                "Metric": paired.METRICS[c.metric],
                "A - B": f"{c.diff:+.4f}",
                "95 % CI (run: users)": f"[{c.low:+.4f}, {c.high:+.4f}]",
                "CI half-width": f"{(c.high - c.low) / 2:.4f}",
                "Std over seeds (A / B)": " / ".join(
                    "-" if math.isnan(s) else f"{s:.4f}" for s in (c.std_a, c.std_b)
                ),
                "Seeds (A / B)": f"{c.seeds_a} / {c.seeds_b}",
                "p (Wilcoxon)": f"{c.p:.2g}",
                "p (Holm)": f"{c.p_holm:.2g}",
                "95 % CI (method)": f"[{c.method.low:+.4f}, {c.method.high:+.4f}]" if c.method else "-",
                "p (method, Holm)": f"{c.method.p_holm:.2g}" if c.method else "-",
            }
            for c in items
        ]
    )


BUDGET_KEYS = ("max_epochs", "patience", "val_users")


def _settings(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in settings.items())


def sweep_header(run: RunDir, ok: pd.DataFrame, plan: dict[str, Any] | None) -> list[str]:
    """What the sweep is and what it spent: its description, its budget beside the paper's
    protocol, its seeds, its resources per trial, and its trials planned and finished."""
    if not run.spec.is_file():
        return []
    spec = read_spec(run.spec)
    budget = {k: v for k, v in spec.settings.items() if k in BUDGET_KEYS}
    per_model = [
        f"{m.model}{' ' + m.loss if m.loss else ''}: {_settings(b)}"
        for m in spec.models
        if (b := {k: v for k, v in m.settings.items() if k in BUDGET_KEYS})
    ]
    paper = (
        f"the paper's protocol: up to {BUDGET['max_epochs']} epochs with patience {BUDGET['patience']}, "
        f"BERT4Rec {PAPER_BUDGET['bert4rec']['max_epochs']} with patience "
        f"{PAPER_BUDGET['bert4rec']['patience']}, {TrialConfig.model_fields['val_users'].default:,} "
        "validation users"
    )
    said = _settings(budget) if budget else "the paper's budget"
    if per_model:
        said += "; per model " + "; ".join(per_model)
    planned = sum(  # a search stage plans its samples; its trials are named as they come
        stage.get("samples", 0) if stage.get("kind") == "search" else len(stage.get("trials", []))
        for stage in (plan or {}).get("stages", {}).values()
    )
    done = ok[ok["status"] == "ok"] if len(ok) else ok
    # A trial that two stages share (a search sample that is also a seed's run) counts in both,
    # as the plan counts it.
    finished = int(done["stages"].str.count(",").add(1).sum()) if "stages" in done else len(done)
    hours = float(ok["train_seconds"].sum()) / 3600 if len(ok) and "train_seconds" in ok else 0.0
    resources = f"{spec.resources.cpus:g} CPU and {spec.resources.gpus:g} GPU per trial"
    lines = [f"**Sweep `{spec.name}`**" + (f": {spec.description.strip()}" if spec.description else "")]
    seeds = ", ".join(map(str, spec.seeds))
    own = dict.fromkeys(  # (each model's own seeds, once)
        f"{m.model} {', '.join(map(str, m.seeds))}" for m in spec.models if m.seeds and m.seeds != spec.seeds
    )
    if own:
        seeds += " (" + "; ".join(own) + ")"
    count = f"{finished} of {planned} planned trials finished" if planned else f"{finished} trials finished"
    lines.append(
        f"**Budget**: {said} ({paper}). Seeds {seeds}; {resources}; {count}, "
        f"{hours:.1f} hours of training in all."
    )
    return lines


def sections(parts: Parts) -> list:
    """The report, top to bottom."""
    out: list = [Paragraph(line) for line in parts.header]
    out.append(Heading(1, "Table 2: test metrics (full ranking, seen items removed)"))
    if parts.state != "complete":
        out.append(
            Paragraph(
                f"**The sweep is {parts.state}** (`python -m raysweep.run SWEEP --resume` finishes it); "
                "what is missing is listed at the end."
            )
        )
    shown = formatted(parts.table)
    if shown.empty:
        out.append(Paragraph("No trial has finished yet."))
    for dataset, group in shown.groupby("Dataset", sort=False):
        out += [Heading(2, dataset), Table(group[COLUMNS], f"table2-{_slug(dataset)}", "table2")]
    if len(shown):
        out.append(
            Paragraph(
                "Each cell: ours (mean ± std over seeds), then the paper's value and our difference from it. "
                f"**Verdict**, from HR@10 and NDCG@10: with {MIN_SEEDS} or more seeds a metric agrees when "
                "the paper's value lies inside our 95 % t interval of the mean over seeds, or within "
                f'{TOLERANCE:.0%} of our mean; both agree: "reproduced", else "above" or "below" the '
                f'paper ("mixed" when they part). With fewer seeds the interval means little, so only the '
                f'{TOLERANCE:.0%} band judges and the verdict says how many seeds it rests on ("1 seed: '
                f'within {TOLERANCE:.0%}"). Trials that did not run the '
                "paper's protocol (an epoch cap that stopped them before their patience ran out, or a "
                f'setting the paper fixes, {", ".join(PROTOCOL)}, set otherwise) are "not comparable": '
                "the verdict says what differs, and their numbers say nothing about the paper's."
            )
        )
    if parts.comparisons or parts.notes:
        out += [
            Heading(2, "Paired comparisons"),
            Paragraph(
                "Two levels of evidence. **Run level**: are these trained models different? Per test "
                "user, A - B of the metric (a user's value is the mean over the model's seeds); 95 % "
                "paired bootstrap CI over users; two-sided Wilcoxon signed-rank test over users. With one "
                "seed a side it speaks of two runs, not two methods: another seed can move a model by "
                "more than this CI. **Method level**, where each side has 2 or more seeds: is method A "
                "better than method B? A two-level bootstrap resamples seeds within each model, then the "
                "same users for both, for the standard error; the CI is the difference ± t × SE and p "
                "the matching t test, its degrees of freedom set by the seeds. Each level is "
                "Holm-corrected over its own tests here; a sentence speaks at the method level where "
                "there is one."
            ),
            Items([c.sentence() for c in parts.comparisons if c.metric == "ndcg@10"] + parts.notes),
        ]
        if parts.comparisons:
            out.append(Table(comparison_table(parts.comparisons), "comparisons"))
    out += [
        Figure(title, png) for title, png in (("Figure 1", parts.figure1), ("Figure 2", parts.figure2)) if png
    ]
    out += sampled_blocks(parts.sampled)
    if len(parts.failed):
        out += [
            Heading(2, "Failed trials"),
            Items(
                [
                    f"{r['dataset']} {r['label']} seed {r['seed']} ({r['stages']}): "
                    f"{r.get('error') or 'failed'}"
                    for _, r in parts.failed.iterrows()
                ]
            ),
        ]
    if len(parts.damaged):
        out += [
            Heading(2, "Damaged records (not counted)"),
            Items([f"{r['key']}: {r.get('error')}" for _, r in parts.damaged.iterrows()]),
        ]
    if parts.missing:
        out += [Heading(2, "Missing trials"), Items(parts.missing)]
    return out


def sampled_table(table: pd.DataFrame) -> pd.DataFrame:
    shown = table.copy()
    for column in shown.columns[3:]:
        shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    return shown


def sampled_blocks(section: SampledSection | None) -> list:
    """Sampled against full ranking, for the same trained models."""
    if section is None or (section.table.empty and not section.notes):
        return []
    out: list = [
        Heading(2, "Sampled vs full ranking"),
        Paragraph(
            "The same trained models under three test protocols: **full** ranking (the paper's and "
            "Table 2's: the target among every item the user has not seen); **uniform-sampled**: the "
            "target among 100 negatives drawn uniformly from those items, computed exactly from each "
            "user's full rank (the number of drawn negatives above the target is hypergeometric), "
            "with no sampling noise; **popularity-sampled**: among 100 negatives drawn in proportion "
            "to training popularity, drawn at test time (BERT4Rec's original protocol; trials from "
            "before raysweep drew them have none). Kendall's tau compares each sampled ordering of "
            "the models with the full one; the paper's comparisons are repeated under each sampled "
            "protocol with the same run- and method-level statistics, Holm over this section's tests."
        ),
    ]
    if not section.table.empty:
        out.append(Table(sampled_table(section.table), "sampled"))
    sentences = [c.sentence() for c in section.comparisons if c.metric == "ndcg@10"]
    out.append(Items(section.agreement + sentences + section.notes))
    if section.figure:
        out.append(Figure("Sampled against full NDCG@10", section.figure))
    return out


def markdown(blocks: list) -> str:
    """table2.md (figures are files of their own beside it)."""
    out = []
    for block in blocks:
        if isinstance(block, Heading):
            out += [f"{'#' * block.level} {block.text}", ""]
        elif isinstance(block, Paragraph):
            out += [block.text, ""]
        elif isinstance(block, Table):
            frame = block.frame
            out += ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
            out += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
            out.append("")
        elif isinstance(block, Items):
            out += [f"- {line}" for line in block.lines] + [""]
    return "\n".join(out)


def _slug(text: str) -> str:
    """A value as an HTML id: letters, digits, '-' and '_' only (ids are attributes: nothing of
    the value may close them)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(text))[:80]


def _inline(text: str) -> str:
    """A paragraph's text escaped, then its **bold** and `code` marks as tags."""
    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


def page(name: str, blocks: list, progress: str, live: bool) -> str:
    """index.html: one self-contained page (every value escaped, figures inline, no script)."""
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>raysweep: {html.escape(name)}</title>",
    ]
    if live:
        out.append('<meta http-equiv="refresh" content="30">')  # the driver rewrites the page as trials end
    out += [
        "<style>body{font-family:sans-serif;margin:2em;max-width:90em}table{border-collapse:collapse;"
        "font-size:90%}td,th{border:1px solid #ccc;padding:3px 6px}th{background:#eee}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>raysweep: {html.escape(name)}</h1>",
        f'<p id="progress">{html.escape(progress)}</p>',
    ]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level + 1}>{html.escape(block.text)}</h{block.level + 1}>")
        elif isinstance(block, Paragraph):
            out.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Table):
            table = block.frame.to_html(
                index=False, border=0, table_id=_slug(block.html_id), classes=block.css
            )
            out.append(table.replace(" %", "&nbsp;%"))  # a cell's "-22.7 %" never breaks before its %
        elif isinstance(block, Items):
            out += ["<ul>", *[f"<li>{html.escape(line)}</li>" for line in block.lines], "</ul>"]
        elif isinstance(block, Figure):
            data = base64.b64encode(block.png).decode()
            out += [
                f"<h2>{block.title}</h2>",
                f'<img alt="{block.title}" src="data:image/png;base64,{data}">',
            ]
    return "\n".join(out + ["</body></html>", ""])


def sweep_pairs(run: RunDir) -> list[tuple[str, str]]:
    """The paper's claims, then the pairs the sweep file names under `compare:`."""
    extra = read_spec(run.spec).compare if run.spec.is_file() else []
    return [*CLAIMS, *[tuple(pair) for pair in extra]]


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


def cached_sampled(run: RunDir, ok: pd.DataFrame, cache: dict | None) -> SampledSection:
    """The sampled-vs-full section, built again only when the finished trials change: the live
    page is rewritten as trials end, and the section loads the data and bootstraps."""
    cache = {} if cache is None else cache
    ident = tuple(sorted(ok.loc[ok["status"] == "ok", "key"]))
    if cache.get("sampled", (None,))[0] != ident:
        cache["sampled"] = (ident, sampled_section(run, ok, sweep_pairs(run)))
    return cache["sampled"][1]


def build(run: RunDir, cache: dict | None = None) -> tuple[Parts, pd.DataFrame]:
    results = run.read_results()
    plan = run.read_plan()
    ok, damaged = trusted(results)
    missing = missing_trials(plan, ok)
    items, notes = paired.compare_models(run, ok, sweep_pairs(run), cache)
    failed = ok[ok["status"] == "failed"] if len(ok) else ok
    parts = Parts(
        sweep_header(run, ok, plan),
        table2(ok),
        items,
        notes,
        failed,
        damaged,
        missing,
        sweep_state(plan, missing),
        figure1(ok, run),
        figure2(ok),
        cached_sampled(run, ok, cache) if len(ok) else None,
    )
    return parts, results


def write_report(run: RunDir, progress: dict[str, Any] | None = None, cache: dict | None = None) -> list:
    """Every part of the report is built first; only then are the files replaced (each by rename).
    `progress` (running, waiting, stage) marks a page the driver rewrites while the sweep runs."""
    parts, results = build(run, cache)
    blocks = sections(parts)
    files = {
        "table2.md": markdown(blocks).encode(),
        "table2.csv": parts.table.to_csv(index=False).encode(),
        "figure1.png": parts.figure1,
        "figure2.png": parts.figure2,
        "sampled.png": parts.sampled.figure if parts.sampled else None,
        "index.html": page(
            run.path.name, blocks, progress_line(results, parts, progress), live=progress is not None
        ).encode(),
    }
    written = []
    for file, content in files.items():
        if content is not None:
            atomic_write(run.report / file, lambda tmp, content=content: tmp.write_bytes(content))
            written.append(run.report / file)
    return written
