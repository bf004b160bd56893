"""Run-directory files (crmn/runlog.py, crmn/LOGS.md): log.jsonl, atomic JSON, load_run."""
import dataclasses
import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crmn import checkpoint, runlog
from crmn.errors import CRMNError

pytestmark = pytest.mark.current  # framework-free: runs in the current environment too

ROOT = Path(__file__).resolve().parents[1]


def entry(epoch, phase="search", **kw):
    e = {"phase": phase, "epoch": epoch, "stage": 0, "lr": 0.1, "train_loss": 2.0 - epoch / 10,
         "train_acc": 0.1 * epoch, "eval_split": "val", "eval_loss": 2.1, "eval_acc": 0.3,
         "seconds": 1.5, "images_per_s": 1000.0, "decision": "continue", "time": 1.7e9}
    e.update(kw)
    return e


def test_append_and_read_back(tmp_path):
    path = tmp_path / "log.jsonl"
    assert runlog.read_log(path) == []
    for k in range(1, 4):
        runlog.append_entry(path, entry(k))
    got = runlog.read_log(path)
    assert [e["epoch"] for e in got] == [1, 2, 3]
    assert got[1] == entry(2)
    assert path.read_text().count("\n") == 3


def test_append_refuses_incomplete_or_nan_entries(tmp_path):
    path = tmp_path / "log.jsonl"
    bad = entry(1)
    del bad["eval_acc"]
    with pytest.raises(ValueError, match="eval_acc"):
        runlog.append_entry(path, bad)
    with pytest.raises(ValueError):
        runlog.append_entry(path, entry(1, train_loss=float("nan")))
    assert runlog.read_log(path) == []


@pytest.mark.parametrize("cut", [1, 10, -2, -1])
def test_reader_drops_a_truncated_last_line(tmp_path, cut):
    path = tmp_path / "log.jsonl"
    for k in range(1, 4):
        runlog.append_entry(path, entry(k))
    data = path.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    # cut the third line at several places, including just before its newline (valid JSON
    # without the newline is still treated as cut: it may end inside a number)
    path.write_bytes(data[:last_start + cut] if cut > 0 else data[:len(data) + cut])
    assert [e["epoch"] for e in runlog.read_log(path)] == [1, 2]


def test_reader_refuses_corruption_in_the_middle(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps(entry(1)) + "\n{broken\n" + json.dumps(entry(3)) + "\n")
    with pytest.raises(CRMNError, match=r"log\.jsonl: line 2"):
        runlog.read_log(path)


def test_rewrite_log_keeps_only_given_entries(tmp_path):
    path = tmp_path / "log.jsonl"
    for k in range(1, 5):
        runlog.append_entry(path, entry(k))
    runlog.rewrite_log(path, runlog.read_log(path)[:2])
    runlog.append_entry(path, entry(3, decision="stop"))
    assert [(e["epoch"], e["decision"]) for e in runlog.read_log(path)] == [
        (1, "continue"), (2, "continue"), (3, "stop")]


def test_write_json_is_atomic_under_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    runlog.write_json(path, {"status": "done", "test_acc": 0.5})
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(CRMNError, match=r"summary\.json: could not write \(No space left"):
        runlog.write_json(path, {"status": "done", "test_acc": 0.9})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert runlog.read_json(path) == {"status": "done", "test_acc": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temp left


def test_the_records_become_the_files_keys_and_back(tmp_path):
    """crmn.runstate's records turn into crmn/LOGS.md's JSON at the file boundary, and back."""
    from crmn.runstate import CapCut, CheckpointMeta, LogLine

    line = LogLine.from_dict(dict(entry(2), compile_seconds=0.0, cache_outcome=None))
    runlog.append_entry(tmp_path / "log.jsonl", dataclasses.asdict(line))
    [back] = runlog.read_log(tmp_path / "log.jsonl")
    assert set(runlog.LOG_FIELDS) <= set(back) and LogLine.from_dict(back) == line
    meta = CheckpointMeta(model={"n": 1}, train={"epochs_cap": 2}, backend="torch",
                          dtype="float64", dataset="cifar10", phase="search", epoch=3,
                          schedule={"kind": "plateau"}, sampler_seed=7, best=None)
    assert "capped" not in meta.to_dict()
    cut = dataclasses.replace(meta, capped=CapCut(2, {"kind": "plateau"}, 1.5, 0.25))
    checkpoint.save(tmp_path / "capped.h5", {"w": np.ones(2)}, cut.to_dict())
    _, raw = checkpoint.load(tmp_path / "capped.h5")
    assert raw["capped"] == {"cap": 2, "schedule_before": {"kind": "plateau"},
                             "eval_loss": 1.5, "eval_acc": 0.25}
    assert raw["phase"] == "search" and raw["schedule_found"] is None
    assert CheckpointMeta.from_dict(raw) == cut


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_get_the_mode_of_a_plain_open(tmp_path):
    with open(tmp_path / "REPORT.md", "w") as f:  # as the report and the figures are written
        f.write("plain\n")
    runlog.write_json(tmp_path / "config.json", {"row": "t1-resnet32x1"})
    runlog.write_json(tmp_path / "summary.json", {"status": "done"})
    runlog.write_json(tmp_path / "summary.json", {"status": "done"})  # replaced
    runlog.append_entry(tmp_path / "log.jsonl", entry(1))
    runlog.rewrite_log(tmp_path / "log.jsonl", [entry(1)])
    checkpoint.save(tmp_path / "checkpoint.h5", {"fc.W": np.ones(3)}, {"epoch": 1})
    for name in ("config.json", "summary.json", "log.jsonl", "checkpoint.h5"):
        assert _mode(tmp_path / name) == _mode(tmp_path / "REPORT.md"), name


# The mode follows the umask of the process, read when crmn.runlog is imported.
_WRITE_UNDER_UMASK = """
import os, sys
os.umask(0o027)
import numpy as np
from crmn import checkpoint, runlog
runlog.write_json(os.path.join(sys.argv[1], "config.json"), {})
checkpoint.save(os.path.join(sys.argv[1], "best.h5"), {"fc.W": np.ones(3)}, {})
"""


def test_atomic_files_follow_the_umask(tmp_path):
    subprocess.run([sys.executable, "-c", _WRITE_UNDER_UMASK, str(tmp_path)], check=True,
                   cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert _mode(tmp_path / "config.json") == 0o640
    assert _mode(tmp_path / "best.h5") == 0o640


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(CRMNError, match=r"config\.json: missing"):
        runlog.read_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CRMNError, match=r"config\.json: not valid JSON"):
        runlog.read_json(tmp_path / "config.json")


def test_load_run_and_find_runs(tmp_path):
    d = tmp_path / "exp" / "t1-resnet32x1" / "seed0"
    d.mkdir(parents=True)
    runlog.write_json(d / "config.json", {"row": "t1-resnet32x1", "seed": 0})
    runlog.append_entry(d / "log.jsonl", entry(1))
    runlog.append_entry(d / "log.jsonl", entry(1, phase="final", eval_split="test"))
    run = runlog.load_run(d)
    assert run.config["row"] == "t1-resnet32x1" and not run.finished
    assert len(run.phase("search")) == 1 and run.phase("final")[0]["eval_split"] == "test"
    runlog.write_json(d / "summary.json", {"status": "done"})
    assert runlog.load_run(d).finished
    assert runlog.find_runs(tmp_path) == [d]
    with pytest.raises(CRMNError, match="no such run directory"):
        runlog.load_run(tmp_path / "nope")


def test_a_lock_that_cannot_be_made_is_one_line(tmp_path, monkeypatch):
    """A read-only run folder (e.g. ``--resume`` on a read-only mount): one RunError line
    naming the folder and the cause, nothing changed."""
    from crmn.errors import RunError

    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(runlog.LOCK):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(runlog.os, "open", read_only)
    with pytest.raises(RunError) as exc:
        with runlog.hold(tmp_path):
            raise AssertionError("the block must not run")
    assert str(exc.value) == (f"{tmp_path}: cannot take the run's lock {runlog.LOCK} "
                              f"(Read-only file system); nothing here was changed")
    assert list(tmp_path.iterdir()) == []
