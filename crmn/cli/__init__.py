"""The archive's one command line (docs/spec.md §1): :mod:`crmn.cli.parser` reads it,
:mod:`crmn.plan` checks it before anything is created, :mod:`crmn.cli.commands` runs it."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from crmn.cli.commands import COMMANDS, cmd_test
from crmn.cli.parser import parse
from crmn.errors import EXIT_INTERRUPTED, CRMNError, StopRequested, UsageError


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; the exit code: 0 ok, 1 run-time error or failed check, 2 usage error,
    3 stopped by a signal after checkpointing, 130 by Ctrl-C (``--resume`` continues)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "test":  # everything after the name goes to pytest
        return cmd_test(argv[1:])
    try:
        args = parse(argv)
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(str(exc).splitlines()[0], file=sys.stderr)
        return exc.exit_code
    except StopRequested as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return exc.exit_code
    except CRMNError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a run
        print("stopped: interrupted; the last checkpoint is kept (the same command with "
              "--resume continues)", file=sys.stderr)
        return EXIT_INTERRUPTED
