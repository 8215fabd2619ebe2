"""The `tttlm` command line.

Every module in `tttlm.commands` is one subcommand: its docstring's first line is the help, and it defines
`add_arguments(parser)` and `run(args) -> int | None`. A user mistake (`UserError`, `ValueError`,
`FileNotFoundError`) ends in one line on stderr and exit code 2, never a traceback; a training run that stops
early (`RunStopped`) in one line and its own status (75 after a signal, its checkpoint saved; 1 otherwise).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from tttlm import commands
from tttlm.errors import PREEMPTED, RunStopped, UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tttlm",
        description="Test-time-training language models: data, training, evaluation, kernels.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(
            info.name.replace("_", "-"),
            help=doc.splitlines()[0] if doc else None,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _say(line: str) -> None:
    """One line on stderr in one write: the processes of a torchrun job share the stream, and print's separate
    write of the newline let two processes' lines run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args._run(args)
    except (UserError, ValueError, FileNotFoundError) as e:
        _say(f"tttlm {args.command}: error: {e}")
        return 2
    except RunStopped as e:
        _say(f"tttlm {args.command}: {'' if e.status == PREEMPTED else 'error: '}{e}")
        return e.status
    except KeyboardInterrupt:
        _say(f"tttlm {args.command}: interrupted")
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
