"""Run one experiment of docs/results.md from its TOML file: train, evaluate, write small JSON results.

An experiment file (configs/experiments/, see its README) names a training run and the evaluations to run on
it (validation loss, loss by position, context ladder, inner-loop telemetry), or an MQAR sweep. All of it runs
in this one command; the results (JSON and PNG, never a checkpoint) go to OUT/<name>/, with the exact command
of every step, and the checkpoint to a scratch directory that is deleted at the end. --probe trains each
given file for a few steps only and prints its speed and the projected training time of the full run.
--summary gathers the results under a folder into summary.md (tables, with each run's command) and figures.

examples:
  tttlm experiment configs/experiments/lm-2k-ttt_linear-lr3e-3.toml            # -> docs/results/lm-2k-.../
  tttlm experiment configs/experiments/mqar-w128.toml --out-dir /tmp/results    # MQAR, every mixer
  tttlm experiment configs/experiments/lm-2k-*.toml --probe 20                 # speed of each, 20 steps
  tttlm experiment --summary docs/results                                      # -> docs/results/summary.md
"""

from __future__ import annotations

import argparse

from tttlm.cli import add_option
from tttlm.eval.options import add_out_dir, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("configs", nargs="*", metavar="TOML", help="experiment file(s), run one after the other")
    add_out_dir(parser, required=False, help="results root: each run writes OUT_DIR/<name>/", default="docs/results")
    add_option(parser, "--work-dir", deprecated=("--work",), default="runs/experiments", metavar="DIR",
               help="scratch directory for checkpoints (each run's subfolder is emptied and deleted)")
    parser.add_argument("--probe", type=positive_int, metavar="STEPS",
                        help="only train each file STEPS steps and print tokens/s and the projected minutes "
                             "(default: run in full)")
    parser.add_argument("--summary", metavar="DIR",
                        help="instead of running: write DIR/summary.md from its results (default: run the files)")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from tttlm.eval.checkpoints import resolve_device
    from tttlm.eval.experiment import probe, run_experiment
    from tttlm.eval.results import environment

    if args.summary:
        from tttlm.eval.experiment_summary import summarize

        print(f"wrote {summarize(args.summary)}")
        return 0
    if not args.configs:
        raise ValueError("name at least one experiment file (configs/experiments/*.toml), or pass --summary DIR")
    if args.probe:
        rows = probe(args.configs, args.probe, args.work_dir)
        print(f"{'experiment':40s} {'tokens/s':>10s} {'train min':>10s}")
        for r in rows:
            if "error" in r:
                print(f"{r['name']:40s} failed: {r['error']}")
            else:
                print(f"{r['name']:40s} {r['tokens_per_s']:10,.0f} {r['train_minutes']:10.1f}")
        out = Path(args.out_dir) / "probe.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"steps": args.probe, "environment": environment(resolve_device("auto")),
                                   "runs": rows}, indent=1) + "\n")
        print(f"wrote {out}")
        return 1 if any("error" in r for r in rows) else 0
    results = [run_experiment(c, args.out_dir, args.work_dir) for c in args.configs]
    print(f"{'experiment':34s} {'status':7s} {'val loss':>9s} {'train tok/s':>12s} {'minutes':>8s}")
    for r in results:
        loss = (r.get("validation") or {}).get("loss")
        speed = (r.get("training") or {}).get("tokens_per_s")
        print(f"{r['name']:34s} {r['status']:7s} {'-' if loss is None else f'{loss:.4f}':>9s} "
              f"{'-' if speed is None else f'{speed:,.0f}':>12s} {r['seconds'] / 60:8.1f}")
    failed = [r["name"] for r in results if r["status"] != "ok"]
    if failed:
        print(f"evaluations failed in: {', '.join(failed)} (see their experiment.json)")
        return 1
    return 0
