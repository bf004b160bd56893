"""The grid of an experiment as a manifest: one single-run command line per (row, seed).

``<out-dir>/<experiment>/manifest.txt`` holds one line per run of the grid, in the order of
:func:`crmn.cli.plan_runs` (rows as selected, then seeds). Each line is the exact command a
user could type, e.g.::

    bash /archive/run_experiments.sh table1 --rows t1-crmn32x1 --seed 0 --resume \
        --no-progress --backend torch --data-dir /data --out-dir /runs

with ``--resume`` (a restarted line continues from its checkpoint; a finished run is a
no-op), ``--no-progress`` (the output goes to a log file), absolute ``--data-dir`` and
``--out-dir``, and every other option the user set. Line ``i`` (0-based) is task ``i`` of
both launchers (:mod:`crmn.launch.local`, :mod:`crmn.launch.slurm`), so they produce the same
run directories from the same lines.

The options are rendered from the parsed namespace and the sub-command's argparse actions,
not copied from ``sys.argv``: a line never carries a launcher option, and an option added to
the CLI later is passed on without a change here.
"""
from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

from crmn import runlog
from crmn.errors import DataError

MANIFEST = "manifest.txt"
#: folder of an experiment with the launchers' per-task markers (``<i>.start``, ``<i>.rc``)
TASKS = "tasks"

#: options a manifest line sets itself (or that make no sense in one run)
OWN_DESTS = frozenset({"help", "command", "rows", "seeds", "seed", "resume", "progress"})


@dataclass(frozen=True)
class Task:
    """Line ``index`` of a manifest: the run of ``row`` with seed ``seed``."""

    index: int  # 0-based line number; the Slurm array index
    row: str  # row id of crmn/paper.py
    seed: int
    argv: Tuple[str, ...]  # the command line, program first

    @property
    def line(self) -> str:
        return shlex.join(self.argv)

    def run_dir(self, exp_dir: Path) -> Path:
        """``<out-dir>/<experiment>/<row>/seed<k>/`` (crmn/LOGS.md)."""
        return Path(exp_dir) / self.row / f"seed{self.seed}"

    @property
    def name(self) -> str:
        return f"{self.row} seed {self.seed}"


def _render(action: argparse.Action, value) -> List[str]:
    """The tokens that make argparse set ``action.dest`` to ``value``."""
    flag = next((o for o in action.option_strings if o.startswith("--")),
                action.option_strings[0])
    if action.nargs == 0:  # store_true / store_false / store_const: the flag itself
        return [flag]
    if isinstance(value, Path):
        value = value.resolve()  # the task may start in another directory
    if isinstance(value, (tuple, list)):
        if action.nargs in ("+", "*") or isinstance(action.nargs, int):
            return [flag, *(str(v) for v in value)]
        value = ",".join(str(v) for v in value)  # e.g. --schedule 80,40,40
    text = str(value)
    return [f"{flag}={text}"] if text.startswith("-") else [flag, text]


def run_options(args: argparse.Namespace, sub: argparse.ArgumentParser,
                skip: Sequence[str] = ()) -> List[str]:
    """Every option of ``sub`` whose value in ``args`` differs from its default, rendered
    as tokens; ``--data-dir`` and ``--out-dir`` always, as absolute paths.

    ``skip``: further destinations to leave out (the launcher's own options).
    """
    out: List[str] = []
    for action in sub._actions:
        dest = action.dest
        if not action.option_strings or dest in OWN_DESTS or dest in skip:
            continue
        value = getattr(args, dest, action.default)
        if dest in ("data_dir", "out_dir") or value != action.default:
            out += _render(action, value)
    return out


def build(args: argparse.Namespace, sub: argparse.ArgumentParser, plan, program: Sequence[str],
          skip: Sequence[str] = ()) -> List[Task]:
    """The tasks of ``plan`` (:func:`crmn.cli.plan_runs`: ``(row, seed, model, train)``).

    ``program``: the entry point, e.g. ``["bash", "/archive/run_experiments.sh"]``.
    """
    common = run_options(args, sub, skip)
    tasks = []
    for i, (row, seed, _model, _train) in enumerate(plan):
        argv = (*program, args.command, "--rows", row.id, "--seed", str(seed), "--resume",
                "--no-progress", *common)
        tasks.append(Task(i, row.id, seed, tuple(argv)))
    return tasks


def write(exp_dir: Path, tasks: Sequence[Task]) -> Path:
    """Write ``exp_dir/manifest.txt`` atomically; returns its path."""
    path = Path(exp_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    runlog.write_bytes_atomic(path, "".join(t.line + "\n" for t in tasks).encode())
    return path


def parse_line(index: int, line: str, path: Path) -> Task:
    """A manifest line back into a :class:`Task` (its ``--rows`` and ``--seed``)."""
    try:
        argv = shlex.split(line)
        row = argv[argv.index("--rows") + 1]
        seed = int(argv[argv.index("--seed") + 1])
    except (ValueError, IndexError):
        raise DataError(f"{path}: line {index + 1} is not a single-run command line "
                        f"(--rows ID --seed K)") from None
    return Task(index, row, seed, tuple(argv))


def read(exp_dir: Path) -> List[Task]:
    """The tasks of ``exp_dir/manifest.txt``; :class:`DataError` if missing or malformed."""
    path = Path(exp_dir) / MANIFEST
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no manifest (one is written by --launcher local --jobs N "
                        f"and --launcher slurm)") from None
    return [parse_line(i, ln, path) for i, ln in enumerate(lines) if ln.strip()]
