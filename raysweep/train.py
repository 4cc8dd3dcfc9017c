"""One trial, from the command line or from Ray Tune: the same `run_trial` either way.

    python -m raysweep.train --dataset ml-1m --model sasrec --loss sampled_ce --negatives 3000 \\
        [--hidden 64 --max-len 200 --device cuda --seed 0 --out DIR]

prints per-epoch progress and writes DIR/metrics.json (test metrics, best epoch, training
seconds, peak memory, every setting), DIR/history.parquet (the validation curve) and
DIR/ranks.parquet (each test user's target rank, from which any metric at any k follows).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from raysweep.config import TrialConfig
from raysweep.atomic import atomic_write
from raysweep.data import load_interactions
from raysweep.errors import UserError, cli
from raysweep.memory import device_memory, track_peak, training_bytes
from raysweep.metrics import mean_metrics
from raysweep.models import build_model
from raysweep.split import SequenceData, Split, leave_one_out, sequence_data
from raysweep.trainer import EpochReport, autocast_for, fit, precision, rank_split

Hook = Callable[[EpochReport, Callable[[], dict]], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but no CUDA device is visible")
    return torch.device(name)


def load_split(cfg: TrialConfig) -> Split:
    frame = load_interactions(cfg.dataset, cfg.data_dir and Path(cfg.data_dir), cfg.mirror and Path(cfg.mirror))
    return leave_one_out(frame, cfg.dataset)


def check_fits(cfg: TrialConfig, split: Split, device: torch.device | None) -> None:
    """Refuse, before anything is allocated, a sequential model on data that leaves it nothing to
    learn from, and a trial that could not fit on its device (None: not known here)."""
    if cfg.model != "bpr" and (np.diff(split.offsets) - 2).max() < 2:
        raise UserError(f"{cfg.dataset}: no user has two training items (every history is 3 items or shorter), "
                        f"so {cfg.label} has nothing to learn from")
    if device is None:
        return
    need = training_bytes(cfg.model, cfg.loss, cfg.negatives, cfg.hidden, cfg.blocks, cfg.heads, cfg.max_len,
                          cfg.batch_size, cfg.factors, split.num_users, split.num_items)
    have = device_memory(device)
    if need > have:
        raise UserError(f"{cfg.dataset}: {cfg.label} with hidden={cfg.hidden}, blocks={cfg.blocks}, "
                        f"max_len={cfg.max_len}, batch_size={cfg.batch_size} needs at least {need / 2**30:,.1f} GiB, "
                        f"more than the {have / 2**30:,.1f} GiB of {device.type}")


def check_negatives(cfg: TrialConfig, data: SequenceData) -> None:
    """N must leave enough pool items for every user once its own window is excluded."""
    if cfg.negatives is None:
        return
    room = data.pool_size - data.max_window_items
    if cfg.negatives > room:
        raise UserError(
            f"{cfg.dataset}: N={cfg.negatives} negatives is more than the pool allows: {data.pool_size} "
            f"training items minus up to {data.max_window_items} in a user's window leaves {room}"
        )


def progress(report: EpochReport) -> None:
    print(f"epoch {report.epoch:3d} | loss {report.loss:.4f} | val ndcg@10 {report.val['ndcg@10']:.4f} "
          f"(best {report.best_ndcg:.4f} @ {report.best_epoch}) | {report.train_seconds:.2f} s + "
          f"{report.val_seconds:.2f} s", flush=True)


def run_trial(cfg: TrialConfig, on_epoch: Hook | None = None, resume: dict | None = None) -> dict[str, Any]:
    """Train and test one trial; returns the result record (settings, test metrics, timings, peak
    memory) with its per-epoch history and each test user's target rank (`ranks`, int32).
    Raises `Diverged` when the training loss turns non-finite."""
    cfg = cfg.resolved()
    split = load_split(cfg)
    device = torch.device("cpu") if cfg.model == "bpr" else resolve_device(cfg.device)
    check_fits(cfg, split, device)
    peak = track_peak(device)
    if cfg.model == "bpr":
        from raysweep.bpr import run_bpr

        outcome = run_bpr(cfg, split)
    else:
        data = sequence_data(split, cfg.max_len, device)
        check_negatives(cfg, data)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, data.num_items, cfg.hidden, cfg.blocks, cfg.heads, cfg.max_len,
                            cfg.dropout).to(device)
        fitted = fit(model, cfg, data, device, on_epoch, resume)
        all_users = torch.arange(data.num_users, device=device)
        ranks = rank_split(model, cfg, data, "test", all_users, autocast_for(cfg, device))
        outcome = {"val": {"ndcg@10": fitted.best_ndcg}, "test": mean_metrics(ranks), "ranks": ranks.numpy(),
                   "best_epoch": fitted.best_epoch, "epochs": fitted.epochs, "train_seconds": fitted.seconds,
                   "history": fitted.history,
                   "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "precision": precision(cfg, device)}
    return {
        "label": cfg.label, "config": cfg.to_dict(),
        **{k: v for k, v in outcome.items() if k not in ("history", "ranks")},
        "seconds_per_epoch": outcome["train_seconds"] / max(outcome["epochs"], 1),
        "peak_memory_mb": peak(), "node": platform.node(), "history": outcome["history"], "ranks": outcome["ranks"],
    }


def ranks_frame(ranks: np.ndarray) -> pd.DataFrame:
    """ranks.parquet: row u is test user u's 0-based target rank (the catalogue's size: a miss)."""
    return pd.DataFrame({"rank": np.asarray(ranks, dtype=np.int32)})


def write_result(result: dict[str, Any], out: Path) -> None:
    """history.parquet, ranks.parquet, then metrics.json, each written under a temporary name and renamed."""
    out.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in result.items() if k not in ("history", "ranks")}
    atomic_write(out / "history.parquet", lambda tmp: pd.DataFrame(result["history"]).to_parquet(tmp, index=False))
    atomic_write(out / "ranks.parquet", lambda tmp: ranks_frame(result["ranks"]).to_parquet(tmp, index=False))
    atomic_write(out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m raysweep.train", description=__doc__.split("\n")[0])
    kinds = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(TrialConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        base = str(f.type).split("|")[0].strip()
        if base == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, type=kinds[base], default=argparse.SUPPRESS, required=f.name == "dataset")
    parser.add_argument("--out", type=Path, default=None,
                        help="write metrics.json, history.parquet and ranks.parquet in this folder")
    return parser


def _check_out(out: Path) -> None:
    """The output folder must be writable before a trial trains, not after (nothing is created yet)."""
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
    print(f"raysweep: {cfg.label} on {cfg.dataset} (seed {cfg.seed}, L={cfg.max_len}, d={cfg.hidden})", flush=True)
    result = run_trial(cfg, on_epoch=lambda report, _: progress(report))
    test = result["test"]
    print(f"test: HR@10 {test['hr@10']:.4f}  HR@100 {test['hr@100']:.4f}  NDCG@10 {test['ndcg@10']:.4f}  "
          f"NDCG@100 {test['ndcg@100']:.4f}  | best epoch {result['best_epoch']}, "
          f"{result['train_seconds']:.1f} s ({result['seconds_per_epoch']:.2f} s/epoch, {result['device']}, "
          f"{result['precision']}, peak {result['peak_memory_mb']:,.0f} MB)")
    if out is not None:
        write_result(result, out)
        print(f"wrote {out / 'metrics.json'}, {out / 'history.parquet'} and {out / 'ranks.parquet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
