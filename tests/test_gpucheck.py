"""crmn/gpucheck.py: the one command that proves a GPU, run here on the CPU (--quick)."""
import json

import pytest

from conftest import run_cli
from crmn import gpucheck


@pytest.mark.slow
def test_quick_cpu_run_passes_and_writes_both_files(tmp_path):
    p = run_cli(["gpucheck", "--device", "cpu", "--quick", "--out", tmp_path], timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    report = json.loads((tmp_path / "gpucheck.json").read_text())
    assert report["failed"] == 0 and report["quick"] is True
    parts = {r["part"] for r in report["checks"]}
    assert {"verify", "speed", "training"} <= parts
    statuses = {r["check"]: r["status"] for r in report["checks"]}
    # every engine this environment has was checked; one without torch says so instead
    for label, options in gpucheck.engines("cpu"):
        trained = statuses.get(f"smoke, 3 epochs, {label}")
        assert trained == "PASS" or statuses.get(label) == "MISSING", (label, statuses)
    assert any("references" in c and s == "PASS" for c, s in statuses.items())
    md = (tmp_path / "gpucheck.md").read_text()
    assert md.startswith("# gpucheck") and "| training |" in md
    env = report["environment"]
    assert env["device"] == "cpu" and env["python"] and env["numpy"]


def test_nothing_buildable_is_a_failure_with_one_line_per_engine(tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.setattr(gpucheck, "_missing", lambda options: "no such engine here")
    assert gpucheck.run("cuda", True, tmp_path) == 1
    report = json.loads((tmp_path / "gpucheck.json").read_text())
    missing = [r for r in report["checks"] if r["status"] == "MISSING"]
    assert len(missing) == 2 + 3 + 3  # verify: torch, theano-jax; speed and training: each
    assert all(r["detail"] == "no such engine here" for r in missing)
    assert report["failed"] == 1
