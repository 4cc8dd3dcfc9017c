"""One trial from the command line: the same `trial.run_trial` that every Tune trial runs.

    python -m raysweep.train --dataset ml-1m --model sasrec --loss sampled_ce --negatives 3000 \\
        [--hidden 64 --max-len 200 --device cuda --seed 0 --out DIR]

prints per-epoch progress and writes DIR/metrics.json (test metrics, best epoch, training
seconds, peak memory, every setting), DIR/history.parquet (the validation curve) and
DIR/ranks.parquet (each test user's target rank, from which any metric at any k follows).
It needs neither Ray, Optuna nor implicit (only BPR-MF imports implicit).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin

from raysweep.core.atomic import check_output_path
from raysweep.core.config import TrialConfig
from raysweep.core.errors import UserError, cli
from raysweep.core.outputs import write_result
from raysweep.core.progress import StepBar
from raysweep.core.trainer import EpochReport
from raysweep.core.trial import run_trial


def progress(report: EpochReport) -> None:
    print(
        f"epoch {report.epoch:3d} | loss {report.loss:.4f} | val ndcg@10 {report.val['ndcg@10']:.4f} "
        f"(best {report.best_ndcg:.4f} @ {report.best_epoch}) | {report.train_seconds:.2f} s + "
        f"{report.val_seconds:.2f} s",
        flush=True,
    )


def _parser() -> argparse.ArgumentParser:
    """A flag per setting of `TrialConfig`, with its description, default and choices."""
    parser = argparse.ArgumentParser(
        prog="python -m raysweep.train",
        description=__doc__.split("\n")[0],
    )
    for name, info in TrialConfig.model_fields.items():
        if name == "extra":
            continue
        kind = info.annotation
        many = get_origin(kind) is list  # list[X]: one or more values
        if get_origin(kind) is not Literal and get_args(kind):  # X | None, list[X]
            kind = next(k for k in get_args(kind) if k is not type(None))
        choices = get_args(kind) if get_origin(kind) is Literal else None
        flag = "--" + name.replace("_", "-")
        shown = {"help": info.description, "default": argparse.SUPPRESS}
        if info.default is not None and name != "dataset":
            shown["help"] += f" (default: {info.default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **shown)
        else:
            kind = str if choices else kind
            shown |= {"nargs": "+"} if many else {}
            parser.add_argument(flag, type=kind, choices=choices, required=name == "dataset", **shown)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write metrics.json, history.parquet and ranks.parquet in this folder",
    )
    return parser


def _check_out(out: Path) -> None:
    """The output folder must be writable before a trial trains, not after (nothing is created yet)."""
    check_output_path(out, "--out")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write there ({existing} is not a writable folder)")


@cli
def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    out = args.pop("out")
    cfg = TrialConfig.from_dict(args, where="command line")
    if out is not None:
        _check_out(out)
    print(
        f"raysweep: {cfg.label} on {cfg.dataset} (seed {cfg.seed}, L={cfg.max_len}, d={cfg.hidden})",
        flush=True,
    )
    bar = StepBar() if sys.stderr.isatty() else None  # a log file gets the epochs' lines only
    result = run_trial(cfg, on_epoch=lambda report, _: progress(report), on_step=bar)
    test = result.test
    print(
        f"test: HR@10 {test['hr@10']:.4f}  HR@100 {test['hr@100']:.4f}  NDCG@10 {test['ndcg@10']:.4f}  "
        f"NDCG@100 {test['ndcg@100']:.4f}  | best epoch {result.best_epoch}, {result.train_seconds:.1f} s "
        f"({result.seconds_per_epoch:.2f} s/epoch, {result.device}, {result.precision}, "
        f"peak {result.peak_memory_mb:,.0f} MB)"
    )
    if out is not None:
        write_result(result, out)
        print(f"wrote {out / 'metrics.json'}, {out / 'history.parquet'} and {out / 'ranks.parquet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
