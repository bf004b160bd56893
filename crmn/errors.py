"""The archive's one exception family (docs/spec.md §8): the command line prints a
:class:`CRMNError` as one line and exits with its ``exit_code``; anything else is a bug."""
from __future__ import annotations

import signal


class CRMNError(Exception):
    """A user-facing failure: bad input, a fault on disk, a diverged run."""
    exit_code = 1


class ConfigError(CRMNError):
    """Settings that cannot run: an unknown value, a combination a backend lacks, no device."""


class UsageError(ConfigError):
    """A bad command line, found before anything is created."""
    exit_code = 2


class DataError(CRMNError):
    """A dataset archive or file is missing, corrupt, or not what it claims to be."""


class CheckpointError(CRMNError):
    """A checkpoint is unreadable, incomplete, or from another configuration."""


class RunError(CRMNError):
    """A run failed while it ran (diverged, a fault on disk, a run directory in use)."""


class DivergedError(RunError):
    """The training loss became NaN or infinite."""


class StopRequested(CRMNError):
    """A signal (a scheduler's SIGUSR1, SIGINT) stopped the run after a checkpoint: resumable."""
    exit_code = 3

    def __init__(self, message: str, signum: int = signal.SIGUSR1):
        super().__init__(message)
        self.signum = signum
        if signum == signal.SIGINT:
            self.exit_code = EXIT_INTERRUPTED


EXIT_STOPPED = 3  # a run stopped by StopRequested (resumable; not a failure)
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C (the shell's 128 + SIGINT)
