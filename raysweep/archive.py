"""`python -m raysweep.archive pack RUN_DIR FILE | unpack FILE RUN_DIR`: a run's trials in one
Parquet file, to commit beside its report or carry to another machine, and back into a run
directory that `python -m raysweep.run SWEEP --resume --results RUN_DIR` finishes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raysweep.core.errors import cli
from raysweep.sweep.archive import pack, unpack

RUN_DIR = "a run directory (runs/NAME in the current folder, or $RAYSWEEP_RUNS_DIR/NAME, by default)"


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raysweep.archive", description=" ".join(__doc__.split()))
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="write a run directory's trials to one Parquet file")
    packing.add_argument("run_dir", type=Path, help=RUN_DIR)
    packing.add_argument(
        "file", type=Path, help="the archive to write (.parquet); replaced whole, never half-written"
    )
    unpacking = commands.add_parser("unpack", help="add an archive's trials to a run directory")
    unpacking.add_argument(
        "file", type=Path, help="an archive written by pack (checked before anything is written)"
    )
    unpacking.add_argument("run_dir", type=Path, help=RUN_DIR + "; trials already there are kept")
    args = parser.parse_args(argv)
    if args.command == "pack":
        print(f"packed {pack(args.run_dir, args.file)} trials of {args.run_dir} into {args.file}")
    else:
        added, there = unpack(args.file, args.run_dir)
        print(
            f"unpacked {added} trials into {args.run_dir} ({there} already there); finish the sweep "
            f"with: python -m raysweep.run SWEEP --resume --results {args.run_dir}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
