"""The archive's one exception family (docs/spec.md §8): one line naming cause and file.

Every user-facing fault is a :class:`CRMNError` of one kind below; the command line prints it
as one line and exits with the kind's ``exit_code`` (2 usage, 1 other faults, 3 or 130 a
requested stop). Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import signal


class CRMNError(Exception):
    """A user-facing failure: bad input, a fault on disk, a diverged run."""

    exit_code = 1


class ConfigError(CRMNError):
    """Settings that cannot run, found by the library: an unknown value, a combination a
    backend lacks, a device that is not there."""


class UsageError(ConfigError):
    """A bad command line (command, option, row id, range, contradiction), found before
    anything is created: exit code 2."""

    exit_code = 2


class DataError(CRMNError):
    """A dataset archive or file is missing, corrupt, fails its checksum, or is not what it
    claims to be."""


class CheckpointError(CRMNError):
    """A checkpoint is unreadable, incomplete, or from another configuration."""


class RunError(CRMNError):
    """A run failed while it ran (diverged, a fault on disk, a run directory in use)."""


class DivergedError(RunError):
    """The training loss became NaN or infinite."""


class StopRequested(CRMNError):
    """A signal (SIGUSR1 from a scheduler, SIGINT: Ctrl-C) asked the run to stop after
    checkpointing; exit :data:`EXIT_STOPPED` (130 after Ctrl-C), which a job script can tell
    from a failure, and ``--resume`` continues."""

    exit_code = 3

    def __init__(self, message: str, signum: int = signal.SIGUSR1):
        super().__init__(message)
        self.signum = signum
        if signum == signal.SIGINT:
            self.exit_code = EXIT_INTERRUPTED


#: exit code of a run stopped by :class:`StopRequested` (resumable; not a failure)
EXIT_STOPPED = 3
#: exit code of a run stopped by Ctrl-C (the shell's 128 + SIGINT)
EXIT_INTERRUPTED = 130


def exit_code(exc: CRMNError) -> int:
    """The command line's exit code for ``exc``."""
    return exc.exit_code
