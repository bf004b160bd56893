"""Data files never run code: a pickle that is a program is refused, not run.

A hand-supplied CIFAR folder is fake data with one file replaced by a pickle whose
``__reduce__`` creates a marker file when it is loaded by ``pickle.load``: through
``os.system`` (the global ``posix.system``) or through ``open`` (pure Python; the global
``io.open``). Each file of CIFAR-10 and CIFAR-100 is tried in turn, checked against the
official table and with ``--unverified-data``, through the library and through the real
command line. The marker must never appear and the refusal must be one line naming the file.
"""
import dataclasses
import json
import os
import pickle
import pickletools
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crmn import data
from crmn.data import formats, integrity
from crmn.errors import DataError
from data_helpers import md5

ROOT = Path(__file__).resolve().parents[1]

#: Every file of the official extracted folders.
FILES = {name: [f for f, _ in data.DATASETS[name].files] for name in ("cifar10", "cifar100")}
CASES = [(name, fname) for name in FILES for fname in FILES[name]]


class _System:
    """Loaded by ``pickle.load``: runs ``touch MARKER`` in a shell."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


class _Open:
    """Loaded by ``pickle.load``: ``open(MARKER, "w")`` creates the file, no shell needed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


PAYLOADS = {"posix.system": _System, "io.open": _Open}


@pytest.fixture(autouse=True)
def fresh_memory(monkeypatch):
    """No folder is remembered as checked from another test."""
    monkeypatch.setattr(integrity, "_checked", set())


@pytest.fixture
def closed_url(monkeypatch):
    """``$CRMN_DATA_MIRROR`` at a loopback port where nothing listens: nothing downloads."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/"
    monkeypatch.setenv(data.MIRROR_ENV, url)
    return url


def _write_hostile(path, payload):
    """A batch-shaped dict whose image array is the payload (loaded as the dict is)."""
    with open(path, "wb") as f:
        pickle.dump({b"data": payload, b"labels": [0], b"fine_labels": [0],
                     b"batch_label": b"x"}, f, protocol=2)


def _hand_supplied(tmp_path, name):
    """Fake data without its fake marker: a folder as a colleague would hand it over."""
    folder = data.write_fake(name, tmp_path / "data", 10, 5)
    (folder / data.FAKE_MARKER).unlink()
    return folder


def _official_table(name, folder):
    """The official table of ``name`` with the MD5s of the files now in ``folder``."""
    info = data.DATASETS[name]
    return dataclasses.replace(info, files=tuple((f, md5(folder / f)) for f, _ in info.files))


def test_the_payloads_do_run_under_pickle_load(tmp_path):
    """The premise: the standard loader runs both payloads (so the tests below can fail)."""
    for i, payload in enumerate(PAYLOADS.values()):
        marker = tmp_path / f"marker{i}"
        pickle.loads(pickle.dumps(payload(marker), protocol=2))
        assert marker.exists()


@pytest.mark.parametrize("global_name", sorted(PAYLOADS))
@pytest.mark.parametrize("name,fname", CASES)
def test_a_hostile_file_checked_against_the_table_is_refused_unrun(tmp_path, monkeypatch,
                                                                   closed_url, name, fname,
                                                                   global_name):
    folder = _hand_supplied(tmp_path, name)
    # every other file matches the table: the hostile one is the only file that differs
    monkeypatch.setitem(data.DATASETS, name, _official_table(name, folder))
    marker = tmp_path / "MARKER"
    _write_hostile(folder / fname, PAYLOADS[global_name](marker))
    for call in (lambda: data.provenance(name, folder.parent),
                 lambda: data.prepare(name, folder.parent, "final", 0, progress=False)):
        with pytest.raises(DataError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(str(folder / fname))
        if fname in dict(data.DATASETS[name].images):  # a data file: counted, so parsed safely
            assert msg == _refused(folder / fname, global_name)
        else:  # a label file: refused by its MD5 alone, never parsed
            assert " has MD5 " in msg
        assert not marker.exists()
    # the real table: refused as well (the first file that differs is named), nothing runs
    monkeypatch.undo()
    monkeypatch.setattr(integrity, "_checked", set())
    with pytest.raises(DataError, match=str(folder)):
        data.prepare(name, folder.parent, "final", 0, progress=False)
    assert not marker.exists()


@pytest.mark.parametrize("global_name", sorted(PAYLOADS))
@pytest.mark.parametrize("name,fname", CASES)
def test_a_hostile_file_is_refused_unrun_with_unverified_data(tmp_path, closed_url, name,
                                                              fname, global_name):
    folder = _hand_supplied(tmp_path, name)
    marker = tmp_path / "MARKER"
    _write_hostile(folder / fname, PAYLOADS[global_name](marker))
    assert data.provenance(name, folder.parent, unverified=True) == "unverified"
    for call in (lambda: data.load_raw(name, folder.parent),
                 lambda: data.prepare(name, folder.parent, "search", 0, progress=False,
                                      unverified=True)):
        with pytest.raises(DataError) as e:
            call()
        assert str(e.value) == _refused(folder / fname, global_name)
        assert not marker.exists()


# ------------------------------------------------------------------------------------------
# through the real command line

#: Runs the CLI's main() with the official table of one dataset replaced by a JSON file's.
_WITH_TABLE = """
import dataclasses, json, sys
from crmn import data
name, files = json.load(open(sys.argv[1]))
data.DATASETS[name] = dataclasses.replace(data.DATASETS[name], files=tuple(map(tuple, files)))
from crmn.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _cli(tmp_path, name, unverified, table=None):
    args = ["table1", "--rows", "t1-crmn32x1", "--dataset", name, "--data-dir",
            str(tmp_path / "data"), "--out-dir", str(tmp_path / "out"), "--n", "1", "--k",
            "0.5", "--epochs-cap", "1", "--batch-size", "4", "--no-progress"]
    if unverified:
        args.append("--unverified-data")
    if table is None:
        cmd = [sys.executable, "-m", "crmn.cli", *args]
    else:
        (tmp_path / "table.json").write_text(json.dumps([name, table.files]))
        cmd = [sys.executable, "-c", _WITH_TABLE, str(tmp_path / "table.json"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, data.MIRROR_ENV: "http://127.0.0.1:9/"})


def _refused(path, name):
    """The refusal of a pickle that names ``name``: the file, the name, the way on."""
    return (f"{path}: refuses to load: the pickle asks for {name}, which could run code; "
            "write your own batch as a dict of numpy arrays, lists and numbers, e.g. "
            "{'data': uint8 array (N, 3072), 'labels': [int, ...]}, or use the official file")


def _one_error_line(p):
    """The refusal: stderr is one line, ``error: ...`` (no traceback, no warning)."""
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    return p.stderr.rstrip("\n")


@pytest.mark.parametrize("unverified", [False, True], ids=["checked", "unverified"])
@pytest.mark.parametrize("name,fname", CASES)
def test_the_cli_refuses_a_hostile_file_in_one_line_and_runs_nothing(tmp_path, name, fname,
                                                                     unverified):
    folder = _hand_supplied(tmp_path, name)
    table = _official_table(name, folder)
    marker = tmp_path / "MARKER"
    _write_hostile(folder / fname, _System(marker))
    # checked: the table matches every other file; unverified: the real table (unused)
    p = _cli(tmp_path, name, unverified, table=None if unverified else table)
    assert p.returncode == 1, p.stderr
    line = _one_error_line(p)
    assert str(folder / fname) in line
    if unverified or fname in dict(data.DATASETS[name].images):
        assert "refuses to load: the pickle asks for posix.system" in line
    assert not marker.exists()


def test_the_cli_with_the_real_table_refuses_a_hostile_folder(tmp_path):
    """No table patched at all: the hostile ``train`` is the first file checked."""
    folder = _hand_supplied(tmp_path, "cifar100")
    marker = tmp_path / "MARKER"
    for fname in FILES["cifar100"]:
        _write_hostile(folder / fname, _Open(marker))
    p = _cli(tmp_path, "cifar100", unverified=False)
    assert p.returncode == 1
    assert _one_error_line(p) == "error: " + _refused(folder / "train", "io.open")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------
# what is still read

def test_fake_data_and_official_style_pickles_still_load(tmp_path):
    folder = data.write_fake("cifar10", tmp_path, 12, 4, seed=1)
    for fname in FILES["cifar10"]:
        assert isinstance(formats.load_data_pickle(folder / fname), dict)
    raw = data.load_raw("cifar10", tmp_path)
    assert raw["x_train"].shape == (12, 3, 32, 32) and raw["y_test"].shape == (4,)
    # the same as the standard loader reads (for these trusted files)
    with open(folder / "data_batch_2", "rb") as f:
        expected = pickle.load(f, encoding="bytes")
    got = formats.load_data_pickle(folder / "data_batch_2")
    assert got.keys() == expected.keys()
    np.testing.assert_array_equal(got[b"data"], expected[b"data"])
    assert got[b"labels"] == expected[b"labels"] and got[b"filenames"] == expected[b"filenames"]


def test_a_pickle_naming_numpy_2_modules_loads(tmp_path):
    """numpy 2 writes ``numpy._core.multiarray._reconstruct``; the reader maps it."""
    x = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    raw = pickle.dumps({b"data": x, b"labels": [3, 7]}, protocol=2)
    old = b"cnumpy.core.multiarray\n_reconstruct\n"
    new = b"cnumpy._core.multiarray\n_reconstruct\n"
    if old in raw:  # written by numpy 1.x: rename the module as numpy 2 would
        raw = raw.replace(old, new)
    assert new in raw
    assert "numpy._core.multiarray _reconstruct" in "\n".join(
        str(op[1]) for op in pickletools.genops(raw))
    (tmp_path / "batch").write_bytes(raw)
    got = formats.load_data_pickle(tmp_path / "batch")
    np.testing.assert_array_equal(got[b"data"], x)
    assert got[b"labels"] == [3, 7]


def test_only_latin1_byte_strings_are_built(tmp_path):
    """``_codecs.encode`` (protocol-2 bytes from Python 3) is allowed for latin-1 only."""
    raw = pickle.dumps({b"k": b"\xff\x00"}, protocol=2)
    assert b"c_codecs\nencode\n" in raw
    (tmp_path / "ok").write_bytes(raw)
    assert formats.load_data_pickle(tmp_path / "ok") == {b"k": b"\xff\x00"}
    (tmp_path / "other").write_bytes(raw.replace(b"latin1", b"utf_16"))
    with pytest.raises(DataError, match=f"^corrupt CIFAR batch {tmp_path / 'other'}: not a "
                                        r"complete CIFAR pickle \(_codecs.encode is allowed "
                                        "only"):
        formats.load_data_pickle(tmp_path / "other")


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("numpy", "load"),
                                         ("subprocess", "Popen"), ("copyreg", "_reconstructor")])
def test_any_other_global_is_refused_by_name_before_it_is_imported(tmp_path, module, name):
    # hand-written protocol-2 bytes: GLOBAL module name, an empty tuple, REDUCE, STOP
    raw = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."
    (tmp_path / "f").write_bytes(raw)
    with pytest.raises(DataError) as e:
        formats.load_data_pickle(tmp_path / "f")
    assert str(e.value) == _refused(tmp_path / "f", f"{module}.{name}")


class _Python2Pickler(pickle._Pickler):
    """Writes ``bytes`` and ``str`` as Python 2's ``str`` (SHORT_BINSTRING / BINSTRING), the
    layout of the official CIFAR files (cPickle, protocol 2), not as Python 3 does."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + len(raw).to_bytes(4, "little") + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def test_a_python_2_layout_pickle_loads_as_the_standard_loader_reads_it(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(3, 3072), dtype=np.uint8)
    obj = {b"batch_label": b"training batch 1 of 5", b"labels": [6, 9, 9], b"data": x,
           b"filenames": [b"a.png", b"b.png", b"c.png"]}
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        _Python2Pickler(f, protocol=2).dump(obj)
    raw = path.read_bytes()
    globals_named = {str(arg) for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"}
    assert globals_named == {"numpy.core.multiarray _reconstruct", "numpy ndarray",
                             "numpy dtype"}  # no _codecs: every string is a Python 2 str
    with open(path, "rb") as f:
        expected = pickle.load(f, encoding="bytes")
    got = formats.load_data_pickle(path)
    assert got.keys() == expected.keys() == obj.keys()
    np.testing.assert_array_equal(got[b"data"], x)
    assert got[b"data"].dtype == np.uint8
    assert got[b"filenames"] == obj[b"filenames"] and got[b"labels"] == [6, 9, 9]


def test_a_forged_stamp_skips_the_md5_check_but_not_the_restricted_reader(tmp_path,
                                                                          closed_url):
    folder = _hand_supplied(tmp_path, "cifar100")
    marker = tmp_path / "MARKER"
    _write_hostile(folder / "test", _System(marker))
    info = data.DATASETS["cifar100"]
    (folder / data.STAMP).write_text(json.dumps(
        {"dataset": "cifar100", "files": integrity._signature(folder, info)}))
    assert data.provenance("cifar100", folder.parent) == "official"  # the stamp is believed
    with pytest.raises(DataError, match=f"^{folder / 'test'}: refuses to load: the pickle "
                                        f"asks for posix.system"):
        data.prepare("cifar100", folder.parent, "final", 0, progress=False)
    assert not marker.exists()
