"""The local launcher: the manifest's lines as N subprocesses at once (``--jobs N``), each
logging to ``<exp>/tasks/<i>.out``, on its own GPU with ``--device cuda``, with ``cores // N``
threads, dying with the launcher; launching again resumes what a stop request left."""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from crmn.errors import EXIT_INTERRUPTED, EXIT_STOPPED, ConfigError
from crmn import runlog
from crmn.launch import mps, status
from crmn.launch.manifest import Task

POLL_S = 0.2
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_STOPS = ((signal.SIGUSR1, "each run ends its epoch, checkpoints it and exits (Ctrl-C again "
                           "to interrupt at once)"),
          (signal.SIGINT, "interrupting the runs (each keeps its last checkpoint)"))
_ENDS = {0: "done", EXIT_STOPPED: "stopped (resumable: checkpointed its epoch)",
         EXIT_INTERRUPTED: "stopped (resumable: interrupted, its last checkpoint kept)"}


def die_with_parent():
    """A ``preexec_fn`` killing the child when this process dies (None where the kernel cannot)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # no prctl: not Linux
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before the request took effect
            os.kill(os.getpid(), signal.SIGKILL)
    return preexec


def visible_gpus() -> List[str]:
    """The GPU ids this process may use: ``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    p = status.run_quiet(["nvidia-smi", "-L"], timeout=30)
    lines = p.stdout.splitlines() if p and p.returncode == 0 else []
    return [str(i) for i in range(sum(ln.startswith("GPU ") for ln in lines))]


def memory_fit(runs_per_gpu: int) -> str:
    """A note that ``runs_per_gpu`` runs fit the GPU by gpucheck's packing; ConfigError if not."""
    from crmn import cost
    gpu = cost.gpu_model()
    table = (cost.read_packing(gpu) if gpu else None) or {}
    peaks = [v for t in (table.get("rows") or {}).values()
             for v in (t.get("peak_mem_bytes") or {}).values() if isinstance(v, (int, float))]
    memory = table.get("memory_bytes")
    if not peaks or not isinstance(memory, (int, float)):
        return "their memory fit unchecked: gpucheck --only packing has not run on this GPU model"
    most, mib = int(0.9 * memory // max(peaks)), max(peaks) / 2 ** 20
    if runs_per_gpu > most:
        raise ConfigError(f"--runs-per-gpu {runs_per_gpu}: {runs_per_gpu} runs of {mib:.0f} MiB "
                          f"peak each (gpucheck's packing on {gpu}) would not fit 90 % of its "
                          f"{memory / 2 ** 30:.0f} GiB; at most {most} fit: use --runs-per-gpu "
                          f"{most}")
    return f"{runs_per_gpu} x {mib:.0f} MiB peak fit {gpu} ({memory / 2 ** 30:.0f} GiB)"


def default_jobs(device: str, runs_per_gpu: int = 1) -> int:
    return max(1, len(visible_gpus())) * runs_per_gpu if device == "cuda" else 1


class LocalLauncher:
    def __init__(self, exp_dir: Path, tasks: Sequence[Task], jobs: int, gpus: Sequence[str],
                 env: Dict[str, str]):
        self.exp_dir = Path(exp_dir)
        self.env = env  # more for every run (--runs-per-gpu, threads, the MPS pipes)
        self.pending, self.total = deque(tasks), len(tasks)
        self.jobs, self.gpus = jobs, list(gpus)
        self.running: Dict[int, Tuple[Task, subprocess.Popen, float]] = {}  # slot -> ...
        self.results: Dict[int, int] = {}  # task index -> exit code
        self.stops = self._forwarded = 0  # stop requests received, and passed on to the runs
        self._busy: Dict[int, int] = {}  # task index -> PID holding its run dir's lock
        self._preexec = die_with_parent()

    def log_path(self, task: Task) -> Path:
        return self.exp_dir / "tasks" / f"{task.index}.out"

    def _say(self, what: str, task: Task, text: str) -> None:
        print(f"[local] {what:6s} {task.index + 1}/{self.total} {task.name}{text}", flush=True)

    def _start(self, slot: int, task: Task) -> None:
        env = {**os.environ, **self.env}
        gpu = ""
        if self.gpus:  # slot s always on GPU s mod G: with --jobs G x K, K runs on each
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
            gpu = f" on GPU {env['CUDA_VISIBLE_DEVICES']}"
        log = self.log_path(task)
        with open(log, "ab") as out:
            out.write(f"== {task.line}\n".encode())
            out.flush()
            proc = subprocess.Popen(task.argv, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                    preexec_fn=self._preexec)
        status.mark_start(self.exp_dir, task.index, launcher="local", pid=proc.pid,
                          log=str(log), time=time.time())
        self.running[slot] = (task, proc, time.monotonic())
        self._say("start", task, f"{gpu} (log {log})")

    def _reap(self) -> None:
        for slot, (task, proc, t0) in list(self.running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            rc = 128 - rc if rc < 0 else rc  # killed by signal N: report 128 + N like a shell
            if self._forwarded and rc == 128 + signal.SIGUSR1:
                rc = EXIT_STOPPED  # asked to stop before it installed its handler: nothing lost
            del self.running[slot]
            self.results[task.index] = rc
            status.mark_end(self.exp_dir, task.index, rc)
            what = _ENDS.get(rc) or f"FAILED (exit {rc}): {status.last_line(self.log_path(task))}"
            self._say("end", task, f": {what} after {time.monotonic() - t0:.0f} s")

    def _next_free(self) -> Optional[Task]:
        """The first pending task whose run directory no live process holds, off the queue."""
        for task in list(self.pending):
            holder = status.lock_holder(task.run_dir(self.exp_dir))
            if holder is None:
                self.pending.remove(task)
                if self._busy.pop(task.index, None) is not None:
                    self._say("free", task, ": its run directory was released")
                return task
            if task.index not in self._busy:
                self._busy[task.index] = holder
                who = f"process {holder}" if holder > 0 else "another process"
                self._say("busy", task, f": {who} still trains it (holds "
                          f"{task.run_dir(self.exp_dir) / runlog.LOCK}); starting this line "
                          "when it ends")
        return None

    def _forward_stop(self) -> None:
        """First request: SIGUSR1 (checkpoint the epoch, exit 3); second: SIGINT (at once)."""
        while self._forwarded < min(self.stops, 2):
            self._forwarded += 1
            sig, how = _STOPS[self._forwarded - 1]
            print(f"[local] stopping: {how}; {len(self.pending)} line(s) not started", flush=True)
            for task, proc, _ in self.running.values():
                with contextlib.suppress(ProcessLookupError):  # just ended: _reap records it
                    if sig == signal.SIGINT:
                        os.killpg(proc.pid, sig)  # the whole run, whatever it started
                    else:
                        proc.send_signal(sig)  # the run itself: its handler checkpoints

    def _stop(self, signum, frame=None) -> None:
        self.stops += 1

    def run(self) -> int:
        handlers = {s: signal.signal(s, self._stop)
                    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
        try:
            while self.pending or self.running:
                self._forward_stop()
                self._reap()
                while not self.stops and self.pending and len(self.running) < self.jobs:
                    task = self._next_free()
                    if task is None:
                        break  # every line left is held by a live process: wait
                    slot = next(s for s in range(self.jobs) if s not in self.running)
                    self._start(slot, task)
                if self.stops and not self.running:
                    break
                time.sleep(POLL_S)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        return self._summary()

    def _summary(self) -> int:
        if self.stops:
            left = [s for s in status.grid_states(self.exp_dir) if s.state != "finished"]
            print(f"[local] stopped; {len(left)} run(s) left (launch again to resume them):",
                  *(f"  {s.task.name}: {s.state}: {s.detail}" for s in left), sep="\n",
                  file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        return 1 if any(rc not in (0, *status.RESUMABLE) for rc in self.results.values()) else 0


def run(exp_dir: Path, tasks: Sequence[Task], jobs: int, device: str,
        runs_per_gpu: int = 1, fit: str = "") -> int:
    """Run ``tasks``, ``jobs`` at once; 0 all done, 1 some failed, 130 stopped."""
    gpus = visible_gpus() if device == "cuda" else []
    # unless set, each run gets cores // jobs threads: N all-core pools slow each other down
    threads = (None if "OMP_NUM_THREADS" in os.environ
               else max(1, len(os.sched_getaffinity(0)) // jobs))
    (Path(exp_dir) / "tasks").mkdir(parents=True, exist_ok=True)
    shared = bool(gpus) and jobs > len(gpus)
    with (mps.daemon() if shared else contextlib.nullcontext(({}, ""))) as (env, note):
        print(f"[local] {len(tasks)} run(s), {jobs} at once"
              + (f", GPUs {','.join(gpus)}" if gpus else "")
              + (f", {-(-jobs // len(gpus))} per GPU ({note}; "
                 f"{fit or 'their memory fit unchecked'})" if shared else "")
              + (f", OMP_NUM_THREADS={threads} each" if threads else "") + f"; manifest "
              f"{Path(exp_dir) / 'manifest.txt'}; follow with: bash run_experiments.sh status "
              f"{exp_dir}", flush=True)
        env = {**env, runlog.PACKING_ENV: str(runs_per_gpu),
               **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        return LocalLauncher(exp_dir, tasks, jobs, gpus, env).run()
