"""The `tttlm` command line.

Every module in `tttlm.commands` is one subcommand: its docstring's first line is the help, and it defines
`add_arguments(parser)` and `run(args) -> int | None`. A user mistake (`UserError`, `ValueError`,
`FileNotFoundError`) ends in one line on stderr and exit code 2, never a traceback; a training run that stops
early (`RunStopped`) in one line and its own status (75 after a signal, its checkpoint saved; 1 otherwise).

Every `--help` shows each option's default. An option renamed for the shared vocabulary (README, "CLI
conventions") keeps its old spelling for a release: `add_option(..., deprecated=[...])` accepts it, leaves it
out of `--help` and says on stderr what replaces it.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import pkgutil
import sys

from tttlm import commands
from tttlm.errors import PREEMPTED, RunStopped, UserError


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, every option's default appended to its help (unless the help already says
    what the default is, or there is none), and deprecated spellings left out."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS or "default" in text \
                or not action.option_strings:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"

    def _format_action_invocation(self, action: argparse.Action) -> str:
        hidden = getattr(action, "old_spellings", None)
        if hidden:
            action = copy.copy(action)
            action.option_strings = [s for s in action.option_strings if s not in hidden]
        return super()._format_action_invocation(action)


def _deprecating(cls: type) -> type:
    """A subclass of the argparse action class cls that says on stderr when an old spelling was used."""

    class Deprecating(cls):
        def __call__(self, parser, namespace, values, option_string=None):
            if option_string in self.old_spellings:
                _say(f"{parser.prog}: {option_string} is deprecated and goes in a future release: use "
                     f"{self.old_spellings[option_string]}")
            super().__call__(parser, namespace, values, option_string)

    Deprecating.__name__ = f"Deprecating{cls.__name__}"
    return Deprecating


def add_option(parser: argparse.ArgumentParser, *flags: str, deprecated: tuple[str, ...] = (), **kwargs):
    """parser.add_argument(*flags, **kwargs), also accepting the old spellings `deprecated` (hidden from --help,
    a note on stderr when used). Returns the action."""
    action = parser.add_argument(*flags, *deprecated, **kwargs)
    if deprecated:
        new = flags[0]
        notes = {old: new for old in deprecated}
        if isinstance(action, argparse.BooleanOptionalAction):  # it also made --no-OLD
            notes.update({f"--no-{old[2:]}": f"--no-{new[2:]}" for old in deprecated if old.startswith("--")})
        action.__class__ = _deprecating(type(action))
        action.old_spellings = notes  # not `deprecated`: Python 3.13 argparse has its own
    return action


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
            formatter_class=HelpFormatter,
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
    except BrokenPipeError:  # `tttlm info | head`: the reader left, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(code or 0)


def run() -> None:
    """The console entry point: main()'s status as the exit code.

    A process that has joined a torchrun process group leaves without the interpreter's teardown (os._exit,
    after flushing its streams), its work done and its files closed: with torch 2.13 the gloo group's worker
    threads outlive destroy_process_group while DDP's reducer still holds the group, and one of them that frees
    the last collective's tensors while the interpreter tears down aborts the process (SIGABRT, "terminate
    called without an active exception"), which torchrun reports as a failed run.
    """
    code = main()
    from tttlm.train import distributed

    if distributed.joined():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
