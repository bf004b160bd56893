"""A whole table on several local GPUs or a Slurm cluster: the rows × seeds as single-run lines
in ``<exp>/manifest.txt``, run as subprocesses (``local``) or a Slurm job array plus a
compare job (``slurm``). With one local job the table trains in the command's process."""
from __future__ import annotations

import fcntl
from pathlib import Path

from crmn import report
from crmn.errors import RunError
from crmn.launch import local, manifest, slurm, status
from crmn.plan import TrainPlan


def _jobs(plan: TrainPlan) -> int:
    return plan.launch.jobs or local.default_jobs(plan.backend_options.device, plan.launch.per_gpu)


def wanted(plan: TrainPlan) -> bool:
    return plan.launch.launcher == "slurm" or _jobs(plan) > 1


def _claim(exp_dir: Path):
    """Hold ``tasks/.lock``: a second launcher on the folder would train the same runs twice."""
    (exp_dir / "tasks").mkdir(parents=True, exist_ok=True)
    f = open(exp_dir / "tasks" / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise RunError(f"{exp_dir}: another launcher is running this grid; wait for it to "
                       "end, or follow it with status") from None
    return f


def main(plan: TrainPlan, entry: Path) -> int:
    """Write the manifest of ``plan`` and run it with its launcher (``entry``: the archive's
    ``run_experiments.sh``); the exit code."""
    exp_dir = Path(plan.out_dir).resolve() / plan.command
    tasks = manifest.build(plan, ["bash", str(entry)])
    options, device = plan.launch, plan.backend_options.device
    if options.launcher == "slurm":
        slurm.require_sbatch()
    # K runs that would not fit the GPU: refused before anything is written
    fit = local.memory_fit(options.per_gpu) if device.startswith("cuda") else ""
    lock = _claim(exp_dir)
    try:
        if status.slurm_jobs(exp_dir):
            slurm.refuse_if_queued(exp_dir)
            if options.launcher == "local":  # that submission is over: status follows this one
                (exp_dir / "slurm" / status.JOBS).unlink()
        status.clear_markers(exp_dir)
        path = manifest.write(exp_dir, tasks)
        print(f"manifest: {len(tasks)} run(s) in {path}", flush=True)
        if options.launcher == "slurm":
            jobs = slurm.submit(exp_dir, tasks, entry, max_parallel=options.max_parallel,
                                slurm_args=options.slurm_args, experiment=plan.command,
                                max_requeues=options.requeues, runs_per_gpu=options.per_gpu)
            lock.close()  # the jobs own the grid now (refuse_if_queued guards it)
            return slurm.wait(exp_dir, jobs) if options.wait else 0
        rc = local.run(exp_dir, tasks, _jobs(plan), device, options.per_gpu, fit)
    finally:
        lock.close()
    if rc == local.EXIT_INTERRUPTED:
        return rc
    report.compare(exp_dir, plots=True)
    return max(rc, status.check_complete(exp_dir))
