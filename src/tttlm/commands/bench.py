"""Time an op's GPU kernels against its peers, or whole models' decoding (needs CUDA and a source checkout).

`tttlm bench OP [ARGS...]` runs benchmarks/gpu_OP.py with ARGS; `tttlm bench OP --help` lists them. An op's
script prints a table of forward and forward+backward ms at T = 2k, 8k, 32k; `tttlm bench decode` one of every
model's decode and prefill speed at contexts 2k, 8k, 32k. `--out-dir DIR` writes the rows to DIR/OP.json (the
script's own `--json FILE`).

examples:
  tttlm bench ttt_linear --out-dir out/
  tttlm bench decode --help
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tttlm.errors import UserError

SCRIPTS = Path(__file__).resolve().parents[3] / "benchmarks"


def ops() -> list[str]:
    """The ops with a benchmark script (benchmarks/gpu_OP.py)."""
    return sorted(p.stem.removeprefix("gpu_") for p in SCRIPTS.glob("gpu_*.py"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("op", help="the op to time: " + (", ".join(ops()) or "none found (not a source checkout)"))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments (OP --help lists them)")


def run(args: argparse.Namespace) -> int:
    import importlib.util

    script = SCRIPTS / f"gpu_{args.op}.py"
    if not script.is_file():
        found = ", ".join(ops())
        raise UserError(f"no benchmark for op {args.op!r}: expected {script}" + (f" (ops: {found})" if found else
                        "; run `tttlm bench` from a source checkout"))
    argv = _out_dir_as_json(args.op, list(args.args))
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if "-h" not in args.args and "--help" not in args.args:
        import torch

        if not torch.cuda.is_available():
            raise UserError("tttlm bench needs a CUDA GPU")
    return module.main(argv)


def _out_dir_as_json(op: str, argv: list[str]) -> list[str]:
    """The script's arguments with `--out-dir DIR` (the shared spelling) as `--json DIR/OP.json` (the scripts')."""
    for i, a in enumerate(argv):
        if (a == "--out-dir" and i + 1 < len(argv)) or a.startswith("--out-dir="):
            folder = Path(argv[i + 1] if a == "--out-dir" else a.split("=", 1)[1])
            folder.mkdir(parents=True, exist_ok=True)
            rest = argv[i + 2:] if a == "--out-dir" else argv[i + 1:]
            return [*argv[:i], "--json", str(folder / f"{op}.json"), *rest]
    return argv
