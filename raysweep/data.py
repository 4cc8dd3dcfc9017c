"""`python -m raysweep.data stats|fetch DATASET...`: each dataset's Table 1 beside the paper's
(every dataset that is here; the others named, with where they can come from), and verified
downloads into the data cache."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from raysweep.core.data import load_interactions, table1
from raysweep.core.errors import UserError, cli
from raysweep.report.paper import TABLE1


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raysweep.data", description=" ".join(__doc__.split()))
    sub = parser.add_subparsers(dest="command", required=True)
    stats = sub.add_parser("stats", help="print the paper's Table 1 for the named datasets")
    names = "ml-1m, ml-20m, steam, beauty, yelp, synthetic-*, or a path to a .txt file"
    stats.add_argument("datasets", nargs="*", default=["beauty"], help=f"{names} (default: beauty)")
    for p in (stats, sub.add_parser("fetch", help="download, verify and cache datasets")):
        p.add_argument(
            "--data-dir", type=Path, default=None,
            help="data cache folder (default: $RAYSWEEP_DATA_DIR or ~/.cache/raysweep)",
        )  # fmt: skip
        p.add_argument(
            "--mirror", type=Path, default=None,
            help="a folder holding the upstream data files (default: $RAYSWEEP_MIRROR)",
        )  # fmt: skip
    sub.choices["fetch"].add_argument("datasets", nargs="+", help=names)
    args = parser.parse_args(argv)
    rows, missing = [], []
    for name in args.datasets:
        try:
            frame = load_interactions(name, args.data_dir, args.mirror)
        except UserError as exc:
            if args.command == "fetch":
                raise
            missing.append(str(exc))  # the others are still worth printing
            continue
        rows.append({"dataset": name, **table1(frame)})
    if args.command == "fetch":
        for row in rows:
            print(f"{row['dataset']}: {row['interactions']:,} interactions verified and cached")
        return 0
    if rows:
        print(stats_table(rows).to_string(index=False))
    for line in missing:
        print(f"error: {line}", file=sys.stderr)
    return 2 if missing else 0


def stats_table(rows: list[dict]) -> pd.DataFrame:
    """Ours and the paper's Table 1 side by side (paper's values in parentheses, - where the
    paper has no such dataset)."""
    out = []
    for row in rows:
        paper = TABLE1.get(row["dataset"])
        # The paper prints average length cut (not rounded) to two decimals: 165.49, 8.79.
        ours = [row["users"], row["items"], row["interactions"], np.floor(row["avg_len"] * 100) / 100,
                row["density"] * 100]  # fmt: skip
        cells = [f"{v:,}" for v in ours[:3]] + [f"{ours[3]:.2f}", f"{ours[4]:.3f} %"]
        if paper:
            cells = [
                f"{c} ({p:,})" if i < 3 else f"{c} ({p:g})" for i, (c, p) in enumerate(zip(cells, paper))
            ]
        out.append(dict(zip(["dataset", "users", "items", "interactions", "avg_len", "density"],
                            [row["dataset"], *cells])))  # fmt: skip
    return pd.DataFrame(out)


if __name__ == "__main__":
    sys.exit(main())
