"""The compile cache: the folder rule, the entry checks, and the JAX mode's
cached step in fresh processes -- a hit, bit-identical float64 state, damaged and foreign
entries, two writers at once.

The process tests run ``tests/compile_cache_step.py`` (one SGD step of a tiny float64
CRMN) with ``$CRMN_CACHE`` at a folder of their own; they run in both environments.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crmn import compile_cache
from crmn.compile_cache import CompileCache, folder_problem, open_cache

pytestmark = pytest.mark.current  # pinned and current environments

STEP = Path(__file__).resolve().parent / "compile_cache_step.py"


# --- the folder and the entries (framework-free) ------------------------------------------

def test_default_folder_must_be_private(tmp_path):
    mine = tmp_path / "cache"
    mine.mkdir(mode=0o700)
    assert folder_problem(mine, chosen=False) is None
    mine.chmod(0o770)
    assert "writable by others" in folder_problem(mine, chosen=False)
    # chosen through $CRMN_CACHE, a group's folder is the user's choice; everyone's is not
    assert folder_problem(mine, chosen=True) is None
    mine.chmod(0o777)
    assert "every user" in folder_problem(mine, chosen=True)
    mine.chmod(0o1777)  # sticky and mine: only I can replace my entries
    assert folder_problem(mine, chosen=True) is None


def test_a_refused_folder_is_one_warning_and_no_cache(tmp_path, monkeypatch, capsys):
    shared = tmp_path / "open"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv(compile_cache.CACHE_ENV, str(shared))
    assert open_cache(True) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "every user" in err[0] and str(shared) in err[0]
    assert open_cache(False) is None  # --no-compile-cache: nothing said
    assert capsys.readouterr().err == ""


def test_open_cache_creates_a_private_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.CACHE_ENV, str(tmp_path / "new" / "cache"))
    cache = open_cache(True)
    assert cache is not None and cache.root.is_dir()


def _entry(tmp_path):
    cache = CompileCache(tmp_path)
    cache.store("k", "abc", {"layout": [1, 2]}, b"payload bytes")
    return cache, cache.path("k", "abc")


def test_an_entry_reads_back_with_its_header(tmp_path):
    cache, _ = _entry(tmp_path)
    header, payload = cache.load("k", "abc")
    assert payload == b"payload bytes" and header["layout"] == [1, 2]
    assert cache.load("k", "other") is None  # absent: a silent miss


@pytest.mark.parametrize("damage, said", [
    (lambda b: b[:-3], "truncated"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "sha256"),
    (lambda b: b"\x00garbage" + b, "no valid header"),
    (lambda b: b.replace(b'"key": "abc"', b'"key": "xyz"'), "foreign"),
    (lambda b: b"", "no valid header"),
])
def test_a_damaged_entry_is_one_warning_and_a_miss(tmp_path, capsys, damage, said):
    cache, path = _entry(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    assert cache.load("k", "abc") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0] and str(path) in err[0], err


def test_the_callers_check_makes_an_entry_foreign(tmp_path, capsys):
    cache, _ = _entry(tmp_path)
    assert cache.load("k", "abc", check=lambda h: "built by another jax (foreign)") is None
    assert "another jax" in capsys.readouterr().err


def test_a_failed_write_is_a_warning(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    CompileCache(blocker).store("k", "abc", {}, b"x")
    assert "could not write" in capsys.readouterr().err


def test_writers_of_one_entry_at_once_leave_a_whole_entry(tmp_path):
    """Eight processes replace one entry at once, each with its own big payload: the file
    left is exactly one of them (atomic rename), never a mix."""
    code = ("import sys; from crmn.compile_cache import CompileCache; "
            "k = int(sys.argv[2]); CompileCache(__import__('pathlib').Path(sys.argv[1]))"
            ".store('k', 'same', {'writer': k}, bytes([k]) * 4_000_000)")
    env = dict(os.environ, PYTHONPATH=str(STEP.parent.parent))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(k)], env=env)
             for k in range(8)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    header, payload = CompileCache(tmp_path).load("k", "same")
    assert payload == bytes([header["writer"]]) * 4_000_000
    assert [p.name for p in (tmp_path / "k").iterdir()] == ["same.entry"]  # no temp left


# --- the JAX mode's cached step, in fresh processes ------------------------------------------

def _step(cache: Path, out: Path, *flags, env=None):
    """Run the tiny step; returns (its JSON line, its stderr lines, the state)."""
    full = dict(os.environ if env is None else env, CRMN_CACHE=str(cache))
    p = subprocess.run([sys.executable, str(STEP), str(out), *flags], env=full,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    said = json.loads(p.stdout.strip().splitlines()[-1])
    warnings = [ln for ln in p.stderr.splitlines() if ln.startswith("crmn: compile cache")]
    return said, warnings, dict(np.load(out))


def _same(a, b):
    assert sorted(a) == sorted(b)
    for name in a:  # bit for bit: the same computation, not a close one
        assert a[name].dtype == b[name].dtype == np.float64, name
        assert np.array_equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uncached state after the step, and a cache folder the step has filled."""
    root = tmp_path_factory.mktemp("cc")
    said, warnings, uncached = _step(root / "unused", root / "off.npz", "--no-compile-cache")
    assert said["cache"] == "off" and not warnings
    assert not (root / "unused" / "jax").exists()  # --no-compile-cache wrote nothing
    filled = root / "filled"
    said, warnings, first = _step(filled, root / "first.npz")
    assert said["cache"] == "miss" and not warnings
    _same(first, uncached)
    return uncached, filled


def _the_entry(cache: Path) -> Path:
    entries = list((cache / "jax").glob("*.entry"))
    assert len(entries) == 1, entries  # the training step's
    return entries[0]


@pytest.mark.slow
def test_a_second_process_hits_the_cache_with_the_same_state(reference, tmp_path):
    uncached, filled = reference
    cache = tmp_path / "cache"
    shutil.copytree(filled, cache)
    said, warnings, state = _step(cache, tmp_path / "hit.npz")
    assert said["cache"] == "hit" and not warnings
    _same(state, uncached)


@pytest.mark.slow
@pytest.mark.parametrize("damage, said", [
    ("corrupt", "sha256"), ("truncated", "truncated"), ("foreign", "foreign")])
def test_a_damaged_entry_is_rebuilt_and_the_run_is_right(reference, tmp_path, damage, said):
    uncached, filled = reference
    cache = tmp_path / "cache"
    shutil.copytree(filled, cache)
    entry = _the_entry(cache)
    blob = entry.read_bytes()
    head, _, payload = blob.partition(b"\n")
    if damage == "corrupt":  # one flipped bit in the middle of the module
        middle = len(payload) // 2
        payload = payload[:middle] + bytes([payload[middle] ^ 0x10]) + payload[middle + 1:]
        blob = head + b"\n" + payload
    elif damage == "truncated":  # a writer killed before the rename cannot leave this,
        blob = blob[:len(blob) // 2]  # but a full disk or a copy can
    else:  # another version's entry under this name: its header names another key
        header = json.loads(head)
        header["key"] = "0" * 64
        blob = json.dumps(header).encode() + b"\n" + payload
    entry.write_bytes(blob)
    result, warnings, state = _step(cache, tmp_path / "again.npz")
    assert result["cache"] == "miss"
    assert len(warnings) == 1 and said in warnings[0] and entry.name in warnings[0], warnings
    _same(state, uncached)
    result, warnings, state = _step(cache, tmp_path / "after.npz")  # replaced: a hit now
    assert result["cache"] == "hit" and not warnings
    _same(state, uncached)


@pytest.mark.slow
def test_another_flag_set_does_not_reuse_the_entry(reference, tmp_path):
    """An entry is keyed by the flags that change the module: with another Theano
    optimiser setting the same network is a miss (a second entry), never the first's."""
    _, filled = reference
    cache = tmp_path / "cache"
    shutil.copytree(filled, cache)
    env = dict(os.environ)
    env["THEANO_FLAGS"] = ",".join(filter(None, [env.get("THEANO_FLAGS", ""),
                                                 "optimizer_excluding=local_add_canonizer"]))
    said, warnings, _ = _step(cache, tmp_path / "flags.npz", env=env)
    assert said["cache"] == "miss" and not warnings
    assert len(list((cache / "jax").glob("*.entry"))) == 2


@pytest.mark.slow
def test_two_processes_filling_one_entry_at_once_both_run_right(reference, tmp_path):
    uncached, _ = reference
    cache = tmp_path / "cache"
    env = dict(os.environ, CRMN_CACHE=str(cache))
    procs = [subprocess.Popen([sys.executable, str(STEP), str(tmp_path / f"{k}.npz")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for k in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        assert "crmn: compile cache" not in err  # neither saw a half-written entry
    for k in range(2):
        _same(dict(np.load(tmp_path / f"{k}.npz")), uncached)
    said, warnings, state = _step(cache, tmp_path / "third.npz")
    assert said["cache"] == "hit" and not warnings
    _same(state, uncached)
