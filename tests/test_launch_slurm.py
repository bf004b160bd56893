"""`--launcher slurm` against a real one-node Slurm cluster (tests/slurm_cluster.py).

The cluster runs as plain processes for this module only. Where Slurm is missing,
scripts/install_slurm.sh installs it (root + apt-get); only where that is impossible do
these tests skip, saying why; under CI=true they fail instead.
"""
import json
import os
import signal
import subprocess
import time

import pytest

import launch_grid as grid
from crmn.launch import manifest, status
from slurm_cluster import SlurmCluster, slurm_available


def _require_slurm() -> None:
    reason = slurm_available()
    if reason and os.geteuid() == 0:
        subprocess.run(["bash", str(grid.ROOT / "scripts" / "install_slurm.sh")],
                       capture_output=True, timeout=900)
        reason = slurm_available()
    if reason:
        message = f"SLURM TESTS NOT RUN: {reason}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: a skip would hide it)")
        pytest.skip(message)


@pytest.fixture(scope="module")
def cluster():
    _require_slurm()
    c = SlurmCluster().start()
    try:
        yield c
    finally:
        c.stop()


def _env(cluster, **extra):
    # poll squeue every second in `--wait` (10 s by default)
    return grid.env(SLURM_CONF=str(cluster.conf), CRMN_SLURM_POLL="1", **extra)


def _squeue(cluster, *args):
    return subprocess.run(["squeue", "-h", *args], capture_output=True, text=True,
                          env=_env(cluster), timeout=30).stdout


@pytest.mark.slow
def test_slurm_grid_survives_a_stop_and_equals_the_local_run(cluster, tmp_path_factory,
                                                             monkeypatch):
    """Submit held (waiting), refuse a second submission, release (running), signal task 0
    like a time limit (it checkpoints, exits 3, requeues itself, resumes from its epoch);
    `--wait` returns the compare job's 0; arrays and comparison equal the in-process grid."""
    root = tmp_path_factory.getbasetemp() / "launch"
    ref = grid.reference(root)
    out = root / "slurm"
    exp = out / "table1"
    env = _env(cluster)
    t0 = time.monotonic()
    p = subprocess.Popen(grid.grid_argv(root / "data", out, "--launcher", "slurm",
                                        "--wait", "--slurm-args=--hold"),
                         env=env, cwd=grid.ROOT, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    jobs_file = exp / "slurm" / "jobs.json"
    grid.wait_for(jobs_file.exists, "jobs.json", timeout=60)
    jobs = json.loads(jobs_file.read_text())
    assert all(s == "waiting" for s, _ in grid.status_table(exp, env=env).values())
    again = grid.cli(*grid.grid_argv(root / "data", out, "--launcher", "slurm")[2:], env=env)
    assert again.returncode == 1 and "still queued; wait for them or scancel them" in again.stderr
    # --slurm-args go to both jobs: release the compare job too
    subprocess.run(["scontrol", "release", jobs["array"], jobs["compare"]], env=env,
                   check=True, timeout=30)
    run0 = exp / grid.ROWS[0] / "seed0"
    grid.wait_for(lambda: grid.epochs_logged(run0) >= 1, "task 0's first epoch", timeout=180)
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    states = status.grid_states(exp)  # in this process: no CLI start-up before the signal
    subprocess.run(["scancel", "--batch", "--signal=USR1", f"{jobs['array']}_0"], env=env,
                   check=True, timeout=30)
    assert states[0].state == "running" and "final epoch" in states[0].detail, states
    assert f"(job {jobs['array']}_0)" in states[0].detail, states
    assert states[1].state == "running", states
    stdout, stderr = p.communicate(timeout=600)
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, (stdout + stderr)[-4000:]
    log0 = (exp / "slurm" / f"{jobs['array']}_0.out").read_text()
    assert "SIGUSR1" in log0 and "requeueing" in log0 and "start 2 on" in log0, log0[-3000:]
    resumed = [int(ln.rsplit(" ", 1)[1]) for ln in log0.splitlines()
               if "resuming final run after epoch" in ln]
    assert resumed and resumed[0] > 0, log0[-3000:]
    assert (exp / "slurm" / "compare.rc").read_text().strip() == "0"
    assert "[slurm] compare job" in stdout and "| t1-crmn32x1 " in stdout
    assert all(s == "finished" for s, _ in grid.status_table(exp, env=env).values())
    assert grid.assert_same_checkpoints(ref, exp) > 100
    assert grid.comparison_rows(exp) == grid.comparison_rows(ref)
    print(f"\nslurm grid end to end (held submission, one stop and requeue): {elapsed:.0f} s; "
          f"sbatch x2: {jobs['submit_seconds']:.2f} s")


@pytest.mark.slow
def test_slurm_failed_run_does_not_block_compare(cluster, tmp_path_factory):
    """One task fails at once (corrupt checkpoint): the other finishes, the compare job
    still runs (afterany), lists the failure and exits 1, which `--wait` returns; status
    shows the failure with its log's last line."""
    root = tmp_path_factory.getbasetemp() / "launch"
    grid.fake_data(root / "data")
    out = root / "slurm-fail"
    exp = out / "table1"
    grid.corrupt_checkpoint(exp, "t1-crmn32x1")
    env = _env(cluster)
    p = subprocess.run(grid.grid_argv(root / "data", out, "--launcher", "slurm", "--wait",
                                      "--max-parallel", "1"),
                       env=env, cwd=grid.ROOT, text=True, capture_output=True, timeout=600)
    assert p.returncode == 1, (p.stdout + p.stderr)[-4000:]
    assert "incomplete: t1-crmn32x1 seed 0: failed: exit 1: error: " in p.stdout
    assert "[slurm] compare job" in p.stdout and "exited 1" in p.stdout
    states = grid.status_table(exp, env=env)
    assert states["t1-resnet32x1"][0] == "finished"
    state, detail = states["t1-crmn32x1"]
    assert state == "failed" and "truncated or corrupt checkpoint" in detail
    jobs = json.loads((exp / "slurm" / "jobs.json").read_text())
    assert jobs["max_parallel"] == 1 and not _squeue(cluster, "-j", jobs["compare"]).strip()


@pytest.mark.slow
def test_slurm_tasks_of_one_row_share_the_compile_cache(cluster, tmp_path_factory):
    """Two seeds of one row in the JAX mode, one task at a time, with one $CRMN_CACHE (a
    cluster's shared folder): both finish; the first compiles (its log says "miss"), the
    second finds the step the first stored (its log says "hit")."""
    root = tmp_path_factory.getbasetemp() / "launch"
    grid.fake_data(root / "data")
    out = root / "slurm-cache"
    exp = out / "table1"
    cache = tmp_path_factory.mktemp("shared-cache")
    env = _env(cluster, CRMN_CACHE=str(cache))
    argv = ["bash", str(grid.ENTRY), "table1", "--rows", "t1-crmn32x1", "--seeds", "2",
            "--backend", "theano", "--theano-mode", "jax", "--n", "1", "--k", "0.5",
            "--batch-size", "50", "--schedule", "1,0,0", "--no-progress",
            "--data-dir", str(root / "data"), "--out-dir", str(out),
            "--launcher", "slurm", "--wait", "--max-parallel", "1"]
    p = subprocess.run(argv, env=env, cwd=grid.ROOT, text=True, capture_output=True,
                       timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    runs = []
    for seed in (0, 1):
        run = exp / "t1-crmn32x1" / f"seed{seed}"
        first = json.loads((run / "log.jsonl").read_text().splitlines()[0])
        started = json.loads((run / "config.json").read_text())["started"]
        assert json.loads((run / "summary.json").read_text())["status"] == "done"
        runs.append((started, first["cache_outcome"], first["compile_seconds"]))
    (_, cold, cold_s), (_, warm, warm_s) = sorted(runs)
    assert (cold, warm) == ("miss", "hit"), runs  # from the logs; the seconds are printed
    assert list((cache / "jax").glob("*.entry"))  # the shared folder holds the entries
    print(f"\nslurm tasks sharing the compile cache: first compiled {cold_s:.1f} s (miss), "
          f"second {warm_s:.1f} s (hit)")


@pytest.mark.slow
def test_slurm_runs_per_gpu_2_runs_two_lines_a_task_and_requeues_both(cluster, tmp_path_factory):
    """`--runs-per-gpu 2`: four manifest lines as a two-task array, each task running its two
    lines at once; a stop signal to task 0 checkpoints both of its runs, the task requeues
    itself and resumes both; status shows each run finished."""
    root = tmp_path_factory.getbasetemp() / "launch"
    grid.fake_data(root / "data")
    out = root / "slurm-packed"
    exp = out / "table1"
    env = _env(cluster)
    argv = grid.grid_argv(root / "data", out, "--launcher", "slurm", "--wait",
                          "--runs-per-gpu", "2")
    argv[argv.index("--seeds") + 1] = "2"
    t0 = time.monotonic()
    p = subprocess.Popen(argv, env=env, cwd=grid.ROOT, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    jobs_file = exp / "slurm" / "jobs.json"
    grid.wait_for(jobs_file.exists, "jobs.json", timeout=60)
    jobs = json.loads(jobs_file.read_text())
    assert jobs["runs_per_gpu"] == 2 and jobs["tasks"] == 4
    tasks = manifest.read(exp)
    assert len(tasks) == 4
    first = [t.run_dir(exp) for t in tasks[:2]]  # lines 1 and 2: task 0
    grid.wait_for(lambda: all(grid.epochs_logged(r) >= 1 for r in first), "task 0's first "
                  "epochs", timeout=240)
    subprocess.run(["scancel", "--batch", "--signal=USR1", f"{jobs['array']}_0"], env=env,
                   check=True, timeout=30)
    stdout, stderr = p.communicate(timeout=600)
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, (stdout + stderr)[-4000:]
    assert f"submitted array job {jobs['array']} (2 task(s) of 2 runs each, 4 in all)" in stdout
    log0 = (exp / "slurm" / f"{jobs['array']}_0.out").read_text()
    assert "requeueing" in log0 and "start 2 on" in log0, log0[-3000:]
    for i in (0, 1):  # both runs of task 0 resumed from their checkpoints
        run_log = (exp / "tasks" / f"{i}.out").read_text()
        assert "resuming final run after epoch" in run_log, run_log[-2000:]
    for i in (2, 3):
        assert "resuming" not in (exp / "tasks" / f"{i}.out").read_text()
    states = status.grid_states(exp)
    assert [s.state for s in states] == ["finished"] * 4, states
    config = json.loads((first[0] / "config.json").read_text())
    assert config["runs_per_gpu"] == 2
    print(f"\nslurm, 2 runs per task, one stop and requeue: {elapsed:.0f} s")
