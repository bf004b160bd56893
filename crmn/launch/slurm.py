"""The Slurm launcher: the manifest as one job array (``task.sh``, task ``i`` runs line
``i``), then a compare job (``compare.sh``); the job ids go to ``<exp>/slurm/jobs.json``.
A failed submission removes the manifest, so ``status`` never reads an unlaunched grid.
Cluster settings: ``SBATCH_*`` variables and ``--slurm-args`` (last, so they win)."""
from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from crmn import runlog
from crmn.errors import ConfigError
from crmn.launch import status
from crmn.launch.manifest import MANIFEST, Task

TASK_SH = Path(__file__).resolve().parent / "task.sh"
COMPARE_SH = TASK_SH.with_name("compare.sh")
POLL_S = 10.0  # seconds between two squeue calls of --wait (environment: CRMN_SLURM_POLL)


def require_sbatch() -> None:
    missing = [c for c in ("sbatch", "squeue", "scontrol") if shutil.which(c) is None]
    if missing:
        raise ConfigError(f"--launcher slurm: {', '.join(missing)} not found on PATH; run "
                          f"this on a Slurm login node, install Slurm's client (Debian: "
                          f"apt-get install slurm-client; a test cluster: bash "
                          f"scripts/install_slurm.sh), or use --launcher local")


def _sbatch(argv: Sequence[str]) -> str:
    """Run ``sbatch --parsable ...``; the job id, or :class:`ConfigError` with sbatch's error."""
    try:
        p = subprocess.run(["sbatch", "--parsable", *argv], capture_output=True, text=True,
                           timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConfigError(f"sbatch could not run: {exc}") from None
    job = p.stdout.strip().split(";")[0]
    if p.returncode != 0 or not job.isdigit():
        why = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        raise ConfigError(f"sbatch refused the job: {why}")
    return job


def queued(job_ids: Sequence[str]) -> List[str]:
    ids = [str(j) for j in job_ids if j]
    if not ids:
        return []
    p = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%F"],
                       capture_output=True, text=True, timeout=60)
    if p.returncode != 0 and "Invalid job id" not in p.stderr:
        raise ConfigError(f"squeue failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}; "
                          "check the cluster (sinfo) and run the command again")
    return sorted(set(p.stdout.split()) & set(ids))


def refuse_if_queued(exp_dir: Path) -> None:
    """Refuse while a previous submission for the folder is queued (it would train twice)."""
    jobs = status.slurm_jobs(exp_dir)
    if jobs and shutil.which("squeue"):
        active = queued([jobs.get("array"), jobs.get("compare")])
        if active:
            raise ConfigError(f"{exp_dir}: job(s) {', '.join(active)} of a previous "
                              f"submission are still queued; wait for them or scancel them")


def submit(exp_dir: Path, tasks: Sequence[Task], entry: Path, *, max_parallel: Optional[int],
           slurm_args: str, max_requeues: int, experiment: str, runs_per_gpu: int = 1) -> Dict:
    logs = exp_dir / "slurm"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / "compare.rc").unlink(missing_ok=True)
    user = shlex.split(slurm_args or "")
    arrays = -(-len(tasks) // runs_per_gpu)  # task a runs lines a*K .. a*K + K-1
    span = f"0-{arrays - 1}" + (f"%{max_parallel}" if max_parallel else "")
    t0 = time.monotonic()
    try:
        array = _sbatch([f"--array={span}", f"--job-name=crmn-{experiment}",
                         "--open-mode=append", f"--output={logs}/%A_%a.out", *user,
                         str(TASK_SH), str(exp_dir / MANIFEST), str(exp_dir), str(max_requeues),
                         str(runs_per_gpu)])
    except ConfigError as exc:
        _unlaunched(exp_dir)
        raise ConfigError(f"{exc}; nothing submitted ({exp_dir / MANIFEST} removed); check "
                          "the cluster (sinfo), or use --launcher local") from None
    try:
        compare = _sbatch([f"--dependency=afterany:{array}",
                           f"--job-name=crmn-{experiment}-compare", "--open-mode=append",
                           f"--output={logs}/compare_%j.out", *user, str(COMPARE_SH),
                           str(entry), str(exp_dir)])
    except ConfigError as exc:
        scancel = status.run_quiet(["scancel", array], timeout=60)
        if scancel and scancel.returncode == 0:
            _unlaunched(exp_dir)
            raise ConfigError(f"{exc} (the compare job); array job {array} cancelled, "
                              f"nothing left queued ({exp_dir / MANIFEST} removed)") from None
        # the array could not be cancelled: it will run, so status must follow it
        compare = None
        print(f"[slurm] warning: the compare job was refused ({exc}) and array job {array} "
              f"could not be cancelled; it runs without a comparison: run compare "
              f"{exp_dir} after it", file=sys.stderr, flush=True)
    jobs = dict(array=array, compare=compare, tasks=len(tasks), runs_per_gpu=runs_per_gpu,
                max_parallel=max_parallel, slurm_args=slurm_args or "", submitted=time.time(),
                submit_seconds=round(time.monotonic() - t0, 3),
                task_log=str(logs / f"{array}_<i>.out"),
                compare_log=str(logs / f"compare_{compare}.out") if compare else None)
    runlog.write_json(logs / status.JOBS, jobs)
    print(f"[slurm] submitted array job {array} ({arrays} task(s)"
          + (f" of {runs_per_gpu} runs each, {len(tasks)} in all" if runs_per_gpu > 1 else "")
          + (f", at most {max_parallel} at once" if max_parallel else "") + ")"
          + (f" and compare job {compare} (after the array, however it ends)" if compare
             else ""), flush=True)
    print(f"[slurm] job ids in {logs / status.JOBS}; task logs {logs}/{array}_<i>.out; "
          f"follow with: bash run_experiments.sh status {exp_dir}", flush=True)
    return jobs


def _unlaunched(exp_dir: Path) -> None:
    """Undo what a failed submission left: the manifest and the empty log folder."""
    (exp_dir / MANIFEST).unlink(missing_ok=True)
    runlog.fsync_dir(exp_dir)
    with contextlib.suppress(OSError):
        (exp_dir / "slurm").rmdir()  # only when empty: an earlier submission's logs stay


def _poll_s() -> float:
    try:
        return max(0.2, float(os.environ.get("CRMN_SLURM_POLL", POLL_S)))
    except ValueError:
        raise ConfigError(f"CRMN_SLURM_POLL={os.environ['CRMN_SLURM_POLL']!r} is not a "
                          f"number of seconds") from None


def wait(exp_dir: Path, jobs: Dict) -> int:
    """Poll ``squeue`` until the compare job has ended, print its output; its exit code."""
    poll, last = _poll_s(), None
    while queued([jobs.get("compare") or jobs["array"]]):
        counts = status.counts(status.grid_states(exp_dir))
        if counts != last:
            print(f"[slurm] {time.strftime('%H:%M:%S')} {counts}", flush=True)
            last = counts
        time.sleep(poll)
    if not jobs.get("compare"):
        print(f"error: no compare job was submitted (sbatch refused it); run: bash "
              f"run_experiments.sh compare {exp_dir}", file=sys.stderr, flush=True)
        return 1
    log = Path(jobs["compare_log"])
    if log.exists():
        sys.stdout.write(log.read_text(errors="replace"))
    rc_file = exp_dir / "slurm" / "compare.rc"
    if not rc_file.exists():
        print(f"error: compare job {jobs['compare']} ended without writing {rc_file} "
              f"(cancelled, or it never ran)", file=sys.stderr, flush=True)
        return 1
    rc = int(rc_file.read_text().split()[0])
    print(f"[slurm] compare job {jobs['compare']} exited {rc}", flush=True)
    return rc

