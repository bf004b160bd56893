"""The launchers without Slurm: the manifest, option checks, `--launcher local --jobs 2`
(results equal to the in-process run, Ctrl-C, a failing run) and `status`."""
import dataclasses
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import launch_grid as grid
from crmn import cli
from crmn import plan as plans
from crmn.cli import parser
from crmn.launch import manifest, status


def _args(argv):
    return parser.parse(argv)


def test_manifest_lines_reparse_to_the_same_runs(tmp_path, monkeypatch):
    """Each line is one run's exact command: parsed again it gives the user's options, its
    row and seed, --resume, absolute paths, and no launcher option."""
    monkeypatch.chdir(tmp_path)
    argv = ["table1", "--rows", "t1-crmn32x1,t1-resnet32x1", "--seeds", "2", "--backend",
            "torch", "--forget-bias", "-1.5", "--schedule", "5,4,3", "--flip", "--k", "0.5",
            "--data-dir", "d", "--out-dir", "o", "--launcher", "local", "--jobs", "3"]
    args = _args(argv + ["--lr", "0.05", "--dtype", "float64", "--epochs-cap", "3"])
    plan = plans.train_plan(args)
    tasks = manifest.build(plan, ["bash", "/x/run_experiments.sh"])
    assert [(t.row, t.seed) for t in tasks] == [("t1-crmn32x1", 0), ("t1-crmn32x1", 1),
                                               ("t1-resnet32x1", 0), ("t1-resnet32x1", 1)]
    path = manifest.write(tmp_path / "exp", tasks)
    again = manifest.read(tmp_path / "exp")
    assert again == tasks and len(path.read_text().splitlines()) == 4
    for t in tasks:
        words = shlex.split(t.line)
        assert words[:2] == ["bash", "/x/run_experiments.sh"]
        assert "--jobs" not in words and "--launcher" not in words
        one = _args(words[2:])
        assert (one.rows, one.seed, one.seeds, one.resume, one.progress) == (
            t.row, t.seed, None, True, False)
        assert one.data_dir == tmp_path / "d" and one.out_dir == tmp_path / "o"
        for dest in ("backend", "forget_bias", "schedule", "flip", "k", "dtype", "patience",
                     "epochs_cap"):
            assert getattr(one, dest) == getattr(args, dest), dest
        assert one.launcher == "local" and one.jobs is None  # the line itself runs in-process
        (again_run,) = plans.train_plan(one).runs  # the line plans exactly its run
        run = plan.runs[t.index]
        assert again_run.spec == dataclasses.replace(run.spec, data_dir=tmp_path / "d")
        assert again_run.run_dir == tmp_path / "o" / "table1" / t.row / f"seed{t.seed}"


def test_manifest_lines_keep_no_compile_cache(tmp_path, monkeypatch):
    """``--no-compile-cache`` is a backend option: a launcher's line carries it, and the line
    plans the same run (compile_cache False)."""
    monkeypatch.chdir(tmp_path)
    args = _args(["table1", "--rows", "t1-crmn32x1", "--seeds", "1", "--backend", "theano",
                  "--theano-mode", "jax", "--no-compile-cache", "--data-dir", "d",
                  "--out-dir", "o", "--launcher", "local", "--jobs", "2"])
    plan = plans.train_plan(args)
    assert plan.backend_options.compile_cache is False
    (task,) = manifest.build(plan, ["bash", "/x/run_experiments.sh"])
    assert "--no-compile-cache" in shlex.split(task.line)
    (again,) = plans.train_plan(_args(shlex.split(task.line)[2:])).runs
    assert again.spec == dataclasses.replace(plan.runs[0].spec, data_dir=tmp_path / "d")
    # the cache's default renders nothing
    plan = plans.train_plan(_args(["table1", "--rows", "t1-crmn32x1", "--seeds", "1",
                                   "--backend", "theano", "--theano-mode", "jax"]))
    line = manifest.build(plan, ["bash", "/x/run_experiments.sh"])[0].line
    assert "compile-cache" not in line


@pytest.mark.parametrize("argv, needle", [
    (["table1", "--backend", "torch", "--no-compile-cache"],
     "--no-compile-cache is an option of the theano backend"),
    (["table1", "--launcher", "slurm", "--jobs", "2"], "--jobs is for --launcher local"),
    (["table1", "--wait"], "--wait only apply to --launcher slurm"),
    (["table1", "--launcher", "local", "--max-parallel", "2"], "--max-parallel only apply"),
    (["table1", "--launcher", "slurm", "--max-requeues", "-1"], "--max-requeues wants N >= 0"),
    (["table1", "--launcher", "pbs"], "invalid choice: 'pbs'"),
    (["table1", "--jobs", "0"], "expected a number >= 1"),
])
def test_launcher_usage_errors_exit_2_one_line(argv, needle, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1 and needle in err, err


def test_slurm_launcher_without_sbatch_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, squeue, scontrol
    rc = cli.main(["table1", "--rows", "t1-crmn32x1", "--launcher", "slurm", "--out-dir",
                   str(tmp_path / "runs")])
    out, err = capsys.readouterr()
    assert rc == 1 and err.count("\n") == 1
    assert "sbatch, squeue, scontrol not found on PATH" in err
    assert "scripts/install_slurm.sh" in err and "--launcher local" in err
    assert not (tmp_path / "runs" / "table1" / "manifest.txt").exists()


def test_status_without_manifest_is_one_line(tmp_path):
    p = grid.cli("status", str(tmp_path))
    assert p.returncode == 1 and p.stderr.count("\n") == 1
    assert "no manifest.txt" in p.stderr


@pytest.mark.slow
def test_local_jobs_2_interrupted_then_resumed_equals_in_process(tmp_path_factory):
    """`--launcher local --jobs 2`: Ctrl-C while both runs train stops them cleanly (each
    checkpoints its epoch, exit 3; the launcher lists what was left and exits 130); launching
    again resumes them; every checkpoint array and the comparison then equal the grid
    trained in one process."""
    root = tmp_path_factory.getbasetemp() / "launch"
    ref = grid.reference(root)
    out = root / "local"
    exp = out / "table1"
    p = subprocess.Popen(grid.grid_argv(root / "data", out, "--launcher", "local", "--jobs",
                                        "2"), env=grid.env(), cwd=grid.ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    runs = [exp / r / "seed0" for r in grid.ROWS]
    grid.wait_for(lambda: all(grid.epochs_logged(r) >= 1 for r in runs), "a first epoch of "
                  "both runs", timeout=180)
    states = status.grid_states(exp)  # in this process: no CLI start-up before the signal
    assert all(s.state == "running" and "final epoch" in s.detail for s in states), states
    p.send_signal(signal.SIGINT)  # what Ctrl-C does to the launcher (the runs have their own session)
    out_text, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "stopping: each run ends its epoch" in out_text
    assert "run(s) left (launch again to resume them)" in err
    for r in runs:
        assert (r / "checkpoint.h5").is_file() and not (r / "summary.json").exists()
        assert grid.epochs_logged(r) < grid.EPOCHS
    assert [(exp / "tasks" / f"{i}.rc").read_text().strip() for i in (0, 1)] == ["3", "3"]
    states = grid.status_table(exp)
    assert all(s == "stopped" for s, _ in states.values()), states
    _relaunch_finishes_as_in_process(root, exp, ref)


@pytest.mark.slow
def test_local_failed_run_is_reported_and_others_finish(tmp_path_factory):
    """One run fails (its checkpoint is corrupt): the other still finishes, the launcher
    prints the comparison and exits 1, status and compare name the failure."""
    root = tmp_path_factory.getbasetemp() / "launch"
    grid.fake_data(root / "data")
    out = root / "local-fail"
    bad = grid.corrupt_checkpoint(out / "table1", "t1-crmn32x1")
    p = subprocess.run(grid.grid_argv(root / "data", out, "--launcher", "local", "--jobs",
                                      "2"), env=grid.env(), cwd=grid.ROOT, text=True,
                       capture_output=True, timeout=600)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "t1-crmn32x1 seed 0: FAILED (exit 1): error: " in p.stdout
    assert "| t1-resnet32x1 " in p.stdout  # the comparison still printed
    assert "incomplete: t1-crmn32x1 seed 0: failed: exit 1: error: " in p.stderr
    assert bad.read_bytes() == b"not an HDF5 file\n"  # never destroyed
    states = grid.status_table(out / "table1")
    assert states["t1-resnet32x1"][0] == "finished"
    state, detail = states["t1-crmn32x1"]
    assert state == "failed" and "truncated or corrupt checkpoint" in detail
    c = grid.cli("compare", str(out / "table1"), "--no-plots")
    assert c.returncode == 1 and "incomplete: 1 run(s) of the manifest not finished" in c.stderr


# ---------------------------------------------------------------------------------------
# the launchers' truth when a launcher dies, is interrupted twice, or cannot submit

#: a stand-in for one run: it takes its run directory's lock as a run does, says so, and
#: sleeps (``slow``), ignores SIGUSR1 as well (``deaf``: only a second Ctrl-C stops it) or
#: ends at once (``quick``)
FAKE_RUN = """
import os, signal, sys, time
from pathlib import Path
from crmn import runlog
run_dir, mode = Path(sys.argv[1]), sys.argv[2]
run_dir.mkdir(parents=True, exist_ok=True)
if mode == "deaf":
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
with runlog.hold(run_dir):
    (run_dir / "ran").write_text(str(os.getpid()))
    if mode != "quick":
        time.sleep(120)
"""

#: the local launcher over two fake runs, as ``launch.main`` runs it
FAKE_LAUNCHER = """
import sys
from pathlib import Path
from crmn.launch import local, manifest
from crmn.launch.manifest import Task
exp, mode, script = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
rows = sys.argv[4:]
tasks = [Task(i, row, 0, (sys.executable, script, str(exp / row / "seed0"), mode,
                          "--rows", row, "--seed", "0")) for i, row in enumerate(rows)]
manifest.write(exp, tasks)
sys.exit(local.run(exp, tasks, 2, "cpu"))
"""


def _fake_launcher(exp: Path, mode: str) -> subprocess.Popen:
    script = exp.parent / "fake_run.py"
    script.write_text(FAKE_RUN)
    return subprocess.Popen([sys.executable, "-c", FAKE_LAUNCHER, str(exp), mode, str(script),
                             *grid.ROWS], env=grid.env(PYTHONPATH=str(grid.ROOT)),
                            cwd=grid.ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _run_pids(exp: Path) -> list:
    """The PIDs of the runs the fake launcher started, once both hold their locks."""
    ran = [exp / row / "seed0" / "ran" for row in grid.ROWS]
    grid.wait_for(lambda: all(p.exists() and p.read_text() for p in ran), "both fake runs",
                  timeout=60)
    return [int(p.read_text()) for p in ran]


def _hold_lock(run_dir: Path, seconds: float) -> subprocess.Popen:
    """Another process that holds ``run_dir``'s lock for ``seconds`` (as a run would)."""
    code = ("import sys, time; from crmn import runlog\n"
            "with runlog.hold(sys.argv[1]):\n"
            "    print('held', flush=True); time.sleep(float(sys.argv[2]))")
    run_dir.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-c", code, str(run_dir), str(seconds)],
                         env=grid.env(PYTHONPATH=str(grid.ROOT)), stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_lock_holder_reads_the_lock_without_taking_it(tmp_path, monkeypatch):
    """A held lock names its process (from the kernel's lock table, and from a try of the
    lock where there is no table); a released or stale one (the holder was killed) is
    free and a run can take it."""
    from crmn import runlog

    run_dir = tmp_path / "run"
    assert status.lock_holder(run_dir) is None  # no folder, no lock file
    holder = _hold_lock(run_dir, 60)
    try:
        assert status.lock_holder(run_dir) == holder.pid
        monkeypatch.setattr(runlog, "PROC_LOCKS", str(tmp_path / "no-such-table"))
        assert status.lock_holder(run_dir) == holder.pid
        monkeypatch.undo()
    finally:
        holder.kill()
        holder.wait()
    assert (run_dir / runlog.LOCK).exists()  # killed: the file stays, the lock does not
    assert status.lock_holder(run_dir) is None
    monkeypatch.setattr(runlog, "PROC_LOCKS", str(tmp_path / "no-such-table"))
    assert status.lock_holder(run_dir) is None
    with runlog.hold(run_dir):  # nothing above left a lock behind
        pass


def _fabricated_grid(exp: Path) -> list:
    """A manifest of the two rows and their run folders, one epoch logged in each."""
    tasks = [manifest.Task(i, row, 0, ("true", "--rows", row, "--seed", "0"))
             for i, row in enumerate(grid.ROWS)]
    manifest.write(exp, tasks)
    (exp / manifest.TASKS).mkdir()
    for t in tasks:
        run = t.run_dir(exp)
        run.mkdir(parents=True)
        (run / "config.json").write_text("{}\n")
        (run / "log.jsonl").write_text('{"phase": "final", "epoch": 1}\n')
    return tasks


@pytest.mark.parametrize("rc, start", [(None, False), (None, True), (1, True), (130, True)])
def test_status_shows_a_locked_run_as_running_whatever_its_markers(tmp_path, rc, start):
    """A live process holds the run's lock: running, with or without markers (a relaunch
    clears them), even with an exit code of an earlier end on record."""
    exp = tmp_path / "table1"
    tasks = _fabricated_grid(exp)
    if start:
        status.mark_start(exp, 0, launcher="local", pid=2 ** 22 + 1, log="x.out")
    if rc is not None:
        status.mark_end(exp, 0, rc)
    holder = _hold_lock(tasks[0].run_dir(exp), 60)
    try:
        s = status.task_state(exp, tasks[0], None)
        assert (s.state, s.detail) == (
            "running", f"final epoch 1 done (process {holder.pid} holds its lock)")
        table = grid.status_table(exp)
        assert table[tasks[0].row] == ("running", s.detail)
    finally:
        holder.kill()
        holder.wait()
    assert status.task_state(exp, tasks[0], None).state != "running"


def test_status_names_the_slurm_job_of_a_locked_run(tmp_path):
    """Seen from the node that runs it (or a one-machine cluster), a Slurm task's lock
    makes it running, with its job named, even when squeue no longer lists it."""
    exp = tmp_path / "table1"
    tasks = _fabricated_grid(exp)
    status.mark_start(exp, 0, launcher="slurm", job="12_0", pid=1, log="x.out")
    holder = _hold_lock(tasks[0].run_dir(exp), 60)
    try:
        s = status.task_state(exp, tasks[0], {})
    finally:
        holder.kill()
        holder.wait()
    assert (s.state, s.detail) == (
        "running", f"final epoch 1 done (job 12_0) (process {holder.pid} holds its lock)")
    assert status.task_state(exp, tasks[0], {}).state == "failed"  # gone from the queue


@pytest.mark.parametrize("rc, detail", [
    (3, "resumable: checkpointed its epoch and stopped (exit 3); final epoch 1 done; "
        "launch again"),
    (130, "resumable: interrupted by Ctrl-C (exit 130), its last checkpoint kept; final "
          "epoch 1 done; launch again"),
])
def test_status_shows_a_signalled_run_as_stopped_resumable(tmp_path, rc, detail):
    exp = tmp_path / "table1"
    tasks = _fabricated_grid(exp)
    status.mark_start(exp, 0, launcher="local", pid=2 ** 22 + 1, log=str(tmp_path / "0.out"))
    (tmp_path / "0.out").write_text("Traceback (most recent call last):\nKeyboardInterrupt\n")
    status.mark_end(exp, 0, rc)
    assert grid.status_table(exp)[tasks[0].row] == ("stopped", detail)


def _gone(pid: int) -> bool:
    return not status.pid_alive(pid)


def test_killed_local_launcher_takes_its_runs_with_it(tmp_path):
    """kill -9 of a `--jobs 2` launcher: both runs are gone within seconds; status shows
    them as stopped (resumable), not failed, and not running."""
    exp = tmp_path / "table1"
    p = _fake_launcher(exp, "slow")
    try:
        pids = _run_pids(exp)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        grid.wait_for(lambda: all(_gone(pid) for pid in pids), "the runs to die with their "
                      "launcher", timeout=10)
    finally:
        p.kill()
        for pid in pids if "pids" in locals() else ():
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
    for t in manifest.read(exp):
        s = status.task_state(exp, t, None)
        assert s.state == "stopped", s
        assert s.detail.startswith("resumable: process ") and "ended without an exit " \
            "code (its launcher was killed?)" in s.detail


@pytest.mark.slow
def test_relaunch_waits_for_a_run_whose_lock_is_held(tmp_path):
    """A line whose run directory a live process holds is not started (nor failed): the
    launcher says by whom, runs the other line, and starts it once the lock is released."""
    exp = tmp_path / "table1"
    held = exp / grid.ROWS[0] / "seed0"
    holder = _hold_lock(held, 4)
    try:
        p = _fake_launcher(exp, "quick")
        out, err = p.communicate(timeout=60)
    finally:
        holder.kill()
    assert p.returncode == 0, err[-2000:]
    assert (f"[local] busy   1/2 {grid.ROWS[0]} seed 0: process {holder.pid} still trains it "
            f"(holds {held / '.lock'}); starting this line when it ends") in out
    lines = out.splitlines()
    at = {what: next(i for i, ln in enumerate(lines) if ln.startswith(what))
          for what in (f"[local] start  2/2", f"[local] free   1/2", f"[local] start  1/2")}
    assert at["[local] start  2/2"] < at["[local] free   1/2"] < at["[local] start  1/2"]
    assert all((exp / row / "seed0" / "ran").exists() for row in grid.ROWS)
    assert [(exp / "tasks" / f"{i}.rc").read_text() for i in (0, 1)] == ["0\n", "0\n"]


def test_two_ctrl_c_stop_runs_as_resumable_not_failed(tmp_path):
    """Runs that ignore the first request (SIGUSR1) are interrupted by the second Ctrl-C:
    exit 130 each, which the launcher and status call stopped (resumable)."""
    exp = tmp_path / "table1"
    p = _fake_launcher(exp, "deaf")
    _run_pids(exp)
    p.send_signal(signal.SIGINT)
    first = []  # the second Ctrl-C only once the first was handled (else they coalesce)
    while not any("[local] stopping: each run ends its epoch" in ln for ln in first):
        first.append(p.stdout.readline())
        assert first[-1], "the launcher ended before it handled the first Ctrl-C"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    out = "".join(first) + out
    assert p.returncode == 130, err[-2000:]
    assert "FAILED" not in out
    assert out.count("stopped (resumable: interrupted, its last checkpoint kept)") == 2, out
    assert [(exp / "tasks" / f"{i}.rc").read_text() for i in (0, 1)] == ["130\n", "130\n"]
    for row, (state, detail) in grid.status_table(exp).items():
        assert state == "stopped" and detail.startswith(
            "resumable: interrupted by Ctrl-C (exit 130)"), (row, detail)


def _fake_slurm(folder: Path, accept: int, scancel_rc: int = 0) -> Path:
    """sbatch, squeue, scontrol and scancel stand-ins in ``folder``: sbatch accepts its
    first ``accept`` submissions (job ids 101, 102, ...) and then fails as it does when no
    controller answers; every call is logged in ``folder/calls``."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "calls"
    sbatch = (f'#!/bin/sh\necho "sbatch $*" >>"{log}"\n'
              f'n=$(($(cat "{folder}/count" 2>/dev/null || echo 0) + 1)); echo $n >"{folder}/count"\n'
              f'if [ $n -le {accept} ]; then echo "$((100 + n))"; exit 0; fi\n'
              f'echo "sbatch: error: Batch job submission failed: Unable to contact slurm '
              f'controller (connect failure)" >&2\nexit 1\n')
    others = {"squeue": 0, "scontrol": 0, "scancel": scancel_rc}
    (folder / "sbatch").write_text(sbatch)
    for name, rc in others.items():
        (folder / name).write_text(f'#!/bin/sh\necho "{name} $*" >>"{log}"\nexit {rc}\n')
    for name in ("sbatch", *others):
        (folder / name).chmod(0o755)
    return log


def _slurm_launch(tmp_path, monkeypatch, capsys, **fake):
    calls = _fake_slurm(tmp_path / "bin", **fake)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    rc = cli.main(["table1", "--rows", "t1-crmn32x1", "--launcher", "slurm", "--out-dir",
                   str(tmp_path / "runs")])
    out, err = capsys.readouterr()
    return rc, out, err, calls.read_text().splitlines()


def test_slurm_submission_refused_leaves_no_manifest(tmp_path, monkeypatch, capsys):
    """sbatch fails (no controller): exit 1, one line with sbatch's reason, no manifest
    (status then says there is no grid rather than "1 waiting (local launcher)")."""
    rc, out, err, calls = _slurm_launch(tmp_path, monkeypatch, capsys, accept=0)
    exp = tmp_path / "runs" / "table1"
    assert rc == 1 and err.count("\n") == 1, err
    assert err == ("error: sbatch refused the job: sbatch: error: Batch job submission "
                   "failed: Unable to contact slurm controller (connect failure); nothing "
                   f"submitted ({exp / 'manifest.txt'} removed); check the cluster (sinfo), "
                   "or use --launcher local\n")
    assert not (exp / "manifest.txt").exists() and not (exp / "slurm").exists()
    assert [c.split()[0] for c in calls] == ["sbatch"]
    p = grid.cli("status", str(tmp_path / "runs"))
    assert p.returncode == 1 and "no manifest.txt here" in p.stderr


def test_slurm_compare_job_refused_cancels_the_array(tmp_path, monkeypatch, capsys):
    """The array was accepted, the compare job not: the array is cancelled and the
    manifest removed; nothing stays queued that no comparison would follow."""
    rc, out, err, calls = _slurm_launch(tmp_path, monkeypatch, capsys, accept=1)
    exp = tmp_path / "runs" / "table1"
    assert rc == 1 and err.count("\n") == 1, err
    assert "Unable to contact slurm controller (connect failure) (the compare job); array " \
           f"job 101 cancelled, nothing left queued ({exp / 'manifest.txt'} removed)" in err
    assert "scancel 101" in calls
    assert not (exp / "manifest.txt").exists() and not (exp / "slurm" / "jobs.json").exists()


def test_slurm_array_that_cannot_be_cancelled_is_still_followed(tmp_path, monkeypatch,
                                                                 capsys):
    """The compare job refused and scancel failing too: the array will run, so its
    manifest and job id stay for status, which names the missing compare job."""
    rc, out, err, calls = _slurm_launch(tmp_path, monkeypatch, capsys, accept=1,
                                        scancel_rc=1)
    exp = tmp_path / "runs" / "table1"
    assert rc == 0 and "could not be cancelled; it runs without a comparison" in err
    assert (exp / "manifest.txt").exists()
    assert status.slurm_jobs(exp)["array"] == "101" and status.slurm_jobs(exp)["compare"] is None
    p = grid.cli("status", str(exp), env=grid.env(PATH=os.environ["PATH"]))
    assert p.returncode == 0 and "(Slurm array 101, no compare job)" in p.stdout, p.stderr


# ---------------------------------------------------------------------------------------
# task.sh outside Slurm: its exit codes and what it refuses to run


def _task_sh(manifest_path: Path, exp: Path, index: int = 0, args=None):
    e = grid.env(SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID=str(index))
    argv = ["bash", str(grid.ROOT / "crmn" / "launch" / "task.sh")]
    argv += [str(manifest_path), str(exp), "0"] if args is None else args
    return subprocess.run(argv, env=e, capture_output=True, text=True, timeout=60)


def test_task_sh_exit_codes_usage_2_data_1(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    marker = tmp_path / "marker"
    m = exp / "manifest.txt"
    m.write_text(shlex.join([sys.executable, "-c", f"open({str(marker)!r}, 'w')"]) + "\n")
    p = _task_sh(m, exp, args=[str(m), str(exp)])  # a wrong call: usage
    assert p.returncode == 2 and p.stderr.startswith("usage: ")
    p = _task_sh(m, exp, index=4)  # no such line: a data fault
    assert p.returncode == 1 and f"error: {m} has no line 5" in p.stderr
    assert (exp / "tasks" / "4.rc").read_text() == "1\n"
    p = _task_sh(tmp_path / "nothing", exp)
    assert p.returncode == 1 and "cannot read the manifest" in p.stderr
    p = _task_sh(m, exp)  # the line itself
    assert p.returncode == 0 and marker.exists(), p.stderr
    assert (exp / "tasks" / "0.rc").read_text() == "0\n"


@pytest.mark.parametrize("line", ["true $(touch {m})", "true `touch {m}`", "true; touch {m}",
                                  'sh -c "touch {m}"', "true > {m}"])
def test_task_sh_never_runs_code_hidden_in_a_manifest_line(tmp_path, line):
    """A line that is not plain quoted words (as the launcher writes them) is refused
    before the shell reads it: exit 1, nothing run."""
    exp = tmp_path / "exp"
    exp.mkdir()
    marker = tmp_path / "marker"
    m = exp / "manifest.txt"
    m.write_text(line.format(m=marker) + "\n")
    p = _task_sh(m, exp)
    assert p.returncode == 1 and "is not a plain quoted command line" in p.stderr
    assert not marker.exists()
    assert (exp / "tasks" / "0.rc").read_text() == "1\n"


# ---------------------------------------------------------------------------------------
# the same through the real command line, on the tiny grid


def _start_grid(root: Path, name: str, **kw) -> tuple:
    """`--launcher local --jobs 2` on the tiny grid, returned once both runs have logged an
    epoch and written a checkpoint: (process, experiment folder)."""
    out = root / name
    p = subprocess.Popen(grid.grid_argv(root / "data", out, "--launcher", "local", "--jobs",
                                        "2"), env=grid.env(), cwd=grid.ROOT, text=True, **kw)
    exp = out / "table1"
    runs = [exp / r / "seed0" for r in grid.ROWS]
    grid.wait_for(lambda: all(grid.epochs_logged(r) >= 1 and (r / "checkpoint.h5").exists()
                              for r in runs), "a first checkpoint of both runs", timeout=180)
    return p, exp


def _relaunch_finishes_as_in_process(root: Path, exp: Path, ref: Path) -> None:
    q = subprocess.run(grid.grid_argv(root / "data", exp.parent, "--launcher", "local",
                                      "--jobs", "2"), env=grid.env(), cwd=grid.ROOT,
                       text=True, capture_output=True, timeout=600)
    assert q.returncode == 0, q.stderr[-3000:]
    for i in (0, 1):
        log = (exp / "tasks" / f"{i}.out").read_text()
        assert "resuming final run after epoch" in log, log[-2000:]
    assert all(s == "finished" for s, _ in grid.status_table(exp).values())
    assert grid.assert_same_checkpoints(ref, exp) > 100
    assert grid.comparison_rows(exp) == grid.comparison_rows(ref)


@pytest.mark.slow
def test_cli_launcher_killed_then_relaunched_equals_in_process(tmp_path_factory):
    """kill -9 of `--launcher local --jobs 2` while both runs train: the runs die within
    seconds, status calls them stopped (resumable), and launching again finishes them with
    arrays equal to the grid trained in one process."""
    root = tmp_path_factory.getbasetemp() / "launch"
    ref = grid.reference(root)
    p, exp = _start_grid(root, "local-kill9", stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    pids = [status._read_start(exp, i)["pid"] for i in (0, 1)]
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    grid.wait_for(lambda: all(_gone(pid) for pid in pids), "the runs to die with their "
                  "launcher", timeout=10)
    for row, (state, detail) in grid.status_table(exp).items():
        assert state == "stopped" and detail.startswith("resumable: process "), (row, detail)
    _relaunch_finishes_as_in_process(root, exp, ref)


@pytest.mark.slow
def test_cli_two_ctrl_c_then_relaunched_equals_in_process(tmp_path_factory):
    """Two Ctrl-C's on `--launcher local --jobs 2`: no run is called failed (each stopped
    after its epoch or was interrupted), and launching again finishes them with arrays
    equal to the grid trained in one process."""
    root = tmp_path_factory.getbasetemp() / "launch"
    ref = grid.reference(root)
    p, exp = _start_grid(root, "local-2ctrlc", stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.send_signal(signal.SIGINT)
    first = []
    while not any("[local] stopping: each run ends its epoch" in ln for ln in first):
        first.append(p.stdout.readline())
        assert first[-1], "the launcher ended before it handled the first Ctrl-C"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    out = "".join(first) + out
    assert p.returncode == 130, err[-2000:]
    assert "FAILED" not in out and out.count("stopped (resumable: ") == 2, out
    for row, (state, detail) in grid.status_table(exp).items():
        assert state == "stopped" and detail.startswith("resumable: "), (row, detail)
    _relaunch_finishes_as_in_process(root, exp, ref)
