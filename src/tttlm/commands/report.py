"""Gather the results of evaluation runs into one Markdown report: tables, and the figures linked.

Reads every result JSON (of positions, ladder, telemetry, recall, throughput) directly inside each RUN_DIR;
figure links are relative to the report's folder.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="directories written by the eval commands")
    parser.add_argument("-o", "--output", required=True, help="the Markdown file to write")
    parser.add_argument("--title", default="tttlm evaluation report", help="the report's title")


def run(args) -> int:
    from pathlib import Path

    from tttlm.eval.report import build_report

    text = build_report(args.run_dirs, args.output, args.title)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"wrote {out}")
    return 0
