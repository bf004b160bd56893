"""The small grid the launcher tests run three ways (in-process, local --jobs 2, Slurm), and
the helpers that compare their results.

Grid: table1, rows t1-resnet32x1 and t1-crmn32x1, seed 0, a tiny network (n=1, k=0.5,
batch 50) on fake CIFAR-100-format data (500 train, 200 test images), fixed schedule 4,2,2
(8 epochs: long enough to signal a run between two epochs). Every process gets
OMP_NUM_THREADS=1: float32 sums depend on the thread count, and the launchers must be
compared at equal settings (one thread is also fastest on a shared 2-core machine).
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
ENTRY = ROOT / "run_experiments.sh"
ROWS = ("t1-resnet32x1", "t1-crmn32x1")
TINY = ["--backend", "torch", "--n", "1", "--k", "0.5", "--batch-size", "50",
        "--schedule", "4,2,2"]
EPOCHS = 8


def env(**extra) -> Dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("CUDA_VISIBLE_DEVICES", None)
    e.update(extra)
    return e


def fake_data(folder: Path) -> Path:
    """Fake CIFAR-100-format data (written once per folder)."""
    if not (folder / ".written").exists():
        from crmn import data

        data.write_fake("cifar100", folder, 500, 200, seed=0)
        (folder / ".written").write_text("")
    return folder


def grid_argv(data_dir: Path, out_dir: Path, *extra: str) -> List[str]:
    return ["bash", str(ENTRY), "table1", "--rows", ",".join(ROWS), "--seeds", "1",
            *TINY, "--no-progress", "--data-dir", str(data_dir), "--out-dir", str(out_dir),
            *extra]


def cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """``bash run_experiments.sh ARGS`` as a user runs it."""
    return subprocess.run(["bash", str(ENTRY), *args], capture_output=True, text=True,
                          env=kw.pop("env", None) or env(), timeout=timeout, cwd=ROOT, **kw)


_REFERENCE: Dict[str, Path] = {}


def reference(root: Path) -> Path:
    """The grid trained the old way (no launcher: every run in one process, one after
    another); computed once per test session. Returns ``<out>/table1``."""
    if "dir" not in _REFERENCE:
        data = fake_data(root / "data")
        out = root / "reference"
        p = subprocess.run(grid_argv(data, out), capture_output=True, text=True, env=env(),
                           timeout=600, cwd=ROOT)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "manifest" not in p.stdout  # one process: no launcher involved
        _REFERENCE["dir"] = out / "table1"
    return _REFERENCE["dir"]


def h5_arrays(path: Path) -> Dict[str, object]:
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
    return out


def assert_same_checkpoints(a: Path, b: Path) -> int:
    """Every array of every run's checkpoint.h5 is equal in the two experiment folders;
    returns how many arrays were compared."""
    import numpy as np

    n = 0
    for row in ROWS:
        ca = h5_arrays(a / row / "seed0" / "checkpoint.h5")
        cb = h5_arrays(b / row / "seed0" / "checkpoint.h5")
        assert sorted(ca) == sorted(cb), row
        for name in ca:
            assert np.array_equal(ca[name], cb[name]), f"{row}: {name} differs"
            n += 1
    return n


def comparison_rows(exp_dir: Path) -> List[List[str]]:
    """The rows of ``compare``'s table, without the seconds-per-epoch column (a timing)."""
    p = cli("compare", str(exp_dir), "--no-plots")
    assert p.returncode == 0, p.stderr[-2000:]
    header = next(ln for ln in p.stdout.splitlines() if ln.startswith("| row "))
    sec = [c.strip() for c in header.split("|")].index("s/epoch ours (device)")
    rows = []
    for line in p.stdout.splitlines():
        if line.startswith("| t1-"):
            cells = [c.strip() for c in line.split("|")]
            rows.append(cells[:sec] + cells[sec + 1:])
    return rows


def status_table(exp_dir: Path, **kw) -> Dict[str, tuple]:
    """``status DIR`` as ``{row: (state, detail)}`` (the compile column left out)."""
    p = cli("status", str(exp_dir), **kw)
    assert p.returncode == 0, p.stderr[-2000:]
    out = {}
    for line in p.stdout.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 6 and cells[1] in ROWS:
            out[cells[1]] = (cells[3], cells[4])
    assert sorted(out) == sorted(ROWS), p.stdout
    return out


def wait_for(predicate, what: str, timeout: float = 120, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def epochs_logged(run_dir: Path) -> int:
    try:
        return sum(1 for ln in (run_dir / "log.jsonl").read_text().splitlines() if ln.strip())
    except FileNotFoundError:
        return 0


def corrupt_checkpoint(exp_dir: Path, row: str) -> Path:
    """Make ``row``'s run fail at once: a checkpoint that is not HDF5 (``--resume`` then
    stops with one line, keeping the file)."""
    path = exp_dir / row / "seed0" / "checkpoint.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not an HDF5 file\n")
    return path


def last_error_line(text: str) -> Optional[str]:
    return next((ln for ln in reversed(text.splitlines()) if ln.startswith("error: ")), None)
