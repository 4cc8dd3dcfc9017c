"""`python -m raysweep.report RUN_DIR [--rebuild]`: write RUN_DIR/report/ from a run directory's
results: table2.md and table2.csv (the paper's Table 2 beside ours, with paired comparisons, and
the failed, damaged and missing trials), figure1.png and figure2.png, and index.html (all of it
on one page), then print table2.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raysweep.core.errors import cli
from raysweep.report.render import write_report
from raysweep.sweep.rundir import RunDir


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raysweep.report", description=" ".join(__doc__.split()))
    parser.add_argument("run_dir", type=Path, help="a run directory (runs/NAME, or an unpacked archive)")
    parser.add_argument(
        "--rebuild", action="store_true", help="rebuild results.parquet from the trial records first"
    )
    args = parser.parse_args(argv)
    run = RunDir(args.run_dir)
    if args.rebuild:
        run.write_results()
    for path in write_report(run):
        print(path)
    print((run.report / "table2.md").read_text())
    return 0


sys.exit(main())
