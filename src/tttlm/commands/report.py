"""Gather the results of evaluation runs into one Markdown report: tables, and the figures linked.

Reads every result JSON (of eval, positions, ladder, telemetry, recall, throughput) directly inside each RUN_DIR
and writes OUT_DIR/report.md; figure links are relative to it. --replot first redraws every result's figure from
its JSON, as the commands draw them today (after a change of the figures' style, or for results written before).

examples:
  tttlm report out/ --out-dir out/
  tttlm report docs/figures/lm docs/figures/recall --out-dir docs/figures --title "Small models"
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="directories written by the eval commands")
    parser.add_argument("--out-dir", metavar="DIR", help="where report.md goes (default: the first RUN_DIR)")
    parser.add_argument("-o", "--output", help=argparse.SUPPRESS)  # before --out-dir: the file itself
    parser.add_argument("--title", default="tttlm evaluation report", help="the report's title")
    parser.add_argument("--replot", action="store_true", help="redraw every result's PNG from its JSON first")


def run(args) -> int:
    from pathlib import Path

    from tttlm.eval.report import build_report

    if args.replot:
        _replot(args.run_dirs)
    if args.output is not None:
        print("tttlm report: -o/--output is deprecated and goes in a future release: use --out-dir (the report is "
              "written to OUT_DIR/report.md)", file=sys.stderr)
        out = Path(args.output)
    else:
        out = Path(args.out_dir or args.run_dirs[0]) / "report.md"
    text = build_report(args.run_dirs, out, args.title)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"wrote {out}")
    return 0


def _replot(run_dirs: list[str]) -> None:
    from pathlib import Path

    from tttlm.eval.plots import figure_of
    from tttlm.eval.results import read_results, save_figure

    for d in run_dirs:
        for r in read_results(d):
            if r.get("figure") and (fig := figure_of(r)) is not None:
                save_figure(fig, Path(r["_path"]).parent / r["figure"])
                print(f"redrew {Path(r['_path']).parent / r['figure']}")
