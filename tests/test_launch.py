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
from crmn.cli import parser, plans
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


@pytest.mark.parametrize("argv, needle", [
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
    q = subprocess.run(grid.grid_argv(root / "data", out, "--launcher", "local", "--jobs",
                                      "2"), env=grid.env(), cwd=grid.ROOT, text=True,
                       capture_output=True, timeout=600)
    assert q.returncode == 0, q.stderr[-3000:]
    for i in (0, 1):
        log = (exp / "tasks" / f"{i}.out").read_text()
        assert "resuming final run after epoch" in log, log[-2000:]
    assert all(s == "finished" for s, _ in grid.status_table(exp).values())
    assert grid.assert_same_checkpoints(ref, exp) > 100
    assert grid.comparison_rows(exp) == grid.comparison_rows(ref)


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
