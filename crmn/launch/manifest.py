"""The grid of an experiment as ``manifest.txt``: one single-run command line per (row,
seed), rendered from the checked plan (never from ``sys.argv``); line ``i`` is task ``i``."""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

from crmn import runlog
from crmn.errors import DataError
from crmn.plan import TrainPlan, render_argv

MANIFEST = "manifest.txt"
TASKS = "tasks"  # the launchers' per-task markers <i>.start, <i>.rc


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
        return Path(exp_dir) / self.row / f"seed{self.seed}"

    @property
    def name(self) -> str:
        return f"{self.row} seed {self.seed}"


def build(plan: TrainPlan, program: Sequence[str]) -> List[Task]:
    return [Task(i, run.label, run.seed, tuple(render_argv(plan, run, program)))
            for i, run in enumerate(plan.runs)]


def write(exp_dir: Path, tasks: Sequence[Task]) -> Path:
    path = Path(exp_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    runlog.write_bytes_atomic(path, "".join(t.line + "\n" for t in tasks).encode())
    return path


def parse_line(index: int, line: str, path: Path) -> Task:
    try:
        argv = shlex.split(line)
        row = argv[argv.index("--rows") + 1]
        seed = int(argv[argv.index("--seed") + 1])
    except (ValueError, IndexError):
        raise DataError(f"{path}: line {index + 1} is not a single-run command line "
                        f"(--rows ID --seed K)") from None
    return Task(index, row, seed, tuple(argv))


def read(exp_dir: Path) -> List[Task]:
    path = Path(exp_dir) / MANIFEST
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no manifest (one is written by --launcher local --jobs N "
                        f"and --launcher slurm)") from None
    return [parse_line(i, ln, path) for i, ln in enumerate(lines) if ln.strip()]
