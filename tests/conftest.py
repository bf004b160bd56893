"""Fixtures shared by the whole suite: the one CLI runner (in-process and as a user runs it),
a closed mirror URL, and the ``slow`` marker's meaning.

Quick subset (under three minutes here): ``bash tests/run.sh -m "not slow"``; the whole
suite: ``bash tests/run.sh``. A test is marked ``slow`` when it trains or compiles real
networks for more than a few seconds (Theano compiles, whole CLI runs, the Slurm cluster).
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The compile cache (crmn.compile_cache) of the whole session, child processes included: a
# temporary folder, so that no test reads or writes the real ~/.cache/crmn. Theano's own
# module cache stays where it is (~/.theano): a $CRMN_CACHE would move it there
# (original.compat.shared_compiledir), and every C module would be compiled again.
SESSION_CACHE = tempfile.mkdtemp(prefix="crmn-test-cache-")
os.environ["CRMN_CACHE"] = SESSION_CACHE
if not any(k in os.environ.get("THEANO_FLAGS", "") for k in ("compiledir",)):
    _flags = os.environ.get("THEANO_FLAGS", "")
    _home = f"base_compiledir={os.path.expanduser('~/.theano')}"
    os.environ["THEANO_FLAGS"] = f"{_flags},{_home}" if _flags else _home


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)


@pytest.fixture
def run_main(capsys):
    """``run_main(argv) -> (exit code, stdout, stderr)`` of :func:`crmn.cli.main`, in this
    process."""
    from crmn import cli

    def run(argv):
        rc = cli.main(list(argv))
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def run_cli(argv, *, env=None, timeout=300, cwd=ROOT, **kwargs) -> subprocess.CompletedProcess:
    """``python -m crmn.cli ARGV`` as ``run_experiments.sh`` runs it, in a fresh process
    (signals, exit codes and stderr exactly as a user sees them)."""
    full_env = dict(os.environ if env is None else env, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "crmn.cli", *map(str, argv)], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def cli_argv(*argv):
    """The argument list of :func:`run_cli` for ``subprocess.Popen``."""
    return [sys.executable, "-m", "crmn.cli", *map(str, argv)]


def closed_port_url() -> str:
    """A loopback URL where nothing listens: every connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


@pytest.fixture
def closed_url():
    return closed_port_url()


@pytest.fixture
def offline(monkeypatch, closed_url):
    """``$CRMN_DATA_MIRROR`` at a closed port: no download can work."""
    from crmn import data

    monkeypatch.setenv(data.MIRROR_ENV, closed_url)
    return closed_url
