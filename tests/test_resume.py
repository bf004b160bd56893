"""docs/spec.md §8: a run killed with SIGKILL mid-epoch and continued with --resume ends with
the same checkpoint as an uninterrupted run. Everything is real: the CLI, the Theano backend,
fake data in the official CIFAR-100 format, the loader, sampler, schedule and checkpoint."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from crmn import checkpoint, data, runlog

ROOT = Path(__file__).resolve().parent.parent
# A tiny ResNet (n=1, k=0.5) on 300 fake images with the fixed schedule 2,1,1. The plain
# ResNet row is used because Theano's graph compilation (about 35 s for it, 55 s with the
# LSTM, on 2 cores) dominates; the checkpoint and resume code is the same for both.
ROW = "t1-resnet32x1"
TINY = ["--rows", ROW, "--n", "1", "--k", "0.5", "--batch-size", "50", "--schedule", "2,1,1",
        "--no-progress"]


def cli(out_dir, data_dir, *extra):
    return [sys.executable, "-m", "crmn.cli", "table1", *TINY, "--out-dir", str(out_dir),
            "--data-dir", str(data_dir), *extra]


def final_arrays(out_dir):
    run = out_dir / "table1" / ROW / "seed0"
    arrays, meta = checkpoint.load(run / runlog.CHECKPOINT)
    return arrays, meta, runlog.load_run(run)


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    data.write_fake("cifar100", d, n_train=300, n_test=100, seed=0)
    return d


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, fake_data):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ref = tmp_path / "ref"
    # the uninterrupted reference runs beside the run to be killed (each compiles its graph)
    ref_proc = subprocess.Popen(cli(ref, fake_data), cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = tmp_path / "killed"
    log = killed / "table1" / ROW / "seed0" / runlog.LOG
    proc = subprocess.Popen(cli(killed, fake_data), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if log.exists() and runlog.read_log(log):
                break  # epoch 1 is logged: the kill lands in epoch 2 (or its checkpoint)
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    run_dir = log.parent
    assert not (run_dir / runlog.SUMMARY).exists()

    # without --resume the CLI refuses to overwrite the unfinished run (exit 1, one line)
    p = subprocess.run(cli(killed, fake_data), cwd=ROOT, env=env, timeout=300,
                       capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.startswith("error: ") and "--resume" in p.stderr

    subprocess.run(cli(killed, fake_data, "--resume"), cwd=ROOT, env=env, check=True,
                   timeout=300, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert ref_proc.wait(timeout=300) == 0

    a_ref, meta_ref, run_ref = final_arrays(ref)
    a_res, meta_res, run_res = final_arrays(killed)
    assert run_ref.finished and run_res.finished
    assert (meta_res["phase"], meta_res["epoch"]) == (meta_ref["phase"], meta_ref["epoch"])
    assert sorted(a_res) == sorted(a_ref)
    for name in a_ref:
        np.testing.assert_array_equal(a_res[name], a_ref[name], err_msg=name)
    assert run_res.summary["test_acc"] == run_ref.summary["test_acc"]
    # the log holds each epoch once, as the uninterrupted run's does
    key = lambda e: (e["phase"], e["epoch"], e["train_loss"], e["eval_acc"])
    assert [key(e) for e in run_res.log] == [key(e) for e in run_ref.log]
