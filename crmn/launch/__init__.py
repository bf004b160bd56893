"""A whole table on several local GPUs or a Slurm cluster (issue #13).

``bash run_experiments.sh table1 --launcher local --jobs 4`` or ``--launcher slurm`` expands
the selected rows × seeds into ``<out-dir>/<experiment>/manifest.txt``
(:mod:`crmn.launch.manifest`: one exact single-run command line per run, with ``--resume``),
then executes those lines: as subprocesses (:mod:`crmn.launch.local`) or as one Slurm job
array plus a compare job (:mod:`crmn.launch.slurm`). Both launchers run the same lines, so
they write the same run directories. :mod:`crmn.launch.status` tells where every run stands
(``bash run_experiments.sh status DIR``).

Without ``--launcher slurm`` and with one job (the default on CPU), the table trains in the
CLI's own process as before: :func:`wanted` is False.

Files of a launched experiment, beside its run directories::

    manifest.txt          one line per (row, seed)
    tasks/<i>.start       task i started (JSON: launcher, host, pid, job, log)
    tasks/<i>.rc          task i's exit code (3: stopped after a checkpoint, resumable)
    tasks/<i>.out         task i's output (local launcher)
    slurm/<A>_<i>.out     task i's output (Slurm; every restart appended)
    slurm/jobs.json       array and compare job ids of the last submission
    slurm/compare_<C>.out, slurm/compare.rc   the compare job's output and exit code
"""
from __future__ import annotations

import argparse
import fcntl
from pathlib import Path
from typing import Callable, Sequence

from crmn import report
from crmn.errors import ConfigError, UsageError
from crmn.launch import local, manifest, slurm, status

LAUNCH_DESTS = ("launcher", "jobs", "max_parallel", "slurm_args", "wait", "max_requeues")
#: default cap on a task's requeues after checkpointed stops (SLURM_RESTART_COUNT)
MAX_REQUEUES = 20
SLURM_ONLY = {"max_parallel": "--max-parallel", "slurm_args": "--slurm-args",
              "wait": "--wait", "max_requeues": "--max-requeues"}


def add_arguments(parser: argparse.ArgumentParser, positive: Callable[[str], int]) -> None:
    """The launcher's option group, added to table1, table2, table3 and svhn; ``positive``
    is the command line's one type for "a number >= 1"."""
    g = parser.add_argument_group("launchers: the grid of rows x seeds on several GPUs or a "
                                  "Slurm cluster (issue #13; REPRODUCING.md, On a cluster)")
    g.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: on this machine; slurm: one job array of single runs plus a "
                        "compare job (default: %(default)s)")
    g.add_argument("--jobs", type=positive, metavar="N", default=None,
                   help="local: N single runs at once as subprocesses, each on its own GPU "
                        "with --device cuda (default: one per visible GPU with --device "
                        "cuda, else 1 = every run in this process, one after another)")
    g.add_argument("--max-parallel", type=positive, metavar="K", default=None,
                   help="slurm: at most K array tasks at once (--array=...%%K; default: "
                        "no limit)")
    g.add_argument("--slurm-args", metavar='"ARGS"', default=None,
                   help='slurm: extra sbatch options for both jobs, e.g. "--gres=gpu:1 '
                        '--time=8:00:00"; a single option as --slurm-args=--exclusive '
                        '(SBATCH_* environment variables work too)')
    g.add_argument("--max-requeues", type=int, metavar="N", default=None,
                   help=f"slurm: a task requeues itself after a checkpointed stop at most N "
                        f"times (default: {MAX_REQUEUES})")
    g.add_argument("--wait", action="store_true", default=False,
                   help="slurm: wait until the compare job ends and exit with its code "
                        "(default: return once submitted)")


def _jobs(args) -> int:
    return args.jobs if args.jobs is not None else local.default_jobs(args.device)


def wanted(args) -> bool:
    """True when a launcher runs the grid (slurm, or more than one local job); checks that
    the launcher options fit together (:class:`crmn.errors.UsageError` if not)."""
    if args.launcher == "slurm":
        if args.jobs is not None:
            raise UsageError("run_experiments.sh: --jobs is for --launcher local; with "
                             "--launcher slurm use --max-parallel K")
        if args.max_requeues is not None and args.max_requeues < 0:
            raise UsageError("run_experiments.sh: --max-requeues wants N >= 0")
        return True
    given = [flag for dest, flag in SLURM_ONLY.items()
             if getattr(args, dest) not in (None, False)]
    if given:
        raise UsageError(f"run_experiments.sh: {', '.join(given)} only apply to "
                         f"--launcher slurm")
    return _jobs(args) > 1


def _claim(exp_dir: Path):
    """Hold ``tasks/.lock`` for the launch: a second launcher on the same folder is refused
    (it would train the same run directories twice)."""
    (exp_dir / "tasks").mkdir(parents=True, exist_ok=True)
    f = open(exp_dir / "tasks" / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(f"{exp_dir}: another launcher is running this grid") from None
    return f


def main(args, plan: Sequence[tuple], sub: argparse.ArgumentParser, entry: Path) -> int:
    """Write the manifest of ``plan`` (:func:`crmn.cli.plan_runs`, every configuration
    validated), then run it with the chosen launcher; the exit code.

    ``sub`` is the experiment's own parser (the manifest's lines are rebuilt from it) and
    ``entry`` the archive's ``run_experiments.sh``."""
    exp_dir = Path(args.out_dir).resolve() / args.command
    tasks = manifest.build(args, sub, plan, ["bash", str(entry)], skip=LAUNCH_DESTS)
    if args.launcher == "slurm":
        slurm.require_sbatch()
    lock = _claim(exp_dir)
    try:
        if status.slurm_jobs(exp_dir):
            slurm.refuse_if_queued(exp_dir)
            if args.launcher == "local":  # that submission is over: status follows this one
                (exp_dir / "slurm" / status.JOBS).unlink()
        status.clear_markers(exp_dir)
        path = manifest.write(exp_dir, tasks)
        print(f"manifest: {len(tasks)} run(s) in {path}", flush=True)
        if args.launcher == "slurm":
            jobs = slurm.submit(exp_dir, tasks, entry, max_parallel=args.max_parallel,
                                slurm_args=args.slurm_args, experiment=args.command,
                                max_requeues=MAX_REQUEUES if args.max_requeues is None
                                else args.max_requeues)
            lock.close()  # the jobs own the grid now (refuse_if_queued guards it)
            return slurm.wait(exp_dir, jobs) if args.wait else 0
        rc = local.run(exp_dir, tasks, _jobs(args), args.device)
    finally:
        lock.close()
    if rc == local.EXIT_INTERRUPTED:
        return rc

    report.compare(exp_dir, plots=True)
    return max(rc, status.check_complete(exp_dir))
