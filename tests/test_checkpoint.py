"""The HDF5 checkpoint format (crmn/checkpoint.py): round trip, atomicity, refusals."""
import dataclasses
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from crmn import checkpoint
from crmn.config import ModelConfig, TrainConfig
from crmn.errors import CheckpointError
from crmn.naming import param_specs, velocity_name

pytestmark = pytest.mark.current  # framework-free: runs in the current environment too

ROOT = Path(__file__).resolve().parents[1]


def canonical_arrays(model, seed=0, dtype=np.float32):
    """Random arrays under every canonical name of ``model``, velocities included."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in param_specs(model):
        arrays[spec.name] = rng.standard_normal(spec.shape).astype(dtype)
        if spec.trainable:
            arrays[velocity_name(spec.name)] = rng.standard_normal(spec.shape).astype(dtype)
    return arrays


MODEL = ModelConfig(n=1, k=0.25, classes=10, memory=True, lstm_units=5)
TRAIN = TrainConfig(batch_size=8, patience=2)


def meta(model=MODEL, train=TRAIN, **kw):
    m = {"model": model.to_dict(), "train": train.to_dict(), "backend": "torch",
         "dtype": "float32", "dataset": "cifar10", "phase": "search", "epoch": 3,
         "schedule": {"kind": "plateau", "stage": 1}, "sampler_seed": 1234,
         "best": {"acc": 0.5, "loss": 1.25}}
    m.update(kw)
    return m


def test_round_trip_keeps_every_array_bit_for_bit(tmp_path):
    arrays = canonical_arrays(MODEL)
    arrays["counter"] = np.array(7, dtype=np.int64)  # a scalar: stored without checksum
    path = tmp_path / "checkpoint.h5"
    checkpoint.save(path, arrays, meta())
    got, m = checkpoint.load(path)
    assert sorted(got) == sorted(arrays)
    for name, a in arrays.items():
        assert got[name].dtype == a.dtype and got[name].shape == a.shape, name
        np.testing.assert_array_equal(got[name], a, err_msg=name)
    assert m == json.loads(json.dumps(dict(meta(), format_version=checkpoint.FORMAT_VERSION)))
    assert checkpoint.load(path)[1] == m
    assert "velocity.lstm.W_xi" in got and "velocity.bn0.mean" not in got


def test_float64_arrays_stay_float64(tmp_path):
    arrays = canonical_arrays(MODEL, dtype=np.float64)
    checkpoint.save(tmp_path / "c.h5", arrays, meta(dtype="float64"))
    got, _ = checkpoint.load(tmp_path / "c.h5")
    assert got["fc.W"].dtype == np.float64


def _failing_save_keeps_previous(tmp_path, monkeypatch, target, make_error):
    path = tmp_path / "checkpoint.h5"
    old = canonical_arrays(MODEL, seed=1)
    checkpoint.save(path, old, meta(epoch=1))
    calls = {"n": 0}
    real = getattr(*target)

    def fail_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # part of the new file is already written
            raise make_error()
        return real(*args, **kwargs)

    monkeypatch.setattr(*target, fail_midway)
    with pytest.raises(CheckpointError, match=r"checkpoint\.h5: could not write checkpoint"):
        checkpoint.save(path, canonical_arrays(MODEL, seed=2), meta(epoch=2))
    monkeypatch.undo()
    got, m = checkpoint.load(path)
    assert m["epoch"] == 1
    for name, a in old.items():
        np.testing.assert_array_equal(got[name], a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.h5"]  # temp removed


def test_full_disk_during_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _failing_save_keeps_previous(
        tmp_path, monkeypatch, (h5py.Group, "create_dataset"),
        lambda: OSError(errno.ENOSPC, "No space left on device"))


def test_hdf5_error_during_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _failing_save_keeps_previous(
        tmp_path, monkeypatch, (h5py.Group, "create_dataset"),
        lambda: RuntimeError("Can't write data (file write failed)"))


@pytest.mark.parametrize("error, reason", [
    # h5py's own errors: HDF5's error stack over several lines, errno parsed out of it
    (OSError(errno.ENOSPC, "Can't close file (file write failed: time = Mon\n, filename = "
             "'x.h5', errno = 28, error message = 'No space left on device')"),
     "No space left on device"),
    (RuntimeError("Can't decrement id ref count (file write failed:\n  time = Mon\n)"),
     "Can't decrement id ref count (file write failed: time = Mon )"),
])
def test_write_error_message_is_one_short_line(tmp_path, monkeypatch, error, reason):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(h5py.Group, "create_dataset", fail)
    with pytest.raises(CheckpointError) as info:
        checkpoint.save(tmp_path / "best.h5", {"a": np.ones(3)}, meta())
    assert str(info.value) == (f"{tmp_path / 'best.h5'}: could not write checkpoint ({reason})"
                               f"{checkpoint.WAY_ON}")
    assert "free disk space, then run the same command with --resume" in str(info.value)


def test_failing_fsync_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.h5"
    checkpoint.save(path, {"a": np.ones(3)}, meta(epoch=1))

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(CheckpointError, match="No space left on device"):
        checkpoint.save(path, {"a": np.zeros(3)}, meta(epoch=2))
    monkeypatch.undo()
    got, m = checkpoint.load(path)
    assert m["epoch"] == 1 and got["a"].tolist() == [1, 1, 1]


# Saves a 4 MB checkpoint with the file-size limit set to 64 KiB: the kernel refuses the
# write with EFBIG (SIGXFSZ ignored), a real write failure without needing a full disk.
# Errors are reported as crmn.cli.main reports them: "error: <message>", exit code 1.
_SAVE_OVER_FILE_SIZE_LIMIT = """
import resource, signal, sys
import numpy as np
from crmn import checkpoint
from crmn.errors import CRMNError

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    checkpoint.save(sys.argv[1], {"fc.W": np.ones((1024, 1024), np.float32)}, {"epoch": 2})
except CRMNError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(1)
"""


def test_real_write_failure_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.h5"
    checkpoint.save(path, {"fc.W": np.arange(6.0)}, meta(epoch=1))
    before = path.read_bytes()
    p = subprocess.run([sys.executable, "-c", _SAVE_OVER_FILE_SIZE_LIMIT, str(path)],
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])  # not -11, a segfault at exit
    assert p.stderr == (f"error: {path}: could not write checkpoint (File too large)"
                        f"{checkpoint.WAY_ON}\n")
    assert path.read_bytes() == before
    assert sorted(q.name for q in tmp_path.iterdir()) == ["checkpoint.h5"]  # temp removed


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "checkpoint.h5"
    checkpoint.save(path, canonical_arrays(MODEL), meta())
    data = path.read_bytes()
    for keep in (len(data) // 2, 100, 0):
        path.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match=r"checkpoint\.h5: truncated or corrupt"):
            checkpoint.load(path)


def test_flipped_bytes_in_an_array_are_detected(tmp_path):
    path = tmp_path / "checkpoint.h5"
    arrays = {"fc.W": np.arange(4096, dtype=np.float32).reshape(64, 64)}
    checkpoint.save(path, arrays, meta())
    data = bytearray(path.read_bytes())
    at = data.find(arrays["fc.W"].tobytes()[4000:4064])
    assert at > 0
    data[at + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        checkpoint.load(path)


def test_digest_covers_scalars_and_meta_and_older_files_still_load(tmp_path):
    """Fletcher-32 needs chunks (no scalars), and h5py rewrites it with an edit in place: the
    ``digest`` attribute catches both; a checkpoint written before it existed still loads."""
    path = tmp_path / "checkpoint.h5"
    arrays = {"fc.W": np.ones((4, 4), np.float32), "sampler.epoch": np.array(7)}
    for edit in ("scalar", "array", "meta"):
        checkpoint.save(path, arrays, meta())
        with h5py.File(path, "r+") as f:
            if edit == "meta":
                f.attrs["meta"] = f.attrs["meta"].replace('"epoch": 3', '"epoch": 2')
            else:
                name = "sampler.epoch" if edit == "scalar" else "fc.W"
                f[name][...] = f[name][()] + 1
        with pytest.raises(CheckpointError, match="do not match the digest written with them"):
            checkpoint.load(path)
        assert not checkpoint.readable(path)
    checkpoint.save(path, arrays, meta())
    with h5py.File(path, "r+") as f:
        del f.attrs["digest"]  # as a checkpoint from before the digest
    back, m = checkpoint.load(path)
    assert m["epoch"] == 3 and int(back["sampler.epoch"]) == 7
    np.testing.assert_array_equal(back["fc.W"], arrays["fc.W"])


def test_missing_file_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"best\.h5: no such checkpoint"):
        checkpoint.load(tmp_path / "best.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.ones(2)
    with pytest.raises(CheckpointError, match="not a CRMN checkpoint"):
        checkpoint.load(tmp_path / "other.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        checkpoint.load(tmp_path / "text.h5")
    with pytest.raises(CheckpointError, match="may not"):
        checkpoint.save(tmp_path / "c.h5", {"a/b": np.ones(1)}, meta())


def test_check_compatible_names_the_differing_field(tmp_path):
    m = meta(model=ModelConfig(n=1, k=4, classes=10, memory=True))
    here = ModelConfig(n=1, k=2, classes=10, memory=True)
    with pytest.raises(CheckpointError,
                       match=r"^checkpoint\.h5: model\.k is 2 here, 4 in the checkpoint$"):
        checkpoint.check_compatible(m, here)
    checkpoint.check_compatible(meta(), MODEL, TRAIN, backend="torch", dtype="float32",
                                dataset="cifar10")
    other_train = TrainConfig(batch_size=8, patience=3)
    with pytest.raises(CheckpointError, match=r"train\.patience is 3 here, 2 in the"):
        checkpoint.check_compatible(meta(), MODEL, other_train, path="run/checkpoint.h5")
    with pytest.raises(CheckpointError, match="backend is theano here, torch in the"):
        checkpoint.check_compatible(meta(), MODEL, TRAIN, backend="theano")
    with pytest.raises(CheckpointError, match="dtype is float64 here"):
        checkpoint.check_compatible(meta(), MODEL, dtype="float64")
    with pytest.raises(CheckpointError, match="no model configuration"):
        checkpoint.check_compatible({}, MODEL)


CAP_ONLY = {"train.epochs_cap"}.__contains__


def test_check_compatible_lets_the_named_fields_differ_but_not_go():
    capped = TrainConfig(batch_size=8, patience=2, epochs_cap=3)
    with pytest.raises(CheckpointError, match=r"train\.epochs_cap is 3 here, None in the"):
        checkpoint.check_compatible(meta(), MODEL, capped)
    checkpoint.check_compatible(meta(), MODEL, capped, may_change=CAP_ONLY)
    gone = meta()
    del gone["train"]["epochs_cap"]
    with pytest.raises(CheckpointError, match=r"train\.epochs_cap is 3 here, absent in the"):
        checkpoint.check_compatible(gone, MODEL, capped, may_change=CAP_ONLY)
    with pytest.raises(CheckpointError, match=r"train\.patience is 3 here, 2 in the"):
        checkpoint.check_compatible(meta(), MODEL, dataclasses.replace(capped, patience=3),
                                    may_change=CAP_ONLY)
