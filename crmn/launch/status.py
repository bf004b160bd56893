"""Where every run of a launched grid stands (``status DIR``): judged from its run directory,
the launchers' markers ``<exp>/tasks/<i>.start`` and ``<i>.rc``, its log, and ``squeue``."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from crmn import report, runlog, tables
from crmn.errors import DataError, EXIT_INTERRUPTED, EXIT_STOPPED
from crmn.launch import manifest
from crmn.launch.manifest import Task

JOBS = "jobs.json"  # in <exp>/slurm/
STATES = ("finished", "running", "waiting", "stopped", "failed")
RESUMABLE = (EXIT_STOPPED, EXIT_INTERRUPTED)  # stopped with its checkpoints: --resume goes on
_STOPPED = {EXIT_STOPPED: f"checkpointed its epoch and stopped (exit {EXIT_STOPPED})",
            EXIT_INTERRUPTED: f"interrupted by Ctrl-C (exit {EXIT_INTERRUPTED}), its last "
                              "checkpoint kept"}


def lock_holder(run_dir: Path) -> Optional[int]:
    """The PID holding ``run_dir``'s lock on this machine (-1: not named), or None."""
    return runlog.flock_holder(Path(run_dir) / runlog.LOCK)


def marker(exp_dir: Path, index: int, suffix: str) -> Path:
    return Path(exp_dir) / manifest.TASKS / f"{index}.{suffix}"


def mark_start(exp_dir: Path, index: int, **info) -> None:
    marker(exp_dir, index, "rc").unlink(missing_ok=True)
    info.setdefault("host", socket.gethostname())
    runlog.write_json(marker(exp_dir, index, "start"), info)


def mark_end(exp_dir: Path, index: int, rc: int) -> None:
    runlog.write_bytes_atomic(marker(exp_dir, index, "rc"), f"{rc}\n".encode())


def clear_markers(exp_dir: Path) -> None:
    folder = Path(exp_dir) / manifest.TASKS
    for p in [*folder.glob("*.start"), *folder.glob("*.rc")]:
        p.unlink()


def _read_rc(exp_dir: Path, index: int) -> Optional[int]:
    try:
        return int(marker(exp_dir, index, "rc").read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def _read_start(exp_dir: Path, index: int) -> Optional[dict]:
    try:
        return json.loads(marker(exp_dir, index, "start").read_text())
    except (FileNotFoundError, ValueError):
        return None


def last_line(path) -> str:
    """A log's ``error: ...`` line near its end, else its last line not from task.sh."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    own = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("[task ")]
    return next((ln for ln in reversed(own) if ln.startswith("error: ")), own[-1] if own else "")


def slurm_jobs(exp_dir: Path) -> Optional[dict]:
    path = Path(exp_dir) / "slurm" / JOBS
    return runlog.read_json(path) if path.exists() else None


def run_quiet(argv: Sequence[str], timeout: float, **kw) -> Optional[subprocess.CompletedProcess]:
    """``argv`` run with its output captured as text; None where it could not run."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    except (OSError, subprocess.SubprocessError):
        return None


def squeue_tasks(job_id: str) -> Optional[Dict[int, tuple]]:
    """``{array index: (state, reason)}`` of the array's queued tasks (None: squeue failed)."""
    p = run_quiet(["squeue", "-h", "-r", "-j", str(job_id), "-o", "%i|%T|%r"], timeout=30)
    if p is None or p.returncode != 0:  # a job id purged from the queue is an error: none queued
        return {} if p and "Invalid job id" in p.stderr else None
    rows = [(line.split("|") + ["", ""])[:3] for line in p.stdout.splitlines()]
    return {int(jid.rsplit("_", 1)[1]): (state, reason) for jid, state, reason in rows
            if "_" in jid and jid.rsplit("_", 1)[1].isdigit()}


@dataclass
class TaskState:
    task: Task
    state: str  # one of STATES
    detail: str


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine still runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # "pid (comm) S ...": the state letter follows the last ")"
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc: kill(0) is all there is


def task_state(exp_dir: Path, task: Task, queue: Optional[Dict[int, tuple]]) -> TaskState:
    """The state of one task; ``queue`` is :func:`squeue_tasks`' answer (None: unknown)."""
    run_dir = task.run_dir(exp_dir)
    summary = runlog.finished_summary(run_dir)
    if summary is not None:
        acc = summary.get("test_acc")
        return TaskState(task, "finished", f"test acc {100 * acc:.2f} %"
                         if isinstance(acc, (int, float)) else "done")
    rc, start = _read_rc(exp_dir, task.index), _read_start(exp_dir, task.index)
    progress = "not started"
    if (run_dir / runlog.CONFIG).exists():
        epochs = runlog.read_log(run_dir / runlog.LOG)
        progress = (f"{epochs[-1].get('phase')} epoch {epochs[-1].get('epoch')} done"
                    if epochs else "no epoch finished yet")
    started = "starting" if progress == "not started" else progress
    launcher, log = (start or {}).get("launcher"), (start or {}).get("log", "")
    job = f" (job {start.get('job', '?')})" if start else ""
    holder = lock_holder(run_dir)
    if holder is not None:  # the lock is the truth: a live process trains this run
        who = f"process {holder}" if holder > 0 else "another process"
        job = job if launcher == "slurm" else ""
        return TaskState(task, "running", f"{started}{job} ({who} holds its lock)")
    if queue is not None and task.index in queue:
        state, reason = queue[task.index]
        if state in ("RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT"):
            return TaskState(task, "running", started + job)
        again = ", requeued after a checkpointed stop" if rc == EXIT_STOPPED else ""
        why = f" ({reason})" if reason and reason != "None" else ""
        return TaskState(task, "waiting", f"{state.lower()}{why}{again}; {progress}")
    if rc in _STOPPED:
        return TaskState(task, "stopped", f"resumable: {_STOPPED[rc]}; {progress}; launch again")
    if rc is not None:
        return TaskState(task, "failed", f"exit {rc}: {last_line(log) or 'no log'} [{log}]")
    if start is not None:
        here = start.get("host") == socket.gethostname() and start.get("pid")
        if launcher == "local" and not (here and pid_alive(int(start["pid"]))):
            # no exit code recorded: the launcher died first, and its runs with it
            return TaskState(task, "stopped", f"resumable: process {start.get('pid')} ended "
                                              f"without an exit code (its launcher was "
                                              f"killed?); {progress}; launch again")
        if launcher == "slurm" and queue is not None:
            return TaskState(task, "failed", f"job {start.get('job')} left the queue without "
                                             f"an exit code (cancelled or node lost?); "
                                             f"{progress}; last log line: {last_line(log)}")
        return TaskState(task, "running", started)
    return TaskState(task, "waiting", "not started" if progress == "not started"
                     else f"not started in this launch; {progress}")


def experiment_dirs(directory: Path) -> List[Path]:
    """``directory`` if it holds a manifest, else its sub-folders that do."""
    directory = report.runs_folder(directory)
    if (directory / manifest.MANIFEST).exists():
        return [directory]
    found = sorted(p.parent for p in directory.glob(f"*/{manifest.MANIFEST}"))
    if not found:
        raise DataError(f"{directory}: no {manifest.MANIFEST} here or in its experiment "
                        f"folders (grids launched with --launcher slurm or --launcher local "
                        f"--jobs N have one)")
    return found


def grid_states(exp_dir: Path) -> List[TaskState]:
    tasks = manifest.read(exp_dir)
    jobs = slurm_jobs(exp_dir)
    queue = squeue_tasks(jobs["array"]) if jobs else None
    k = (jobs or {}).get("runs_per_gpu") or 1  # array task a runs lines a*K .. a*K + K-1
    if queue and k > 1:
        queue = {a * k + j: v for a, v in queue.items() for j in range(k)}
    return [task_state(exp_dir, t, queue) for t in tasks]


def _compiled(run_dir: Path) -> str:
    try:
        return runlog.compile_note(runlog.read_log(run_dir / runlog.LOG)) or "-"
    except DataError:
        return "? (log unreadable)"


def counts(states: Sequence[TaskState]) -> str:
    """``2 finished, 1 running``: how many runs are in each state."""
    return ", ".join(f"{sum(s.state == k for s in states)} {k}" for k in STATES
                     if any(s.state == k for s in states))


def show(directory: Path) -> int:
    """Print each experiment's runs as a table under a line of counts and its launcher."""
    head = ("#", "row", "seed", "state", "detail", "compiled (s, cache)")
    for exp_dir in experiment_dirs(directory):
        states, jobs = grid_states(exp_dir), slurm_jobs(exp_dir)
        rows = [(str(s.task.index), s.task.row, str(s.task.seed), s.state, s.detail,
                 _compiled(s.task.run_dir(exp_dir))) for s in states]
        where = ("local launcher" if not jobs else f"Slurm array {jobs['array']}, "
                 + (f"compare job {jobs['compare']}" if jobs.get("compare") else "no compare job"))
        print(f"{exp_dir}: {len(states)} run(s): {counts(states)} ({where})",
              *tables.markdown_lines(head, rows), sep="\n")
    return 0


def check_complete(directory: Path) -> int:
    """After ``compare``: list the manifest's unfinished runs on stderr; 1 if any."""
    try:
        dirs = experiment_dirs(directory)
    except DataError:
        return 0  # runs trained in-process: no grid to check against
    bad = [s for d in dirs for s in grid_states(d) if s.state != "finished"]
    for s in bad:
        sys.stderr.write(f"incomplete: {s.task.name}: {s.state}: {s.detail}\n")
    if bad:
        sys.stderr.write(f"incomplete: {len(bad)} run(s) of the manifest not finished\n")
    return 1 if bad else 0
