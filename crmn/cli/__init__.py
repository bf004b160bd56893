"""The archive's one command line: ``bash run_experiments.sh <command> [options]`` (SPEC §1).

Commands
--------
``table1`` ``table2`` ``table3`` ``svhn``
    Train every selected row of that experiment of :mod:`crmn.paper` (section 4's protocol:
    search run with plateau schedule, then final run; SPEC §5), ``--seeds`` times each (or
    only ``--seed K``), into ``<out-dir>/<experiment>/<row>/seed<k>/`` (format:
    ``crmn/LOGS.md``), then print the comparison with the published table (:mod:`crmn.report`).
    ``--launcher local --jobs N`` or ``--launcher slurm`` runs the grid as single runs
    (:mod:`crmn.launch`).
``params``
    Our trainable-parameter count for every row of Tables 1-3 and SVHN, built in the chosen
    stack, beside the paper's (Table 1 only publishes counts).
``compare DIR``
    Re-print the comparison from existing run directories; writes ``REPORT.md`` and plots.
    Where DIR holds a launcher's ``manifest.txt``, also lists its runs that did not finish
    and then exits 1.
``status DIR``
    Where every run of a launched grid stands (:mod:`crmn.launch.status`).
``smoke``
    A minute-long end-to-end run on a tiny CRMN (n=1, k=0.5) and tiny fake CIFAR-100-format
    data written on the spot: loader, sampler, schedule search, training, checkpoints and
    report all run for real; nothing is downloaded. Its options are its own (``smoke --help``).
``verify``
    The two stacks compute the same function and take the same step (:mod:`crmn.verify`).
``bench``
    Seconds per epoch of paper rows beside the paper's (:mod:`crmn.bench`).
``gpucheck``
    One command that proves a GPU within ``--budget`` seconds: environment, verify on the
    device, three epochs of training and seconds per epoch of four rows per engine, its
    files rewritten after every check; 3 / 130 when a signal cut it short
    (:mod:`crmn.gpucheck`).
``profile``
    The torch step under several settings, timed or its operators counted
    (:mod:`crmn.tools.profile`, a developer tool).
``test``
    Run the test suite (``tests/run.sh``), passing extra arguments to pytest.

The package: :mod:`crmn.cli.parser` (the one argument parser), :mod:`crmn.cli.plans` (parsed
options to a checked :mod:`crmn.plan`, before anything is created), :mod:`crmn.cli.commands`
(one thin handler per command). An option travels: flag (parser) -> plan field
(:class:`crmn.registry.StackOptions`, :class:`crmn.plan.RunSpec`) -> the consumer
(:func:`crmn.registry.build`, :func:`crmn.train.run`, the launchers) -> ``config.json``
under the same name.

Expert options ``--n``, ``--k``, ``--batch-size`` replace the row's architecture or batch size
(the run then is *not* the paper's row; the run's ``config.json`` records what ran).

Exit codes: 0 success; 1 a run-time fault (a :class:`crmn.errors.CRMNError`: data,
checkpoint, run directory, divergence; printed as ``error: <message>``) or a failed check;
2 a usage error (unknown command, option or row id, a value out of range, a device that is
not there), one line on stderr, nothing created; 3 stopped by SIGUSR1 after checkpointing
the last finished epoch, 130 stopped by Ctrl-C (``--resume`` continues).
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from crmn.cli.commands import COMMANDS, cmd_test
from crmn.cli.parser import parse
from crmn.errors import EXIT_INTERRUPTED, CRMNError, StopRequested, UsageError


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 run-time error or failed check, 2 usage
    error, 3 stopped by a signal, 130 stopped by Ctrl-C)."""
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
