"""`python -m raysweep.archive pack RUN_DIR FILE | unpack FILE RUN_DIR`: a run's trials in one
Parquet file, to commit beside its report or carry to another machine, and back into a run
directory that `python -m raysweep.run SWEEP --resume --results RUN_DIR` finishes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raysweep.core.errors import cli
from raysweep.sweep.archive import pack, unpack


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raysweep.archive", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="write a run directory's trials to one Parquet file")
    packing.add_argument("run_dir", type=Path)
    packing.add_argument("file", type=Path)
    unpacking = commands.add_parser("unpack", help="add an archive's trials to a run directory")
    unpacking.add_argument("file", type=Path)
    unpacking.add_argument("run_dir", type=Path)
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
