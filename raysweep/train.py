"""One trial, from the command line or from Ray Tune: the same `run_trial` either way.

    python -m raysweep.train --dataset ml-1m --model sasrec --loss sampled_ce --negatives 3000 \\
        [--hidden 64 --max-len 200 --device cuda --seed 0 --out DIR]

prints per-epoch progress and writes DIR/metrics.json (test metrics, best epoch, training
seconds, every setting) and DIR/history.parquet (the validation curve).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from raysweep.config import TrialConfig
from raysweep.atomic import atomic_write
from raysweep.data import load_interactions
from raysweep.errors import UserError, cli
from raysweep.models import build_model
from raysweep.split import SequenceData, Split, leave_one_out, sequence_data
from raysweep.trainer import EpochReport, autocast_for, evaluate_split, fit, precision

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
    """Train and test one trial; returns the result record (settings, test metrics, timings)."""
    cfg = cfg.resolved()
    split = load_split(cfg)
    if cfg.model == "bpr":
        from raysweep.bpr import run_bpr

        outcome = run_bpr(cfg, split)
    else:
        device = resolve_device(cfg.device)
        data = sequence_data(split, cfg.max_len, device)
        check_negatives(cfg, data)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, data.num_items, cfg.hidden, cfg.blocks, cfg.heads, cfg.max_len,
                            cfg.dropout).to(device)
        fitted = fit(model, cfg, data, device, on_epoch, resume)
        all_users = torch.arange(data.num_users, device=device)
        test = evaluate_split(model, cfg, data, "test", all_users, autocast_for(cfg, device))
        outcome = {"val": {"ndcg@10": fitted.best_ndcg}, "test": test, "best_epoch": fitted.best_epoch,
                   "epochs": fitted.epochs, "train_seconds": fitted.seconds, "history": fitted.history,
                   "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "precision": precision(cfg, device)}
    return {
        "label": cfg.label, "config": cfg.to_dict(), **{k: v for k, v in outcome.items() if k != "history"},
        "seconds_per_epoch": outcome["train_seconds"] / max(outcome["epochs"], 1),
        "node": platform.node(), "history": outcome["history"],
    }


def write_result(result: dict[str, Any], out: Path) -> None:
    """metrics.json and history.parquet, each written under a temporary name and renamed."""
    out.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in result.items() if k != "history"}
    atomic_write(out / "history.parquet", lambda tmp: pd.DataFrame(result["history"]).to_parquet(tmp, index=False))
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
    parser.add_argument("--out", type=Path, default=None, help="write metrics.json and history.parquet here")
    return parser


@cli
def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    out = args.pop("out")
    cfg = TrialConfig.from_dict(args, where="command line")
    print(f"raysweep: {cfg.label} on {cfg.dataset} (seed {cfg.seed}, L={cfg.max_len}, d={cfg.hidden})", flush=True)
    result = run_trial(cfg, on_epoch=lambda report, _: progress(report))
    test = result["test"]
    print(f"test: HR@10 {test['hr@10']:.4f}  HR@100 {test['hr@100']:.4f}  NDCG@10 {test['ndcg@10']:.4f}  "
          f"NDCG@100 {test['ndcg@100']:.4f}  | best epoch {result['best_epoch']}, "
          f"{result['train_seconds']:.1f} s ({result['seconds_per_epoch']:.2f} s/epoch, {result['device']}, "
          f"{result['precision']})")
    if out is not None:
        write_result(result, out)
        print(f"wrote {out / 'metrics.json'} and {out / 'history.parquet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
