"""Files written before issue 33's renames (by main at commit c2c55ed, tests/fixtures/c2c55ed/
README.md) still load: a smoke run's config.json, log.jsonl and checkpoint.h5 resume and report,
and bench-speeds.json (old backend labels) gives the estimates."""
import json
import shutil
from pathlib import Path

import pytest

from crmn import checkpoint, cost, plan as plans, registry, runlog
from crmn.cli import parser
from crmn.runstate import CheckpointMeta, LogLine

OLD = Path(__file__).resolve().parent / "fixtures" / "c2c55ed"
RUN = ["smoke", "--backend", "torch", "--epochs-cap", "1", "--k", "0.125", "--no-progress"]


def test_old_log_lines_and_checkpoint_read():
    lines = [LogLine.from_dict(e) for e in runlog.read_log(OLD / "log.jsonl")]
    assert lines and all("compile_cache" in e for e in runlog.read_log(OLD / "log.jsonl"))
    assert [e.cache_outcome for e in lines] == [None] * len(lines)  # torch reports none
    arrays, meta = checkpoint.load(OLD / "checkpoint.h5")
    meta = CheckpointMeta.from_dict(meta)
    assert (meta.backend, meta.phase) == ("torch", "final") and "fc.W" in arrays


def test_an_old_run_resumes_and_reports(tmp_path, run_main):
    pytest.importorskip("torch")
    out = tmp_path / "out"
    run_dir = out / "smoke" / "tiny-crmn-n1-k0.125" / "seed0"
    run_dir.mkdir(parents=True)
    for name in ("config.json", "log.jsonl", "checkpoint.h5", "best.h5"):
        shutil.copy(OLD / name, run_dir / name)  # summary.json left out: the run is due
    rc, stdout, err = run_main(RUN + ["--resume", "--out-dir", str(out)])
    assert rc == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    old = json.loads((OLD / "summary.json").read_text())
    assert summary["test_acc"] == old["test_acc"] and summary["final_epochs"] == 3
    assert "tiny-crmn-n1-k0.125" in (out / "smoke" / "REPORT.md").read_text()
    assert json.loads((run_dir / "config.json").read_text())["backend"] == "torch"


def test_old_bench_speeds_give_the_estimate():
    speeds = cost.read_speeds(OLD / "bench-speeds.json")
    for backend, mode in (("torch", "c"), ("theano", "c")):
        options = registry.BackendOptions(backend, "cpu", theano_mode=mode)
        assert cost.key("t1-resnet32x1", options) in speeds, registry.label(options)
    plan = plans.train_plan(parser.parse(["table1", "--rows", "t1-resnet32x1", "--backend",
                                          "torch", "--device", "cpu"]))
    line = cost.estimate(plan, speeds)
    assert "days" in line and "measures" not in line, line
