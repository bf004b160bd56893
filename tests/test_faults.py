"""Everyday and hostile faults through the real command line, one case per class:
each asserts the exit code, the one line on stderr, and that nothing was lost or
left behind. The deeper cases of each class live beside their code: hostile data files in
tests/test_data_hostile.py, the launchers' truth in tests/test_launch.py, the report's Δ in
tests/test_report_comparable.py.
"""
import json
import os
import pickle
import signal
import subprocess

import numpy as np
import pytest

from conftest import ROOT, cli_argv, run_cli
from crmn import checkpoint, data, runlog

pytestmark = pytest.mark.slow

NO_RUNS_FOLDER = "; give the folder the runs were written to (--out-dir, e.g. runs/table1)"
SMOKE_TORCH = ["smoke", "--backend", "torch", "--no-progress"]


def _stable(run):
    """A run's log and summary without the wall-clock fields."""
    skip = ("time", "seconds", "images_per_s", "sec_per_epoch", "compile_seconds",
            "cache_outcome")
    log = [{k: v for k, v in e.items() if k not in skip} for e in runlog.read_log(
        run / runlog.LOG)]
    summary = {k: v for k, v in runlog.read_json(run / runlog.SUMMARY).items() if k not in skip}
    return log, summary


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


# 1. data never runs code ------------------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_hostile_pickle_in_a_hand_supplied_folder_never_runs(tmp_path):
    folder = data.write_fake("cifar10", tmp_path / "mine", n_train=20, n_test=10, seed=1)
    (folder / data.FAKE_MARKER).unlink()  # it claims to be the official dataset
    marker = tmp_path / "MARKER"
    with open(folder / "data_batch_1", "wb") as f:  # the first file read
        pickle.dump(_Payload(marker), f, protocol=2)
    for extra in ([], ["--unverified-data"]):
        p = run_cli(["table3", "--rows", "t3-crmn28x10", "--backend", "torch", "--n", "1",
                     "--k", "0.5", "--schedule", "1,0,0,0", "--no-progress", "--data-dir",
                     folder, "--out-dir", tmp_path / "runs", *extra])
        assert p.returncode == 1
        line = _one_line(p.stderr)
        assert line.startswith("error: ") and "data_batch_1" in line, line
        assert not marker.exists()


# 2. a run folder is changed only under its lock -------------------------------------------

def test_two_smoke_runs_into_one_out_dir(tmp_path):
    shared = tmp_path / "shared"
    first = subprocess.Popen(cli_argv(*SMOKE_TORCH, "--out-dir", shared), cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in first.stdout:  # the first holds its run folder once it names its backend
        if "trainable parameters" in line:
            break
    first.send_signal(signal.SIGSTOP)  # paused, lock held: the second cannot outlive it
    try:
        second = run_cli([*SMOKE_TORCH, "--out-dir", shared])
    finally:
        first.send_signal(signal.SIGCONT)
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert second.returncode == 1
    line = _one_line(second.stderr)
    assert "in use by another run" in line and f"process {first.pid}" in line
    lone = run_cli([*SMOKE_TORCH, "--out-dir", tmp_path / "lone"])
    assert lone.returncode == 0, lone.stderr[-2000:]
    run = "smoke/tiny-crmn-n1-k0.5/seed0"
    assert _stable(shared / run) == _stable(tmp_path / "lone" / run)


# 3. bad values never start a run ----------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["--lr", "-1"], "argument --lr: expected a number > 0"),
    (["--rows", ""], "--rows '' selects no row"),
    (["--k", "0.3"], "argument --k: 16k must be a whole number of channels"),
    (["--forget-bias", "nan"], "argument --forget-bias: expected a finite number"),
    (["--device", "cuda", "--backend", "torch"], "--device cuda: torch"),
])
def test_bad_values_exit_2_before_anything_exists(tmp_path, argv, needle):
    out = tmp_path / "out"
    p = run_cli(["table1", *argv, "--out-dir", out, "--data-dir", tmp_path / "data"],
                timeout=120)
    if "--device" in argv and "no CUDA" not in p.stderr and p.returncode == 0:
        pytest.skip("this machine has a GPU")
    assert p.returncode == 2
    assert needle in _one_line(p.stderr)
    assert not out.exists() and not (tmp_path / "data").exists()


# 4. Ctrl-C on a single run, missing and read-only folders ---------------------------------

def test_ctrl_c_checkpoints_exits_130_and_resume_equals_an_uninterrupted_run(tmp_path):
    argv = [*SMOKE_TORCH, "--epochs-cap", "2", "--out-dir", tmp_path / "cut"]
    p = subprocess.Popen(cli_argv(*argv), cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("[search] epoch 1"):
            p.send_signal(signal.SIGINT)
            break
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-2000:]
    line = _one_line(err.replace(next((ln for ln in err.splitlines() if "fake" in ln), ""),
                                 ""))
    assert line.startswith("stopped: ") and "--resume" in line
    run = tmp_path / "cut" / "smoke" / "tiny-crmn-n1-k0.5" / "seed0"
    assert (run / runlog.CHECKPOINT).is_file() and not (run / runlog.SUMMARY).exists()
    q = run_cli(argv + ["--resume"])
    assert q.returncode == 0, q.stderr[-2000:]
    whole = run_cli([*SMOKE_TORCH, "--epochs-cap", "2", "--out-dir", tmp_path / "whole"])
    assert whole.returncode == 0
    ref = tmp_path / "whole" / "smoke" / "tiny-crmn-n1-k0.5" / "seed0"
    a, _ = checkpoint.load(run / runlog.CHECKPOINT)
    b, _ = checkpoint.load(ref / runlog.CHECKPOINT)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_status_and_compare_of_a_missing_folder_say_so(tmp_path):
    for command in ("status", "compare"):
        p = run_cli([command, tmp_path / "nowhere"], timeout=120)
        assert p.returncode == 1
        assert _one_line(p.stderr) == (f"error: {tmp_path / 'nowhere'}: no such folder"
                                       f"{NO_RUNS_FOLDER}")


# 5. the launchers' truth: a run whose lock is held is running, never failed ----------------

def test_status_of_a_held_run_is_running(tmp_path):
    from crmn.launch import manifest

    exp = tmp_path / "table1"
    line = ["bash", "run_experiments.sh", "table1", "--rows", "t1-resnet32x1", "--seed", "0"]
    manifest.write(exp, [manifest.Task(0, "t1-resnet32x1", 0, tuple(line))])
    (exp / "tasks").mkdir()
    (exp / "t1-resnet32x1" / "seed0").mkdir(parents=True)
    (exp / "tasks" / "0.rc").write_text("1\n")  # a stale failure marker
    holder = subprocess.Popen(
        [os.sys.executable, "-c", "import sys, time; from crmn import runlog\n"
         "with runlog.hold(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
         str(exp / "t1-resnet32x1" / "seed0")], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "held"
        p = run_cli(["status", exp], timeout=120)
        row = next(ln for ln in p.stdout.splitlines() if "t1-resnet32x1" in ln)
        assert "| running" in row and "fail" not in row.lower()
    finally:
        holder.kill()
        holder.wait()


# 6. smoke states itself: its own defaults, nothing given is replaced ----------------------

def test_smoke_help_and_an_explicit_patience(tmp_path):
    p = run_cli(["smoke", "--help"], timeout=120)
    text = " ".join(p.stdout.split())
    assert "plateau patience beta in epochs (default: 1)" in text
    assert "--seeds" not in text and "--rows" not in text
    q = run_cli([*SMOKE_TORCH, "--patience", "10", "--epochs-cap", "1", "--out-dir",
                 tmp_path])
    assert q.returncode == 0, q.stderr[-2000:]
    config = json.loads((tmp_path / "smoke" / "tiny-crmn-n1-k0.5" / "seed0" /
                         "config.json").read_text())
    assert config["train"]["patience"] == 10
    # 7. numbers that look comparable but are not: fake data leave the report's Δ blank
    report = (tmp_path / "smoke" / "REPORT.md").read_text()
    row = next(ln for ln in report.splitlines() if ln.startswith("| tiny-crmn"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[8] == ""  # Δ


# 5. extending and falling back: each line names the way on -------------------------------

T3 = ["table3", "--rows", "t3-crmn56x3", "--backend", "torch", "--n", "1", "--k", "0.5",
      "--batch-size", "20", "--no-progress"]


@pytest.fixture(scope="module")
def hand_made(tmp_path_factory):
    """A hand-made CIFAR-10 folder (40 images a batch, official format) and a copy whose
    second batch keeps its labels under ``label``."""
    from data_helpers import cifar10_folder, cifar_pickle, pattern

    root = tmp_path_factory.mktemp("hand-made")
    cifar10_folder(root / "good" / "cifar-10-batches-py", n_per_batch=40)
    bad = cifar10_folder(root / "badkey" / "cifar-10-batches-py", n_per_batch=40)
    cifar_pickle(bad / "data_batch_2", pattern(40, 1), np.arange(40) % 10, label_key=b"label")
    return root


@pytest.fixture(scope="module")
def uncapped_321(hand_made, tmp_path_factory):
    """One uninterrupted run of the fixed schedule 3,2,1 without a cap: its run folder."""
    out = tmp_path_factory.mktemp("uncapped")
    p = run_cli([*T3, "--unverified-data", "--data-dir", hand_made / "good", "--out-dir", out,
                 "--schedule", "3,2,1"])
    assert p.returncode == 0, p.stderr[-2000:]
    return out / "table3" / "t3-crmn56x3" / "seed0"


def _same_arrays(a_dir, b_dir):
    a, meta_a = checkpoint.load(a_dir / runlog.CHECKPOINT)
    b, meta_b = checkpoint.load(b_dir / runlog.CHECKPOINT)
    assert a.keys() == b.keys() and meta_a == meta_b
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("folder, extra, batch, says", [
    ("badkey", ["--unverified-data"], "data_batch_2",
     "has no key 'labels' (it holds 'data', 'label', 'batch_label'); replace it with the "
     "official file, or write its labels under 'labels'"),
    ("good", [], "data_batch_1",  # the MD5 refusal names the option, not a library argument
     "holds 40 images, the official file 10,000 (truncated, or another dataset); replace it "
     "with the official file, or pass --unverified-data to use the data as it is"),
])
def test_a_hand_made_folder_is_refused_with_the_way_on(tmp_path, hand_made, folder, extra,
                                                       batch, says):
    p = run_cli([*T3, *extra, "--data-dir", hand_made / folder, "--out-dir", tmp_path,
                 "--schedule", "1,1,1"])
    assert p.returncode == 1
    path = hand_made / folder / "cifar-10-batches-py" / batch
    prefix = "CIFAR batch " if folder == "badkey" else ""
    assert _one_line(p.stderr) == f"error: {prefix}{path} {says}"
    assert not (tmp_path / "table3").exists() or not any((tmp_path / "table3").rglob("*.h5"))


def test_a_truncated_checkpoint_continues_from_the_epoch_before(tmp_path, hand_made,
                                                                uncapped_321):
    argv = [*T3, "--unverified-data", "--data-dir", hand_made / "good", "--out-dir", tmp_path,
            "--schedule", "3,2,1"]
    p = subprocess.Popen(cli_argv(*argv), cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("[final] epoch 3"):
            p.send_signal(signal.SIGUSR1)  # stops after epoch 4's checkpoint at the latest
            break
    p.communicate(timeout=300)
    assert p.returncode == 3
    run = tmp_path / "table3" / "t3-crmn56x3" / "seed0"
    _, meta = checkpoint.load(run / runlog.CHECKPOINT)
    ckpt = run / runlog.CHECKPOINT
    size = ckpt.stat().st_size
    os.truncate(ckpt, size // 2)  # the disk cut it, not the archive
    q = run_cli(argv + ["--resume"])
    assert q.returncode == 0, q.stderr[-2000:]
    warning = [ln for ln in q.stderr.splitlines() if "checkpoint.prev.h5" in ln]
    assert warning == [
        f"warning: {ckpt}: truncated or corrupt checkpoint (it does not open as a complete "
        "HDF5 file); continuing from checkpoint.prev.h5, the state after final epoch "
        f"{meta['epoch'] - 1}"]
    _same_arrays(run, uncapped_321)


def test_a_run_finished_with_a_cap_continues_without_it(tmp_path, hand_made, uncapped_321):
    argv = [*T3, "--unverified-data", "--data-dir", hand_made / "good", "--out-dir", tmp_path,
            "--schedule", "3,2,1"]
    p = run_cli(argv + ["--epochs-cap", "1"])
    assert p.returncode == 0, p.stderr[-2000:]
    run = tmp_path / "table3" / "t3-crmn56x3" / "seed0"
    refused = run_cli(argv)  # without --resume: refused, and says how to go on
    assert refused.returncode == 1
    assert _one_line(refused.stderr).endswith(
        f"{run} holds a run finished with --epochs-cap 1; add --resume to continue it "
        "without a cap, or choose another --out-dir")
    q = run_cli(argv + ["--resume"])
    assert q.returncode == 0, q.stderr[-2000:]
    assert f"{run}: --epochs-cap 1 lifted: continuing the final run after " \
           "epoch 1 (where the cap first cut a stage short)" in q.stdout
    _same_arrays(run, uncapped_321)
    other = run_cli(argv + ["--resume", "--lr", "0.2"])  # any other change: still refused
    assert other.returncode == 1 and "train.lr_stages is" in _one_line(other.stderr)
