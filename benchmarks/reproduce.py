"""Reproduce three rows of the paper's Table 2 with its settings, one seed each, in one process.

    python benchmarks/reproduce.py [--only beauty-sasrec+3000] [--device cuda] [--out DIR]

Prints test HR/NDCG@10/100, best epoch and seconds per epoch next to the paper's figures;
HR@10 and NDCG@10 must land within 5 % (relative) of the paper.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from raysweep.core.config import TrialConfig
from raysweep.core.outputs import write_result
from raysweep.core.trial import run_trial
from raysweep.report.paper import paper_row
from raysweep.train import progress

# name: settings (the paper's figures come from raysweep.report.paper)
RUNS = {
    "ml-1m-sasrec+": dict(dataset="ml-1m", loss="ce"),
    "beauty-sasrec+": dict(dataset="beauty", loss="ce"),
    "beauty-sasrec+3000": dict(dataset="beauty", loss="sampled_ce", negatives=3000),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/reproduce"))
    args = parser.parse_args()
    rows = []
    for name in args.only:
        cfg = TrialConfig.from_dict(dict(RUNS[name], device=args.device, seed=args.seed))
        paper = paper_row(cfg.dataset, cfg.label)
        print(f"== {name}: {cfg.label} on {cfg.dataset}", flush=True)
        started = time.perf_counter()
        result = run_trial(cfg, on_epoch=lambda report, _: progress(report))
        write_result(result, args.out / name)
        t = result.test
        rows.append((name, t, paper, result, time.perf_counter() - started))
    print(
        "\n| run | HR@10 (paper) | HR@100 (paper) | NDCG@10 (paper) | NDCG@100 (paper) "
        "| HR@10 / NDCG@10 vs paper | best epoch (paper) | s/epoch | device, precision |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ok = True
    for name, t, (hr10, hr100, n10, n100, _, epoch), result, _ in rows:
        d_hr, d_ndcg = t["hr@10"] / hr10 - 1, t["ndcg@10"] / n10 - 1
        ok &= abs(d_hr) <= 0.05 and abs(d_ndcg) <= 0.05
        print(
            f"| {name} | {t['hr@10']:.4f} ({hr10}) | {t['hr@100']:.4f} ({hr100}) | "
            f"{t['ndcg@10']:.4f} ({n10}) | "
            f"{t['ndcg@100']:.4f} ({n100}) | {d_hr:+.1%} / {d_ndcg:+.1%} | {result.best_epoch} ({epoch}) | "
            f"{result.seconds_per_epoch:.2f} | {result.device}, {result.precision} |"
        )
    print("\nwithin 5 % of the paper on HR@10 and NDCG@10:", "yes" if ok else "NO")
    (args.out / "summary.json").write_text(
        json.dumps(
            [
                {
                    "run": n,
                    "test": t,
                    "paper": p._asdict(),
                    "best_epoch": r.best_epoch,
                    "seconds_per_epoch": r.seconds_per_epoch,
                    "device": r.device,
                    "precision": r.precision,
                }
                for n, t, p, r, _ in rows
            ],
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
