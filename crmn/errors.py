"""The archive's one exception family: each message is one line naming the cause and the file.

The CLI catches :class:`CRMNError`, prints ``error: <message>`` and exits non-zero; anything
else is a bug and keeps its traceback.
"""


class UsageError(Exception):
    """A bad command line (unknown command, option or row id): one line, exit code 2."""


class CRMNError(Exception):
    """A user-facing failure: bad input, a fault on disk, a diverged run."""


class DataError(CRMNError):
    """A dataset archive or file is missing, corrupt, or fails its checksum."""


class CheckpointError(CRMNError):
    """A checkpoint is unreadable, incomplete, or from another configuration."""


class ConfigError(CRMNError):
    """An unknown row, option or incompatible combination of settings."""


class DivergedError(CRMNError):
    """The training loss became NaN or infinite."""


class StopRequested(CRMNError):
    """A signal (SIGUSR1: a scheduler's warning before preemption or its time limit) asked
    the run to stop; the last finished epoch is checkpointed and ``--resume`` continues.

    The CLI exits with :data:`EXIT_STOPPED` so that a job script can tell it from a failure.
    """


#: exit code of a run stopped by :class:`StopRequested` (resumable; not a failure)
EXIT_STOPPED = 3
