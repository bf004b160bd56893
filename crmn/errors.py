"""The archive's one exception family: each message is one line naming the cause and the file.

Every user-facing fault is a :class:`CRMNError`; the command line prints it as one line and
exits with the kind's code (:func:`exit_code`). Anything else is a bug and keeps its
traceback. The kinds, each raised for one sort of fault:

========================  ====  ===========================================================
kind                      exit  raised for
========================  ====  ===========================================================
:class:`UsageError`       2     a bad command line: unknown command, option or row id, a
                                value out of range, options that contradict each other
                                (found before any file, folder or download exists)
:class:`ConfigError`      1     settings that cannot run, found by the library (a
                                configuration class, a stack that lacks an option, a
                                device that is not there)
:class:`DataError`        1     a dataset archive or file is missing, corrupt, fails its
                                checksum, or is not what it claims to be
:class:`CheckpointError`  1     a checkpoint is unreadable, incomplete or from another
                                configuration
:class:`RunError`         1     a run failed at run time: diverged, a run directory in
                                use, a disk fault
:class:`StopRequested`    3     a signal asked the run to stop after checkpointing;
                                ``--resume`` continues (130 when the signal was Ctrl-C)
========================  ====  ===========================================================
"""
from __future__ import annotations

import signal


class CRMNError(Exception):
    """A user-facing failure: bad input, a fault on disk, a diverged run."""

    exit_code = 1


class ConfigError(CRMNError):
    """Settings that cannot run: an unknown value, or a combination a stack does not have."""


class UsageError(ConfigError):
    """A bad command line, found before anything is created: one line, exit code 2."""

    exit_code = 2


class DataError(CRMNError):
    """A dataset archive or file is missing, corrupt, or fails its checksum."""


class CheckpointError(CRMNError):
    """A checkpoint is unreadable, incomplete, or from another configuration."""


class RunError(CRMNError):
    """A run failed while it ran (a fault on disk, a run directory in use by another)."""


class DivergedError(RunError):
    """The training loss became NaN or infinite."""


class StopRequested(CRMNError):
    """A signal (SIGUSR1: a scheduler's warning before preemption or its time limit;
    SIGINT: Ctrl-C) asked the run to stop; the last finished epoch is checkpointed and
    ``--resume`` continues.

    The CLI exits with :data:`EXIT_STOPPED` (130 after Ctrl-C) so that a job script can tell
    it from a failure.
    """

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
#: exit code of a usage error
EXIT_USAGE = 2


def exit_code(exc: CRMNError) -> int:
    """The command line's exit code for ``exc``."""
    return exc.exit_code
