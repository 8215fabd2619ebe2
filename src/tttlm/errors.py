"""Errors that end a command with one line on stderr (`tttlm.cli`), never a traceback."""

# exit status of a run stopped by SIGTERM or SIGINT after saving a checkpoint (sysexits' EX_TEMPFAIL: a
# temporary failure, run it again: `--resume` continues)
PREEMPTED = 75


class UserError(Exception):
    """A mistake in arguments, paths or data that the user can correct (exit status 2)."""


class CheckpointError(UserError):
    """A checkpoint that is damaged: a file missing, cut short or changed since it was saved (the message
    names it)."""


class RunStopped(Exception):
    """A training run that ended before its last step: a signal (status PREEMPTED, its state saved), a lost
    process, a failed write or non-finite losses (status 1). The message says why and which checkpoints are
    intact."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status
