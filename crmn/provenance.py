"""What ran a run, recorded in its config.json beside the spec (crmn/LOGS.md): the code's
revision, the library versions, the threads, the device, the flags in force and the command
as typed. ``replay`` compares them with the machine it runs on."""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("crmn", "original", "modern")  # hashed where there is no git checkout
#: config.json's name of each library -> the distributions that provide it
DISTRIBUTIONS = {"numpy": ("numpy",), "h5py": ("h5py",), "pillow": ("Pillow",),
                 "torch": ("torch",), "theano": ("Theano-PyMC", "Theano"),
                 "lasagne": ("Lasagne",), "jax": ("jax",), "jaxlib": ("jaxlib",)}
FLAGS = ("THEANO_FLAGS", "XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def versions() -> Dict[str, str]:
    """python and every library of :data:`DISTRIBUTIONS` installed here."""
    out = {"python": platform.python_version()}
    for name, dists in DISTRIBUTIONS.items():
        for dist in dists:
            try:
                out[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()


def revision(root: Path = ROOT) -> Dict:
    """``{"commit", "dirty"}`` of the git checkout at ``root``, else its sources' sha256."""
    root = Path(root).resolve()
    try:
        if Path(_git(root, "rev-parse", "--show-toplevel")).resolve() == root:
            return {"commit": _git(root, "rev-parse", "HEAD"),
                    "dirty": bool(_git(root, "status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        pass  # no git, or not a checkout: the sources' hash says which code ran
    h = hashlib.sha256()
    for path in sorted(p for d in SOURCES for p in (root / d).rglob("*")
                       if p.is_file() and "__pycache__" not in p.parts):
        h.update(f"{path.relative_to(root).as_posix()}\0".encode() + path.read_bytes())
    return {"sources_sha256": h.hexdigest()}


def threads() -> Dict[str, int]:
    """The CPUs this process may use, and torch's intra-op threads where torch ran."""
    out = {"cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
           else os.cpu_count() or 1}
    if "torch" in sys.modules:
        out["torch"] = sys.modules["torch"].get_num_threads()
    return out


def cuda_version() -> Optional[str]:
    """The CUDA version of the framework that ran on the GPU, where it says one."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.version.cuda:
        return torch.version.cuda
    try:
        from jax.extend.backend import get_backend
        return get_backend().platform_version
    except Exception:  # noqa: BLE001 - no jax, or one without a GPU: nothing to record
        return None


def record(ran_on: str) -> Dict:
    """config.json's provenance; ``ran_on``: the device in words (crmn.backend.Backend.device)."""
    out = {"revision": revision(), "versions": versions(), "threads": threads(),
           "ran_on": ran_on, "flags": {k: os.environ.get(k) for k in FLAGS},
           "argv": list(sys.argv), "cwd": os.getcwd()}
    if "cuda" in ran_on:
        out["cuda"] = cuda_version()
    return out
