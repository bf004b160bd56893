"""crmn/gpucheck.py: the one command that proves a GPU, run here on the CPU (--quick): its
budget, its lines and files written as it goes, a run cut short by a signal, the real-data
check's command line and row, and scripts/gpu_call.sh."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, cli_argv, run_cli
from crmn import gpucheck
from crmn.errors import EXIT_INTERRUPTED, EXIT_STOPPED, UsageError


def _report(out: Path):
    """gpucheck.json of ``out``, or None before the first write (the file is replaced
    atomically, so a half-written one would fail json.loads here, as it should)."""
    try:
        return json.loads((out / gpucheck.JSON_NAME).read_text())
    except FileNotFoundError:
        return None


def _statuses(report):
    return {r["check"]: r["status"] for r in report["checks"]}


def _torch_here() -> bool:
    import importlib.util
    return importlib.util.find_spec("torch") is not None


@pytest.mark.slow
def test_quick_cpu_run_fits_the_default_budget_and_writes_its_files(tmp_path):
    p = run_cli(["gpucheck", "--device", "cpu", "--quick", "--out-dir", tmp_path], timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    report = _report(tmp_path)
    assert report["failed"] == 0 and report["quick"] is True
    assert report["budget"] == gpucheck.DEFAULT_BUDGET
    # every check fitted: none is listed "not run: budget", and the run says it is complete
    assert report["not_run"] == 0 and not [r for r in report["checks"]
                                           if r["status"].endswith("budget")]
    assert report["running"] is None and report["cut_short"] is None
    keys = {r["key"] for r in report["checks"]}
    assert keys == {"environment"} | set(gpucheck.plan_checks(
        gpucheck.GpucheckPlan("cpu", True, tmp_path)))
    statuses = _statuses(report)
    assert statuses["smoke theano-jax float32"] == "PASS"
    for key in ("smoke torch float32", "smoke torch bfloat16"):  # trained where torch is
        assert statuses[key] == ("PASS" if _torch_here() else "MISSING"), statuses
    assert any("references" in c and s == "PASS" for c, s in statuses.items())
    speed = [r for r in report["checks"] if r["key"].startswith("speed t1-")]
    assert speed and all("TFLOP/s" in r["detail"] for r in speed if r["status"] == "ok")
    # one line per finished check, and every check's output kept in logs/
    lines = gpucheck.read_lines(tmp_path)
    assert [x["key"] for x in lines] == ["environment"] + gpucheck.plan_checks(
        gpucheck.GpucheckPlan("cpu", True, tmp_path))
    assert all((tmp_path / "logs" / (x["key"].replace(" ", "-") + ".log")).exists()
               for x in lines[1:])
    md = (tmp_path / gpucheck.MD_NAME).read_text()
    assert md.startswith("# gpucheck") and "| smoke " in md and "Complete:" in md
    assert p.stdout.count("# gpucheck") == 1 and p.stdout.rstrip().endswith(md.rstrip())
    env = report["environment"]
    assert env["device"] == "cpu" and env["python"] and env["numpy"]


@pytest.mark.slow
def test_a_small_budget_lists_every_check_that_did_not_fit(tmp_path):
    p = run_cli(["gpucheck", "--device", "cpu", "--quick", "--budget", "20", "--out-dir",
                 tmp_path], timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    report = _report(tmp_path)
    assert report["budget"] == 20 and report["failed"] == 0
    skipped = [r for r in report["checks"] if r["status"] == gpucheck.NOT_RUN]
    assert skipped and report["not_run"] >= len(skipped)
    # no silent gap: every check of the plan is in the file, run or listed as not run
    assert [r["key"] for r in report["checks"]] == ["environment"] + gpucheck.plan_checks(
        gpucheck.GpucheckPlan("cpu", True, tmp_path))
    assert all(r["seconds"] is None and "s left" in r["detail"] for r in skipped)
    md = (tmp_path / gpucheck.MD_NAME).read_text()
    assert md.count(gpucheck.NOT_RUN) == len(skipped)


_FAKE_CHILD = r"""
import json, sys, time
from pathlib import Path
key, out = sys.argv[1], Path(sys.argv[2])
seen = json.loads((out / "gpucheck.json").read_text())
time.sleep(float(sys.argv[3]))
rows = [{"status": "ok", "figure": "1 s/epoch", "detail": "", "seen": seen}]
(out / "logs" / (key.replace(" ", "-") + ".json")).write_text(json.dumps(rows))
"""


def _fake_checks(monkeypatch, needs, sleep=0.0):
    """Checks named by ``needs`` whose child (a small Python script) records what
    gpucheck.json held on disk while it ran; ``sleep``: seconds each child waits."""
    monkeypatch.setattr(gpucheck, "NEEDS", {k: (n, n, n) for k, n in needs.items()})
    monkeypatch.setattr(gpucheck, "plan_checks", lambda plan: list(needs))
    monkeypatch.setattr(gpucheck, "child_argv", lambda plan, key: [
        sys.executable, "-c", _FAKE_CHILD, key, str(plan.out_dir), str(sleep)])


@pytest.mark.current
def test_a_check_that_does_not_fit_is_listed_and_later_ones_still_run(tmp_path, monkeypatch):
    _fake_checks(monkeypatch, {"speed a": 1, "speed too-big": 1000, "speed b": 2})
    assert gpucheck.run(gpucheck.GpucheckPlan("cpu", True, tmp_path, budget=100)) == 0
    report = _report(tmp_path)
    rows = {r["check"]: r for r in report["checks"]}
    assert rows["speed too-big"]["status"] == gpucheck.NOT_RUN
    assert rows["speed too-big"]["expected_s"] == 1000 and rows["speed too-big"]["seconds"] is None
    assert "needs 1000 s" in rows["speed too-big"]["detail"]
    assert rows["speed a"]["status"] == rows["speed b"]["status"] == "ok"
    assert rows["speed b"]["expected_s"] == 2 and rows["speed b"]["seconds"] >= 0
    assert report["not_run"] == 1
    # rendered before each check: it names the check running and holds every finished one
    seen_a, seen_b = rows["speed a"]["seen"], rows["speed b"]["seen"]
    assert seen_a["running"] == "speed a"
    assert [r["check"] for r in seen_a["checks"]] == ["environment"]
    assert seen_b["running"] == "speed b"
    assert [r["check"] for r in seen_b["checks"]] == ["environment", "speed a",
                                                      "speed too-big"]
    assert [x["key"] for x in gpucheck.read_lines(tmp_path)] == [
        "environment", "speed a", "speed too-big", "speed b"]
    md = (tmp_path / gpucheck.MD_NAME).read_text()
    assert "Complete:" in md and "1 not run for the budget" in md


@pytest.mark.current
def test_a_check_past_its_time_limit_is_stopped_and_the_next_runs(tmp_path, monkeypatch):
    _fake_checks(monkeypatch, {"speed slow": 1, "speed next": 1}, sleep=3.0)
    monkeypatch.setattr(gpucheck, "run_check", _limited(gpucheck.run_check, 1.0))
    gpucheck.run(gpucheck.GpucheckPlan("cpu", True, tmp_path, budget=100))
    statuses = _statuses(_report(tmp_path))
    assert statuses["speed slow"] == statuses["speed next"] == gpucheck.NOT_FINISHED


def _limited(run_check, limit):
    return lambda plan, key, _, cut: run_check(plan, key, limit, cut)


@pytest.mark.current
def test_the_checks_run_in_priority_order(tmp_path):
    for device, quick in (("cuda", False), ("cpu", False), ("cpu", True), ("cuda", True)):
        keys = gpucheck.plan_checks(gpucheck.GpucheckPlan(device, quick, tmp_path))
        assert set(keys) <= set(gpucheck.NEEDS) and len(keys) == len(set(keys))
        # Lasagne's mnist.py cnn, GPU beside CPU: not with --quick
        assert (gpucheck.LASAGNE_CHECK in keys) != quick
        keys = [k for k in keys if k != gpucheck.LASAGNE_CHECK]
        # the device's ceiling first, then verify per backend pair, the faithful graph's smoke
        assert keys[:5] == ["speed ceiling", "verify torch", "verify theano-jax vs torch",
                            "verify references", "smoke theano-jax float32"]
        assert keys[-2:] == ["smoke torch float32", "smoke torch bfloat16"]
        # the packing of runs sharing the device, on a GPU and in --quick (K = 1, 2)
        packing = ["packing t1-resnet32x1", "packing t1-crmn32x1"] * (device == "cuda" or quick)
        assert keys[5:5 + len(packing)] == packing
        speed = keys[5 + len(packing):-2]
        assert speed[:3] == ["speed t1-resnet32x1 torch float32", "speed t1-resnet32x1 theano-jax float32",
                             "speed t1-resnet32x1 torch bfloat16"]
        if quick:  # the two small rows only
            assert len(speed) == 6 and all("x1 " in k and "134" not in k for k in speed)
        else:  # the small rows first, ResNet-134's JAX compile the last speed check
            assert len(speed) == 12 and speed[-1] == "speed t1-resnet134x1 theano-jax float32"
            assert all("crmn32x4" not in k and "134" not in k for k in speed[:6])
    only = gpucheck.GpucheckPlan("cpu", True, tmp_path, parts=("speed",))
    assert only.parts == ("environment", "speed")
    assert {k.split()[0] for k in gpucheck.plan_checks(only)} == {"speed"}
    # --real puts He et al.'s ResNet-32, then CRMN-32, right after the environment
    real = gpucheck.GpucheckPlan("cuda", False, tmp_path, parts=("smoke",), real=tmp_path)
    assert gpucheck.plan_checks(real)[:3] == ["real t1-resnet32x1", "real t1-crmn32x1",
                                              "smoke theano-jax float32"]


@pytest.mark.current
def test_the_real_check_trains_he_et_al_s_setting_through_the_command_line(tmp_path):
    from crmn.cli import parser

    data = tmp_path / "cifar10-jpeg.tar.xz"
    data.write_bytes(b"")
    plan = gpucheck.GpucheckPlan("cuda", False, tmp_path / "out", real=data)
    argv = gpucheck.child_argv(plan, "real t1-resnet32x1")
    assert argv[:3] == [sys.executable, "-m", "crmn.cli"]
    args = parser.parse(argv[3:])
    assert (args.command, args.rows, args.dataset, args.data_dir) == (
        "table1", "t1-resnet32x1", "cifar10", data)
    assert args.flip and args.schedule == (82, 41, 41) and args.resume  # ~164 epochs
    assert (args.backend, args.dtype, args.compile, args.device) == (
        "torch", "bfloat16", True, "cuda")
    assert args.out_dir == tmp_path / "out" / "real" and not args.progress
    assert args.n is None and args.k is None and args.batch_size is None  # the row's: 100
    # --quick: the same path on the CPU, a tiny network, one epoch on 500 images
    quick = gpucheck.GpucheckPlan("cpu", True, tmp_path / "out", real=data)
    q = gpucheck.child_argv(quick, "real t1-crmn32x1")
    args = parser.parse(q[3:])
    assert args.subset == 500
    assert (args.rows, args.dataset, args.schedule, args.n, args.k, args.device) == (
        "t1-crmn32x1", "cifar10", (1, 0, 0), 1, 0.5, "cpu")
    assert not args.compile and args.out_dir == tmp_path / "out" / "real-quick"
    # without torch (the current environment standing in for the GPU machine's python3)
    # the quick path trains in Theano-JAX
    assert args.backend == ("torch" if _torch_here() else "theano")


def _fake_run(run_dir: Path, acc=None):
    run_dir.mkdir(parents=True)
    if acc is not None:
        (run_dir / "summary.json").write_text(json.dumps({
            "status": "done", "test_acc": acc, "final_epochs": 164, "sec_per_epoch": 1.1,
            "backend": "torch", "device": "cuda:0",
            "data": "CIFAR-10 from image folders, re-encoded"}))
    return run_dir


@pytest.mark.current
def test_the_real_row_reads_the_run_s_summary_beside_he_et_al(tmp_path):
    row = gpucheck.real_row(_fake_run(tmp_path / "a", 0.9137), 0, "exit 0")
    assert row["status"] == "ok" and row["figure"] == "91.37 % (He et al. 92.49 %)"
    assert row["data"]["test_acc"] == pytest.approx(91.37) and row["data"]["he_acc"] == 92.49
    assert "164 epochs" in row["detail"] and "re-encoded" in row["detail"]
    unfinished = gpucheck.real_row(_fake_run(tmp_path / "b"), 1, "exit 1: error: x")
    assert unfinished["status"] == "FAIL" and "exit 1: error: x" in unfinished["detail"]
    assert gpucheck.real_row(tmp_path / "c", 2, "exit 2: no torch")["status"] == "MISSING"


_FAKE_REAL = r"""
import json, sys
from pathlib import Path
run = Path(sys.argv[sys.argv.index("--out-dir") + 1]) / "table1" / sys.argv[1] / "seed0"
run.mkdir(parents=True)
(run / "summary.json").write_text(json.dumps({"status": "done", "test_acc": 0.9, "final_epochs":
    164, "sec_per_epoch": 1.0, "backend": "torch", "device": "cuda:0", "data": "CIFAR-10"}))
"""


@pytest.mark.current
def test_the_real_check_s_accuracy_is_kept_in_the_lines_and_both_files(tmp_path, monkeypatch):
    monkeypatch.setattr(gpucheck, "plan_checks", lambda plan: ["real t1-resnet32x1"])
    monkeypatch.setattr(gpucheck, "child_argv", lambda plan, key: [
        sys.executable, "-c", _FAKE_REAL, key.split()[1], "--out-dir", str(plan.out_dir)])
    assert gpucheck.run(gpucheck.GpucheckPlan("cuda", False, tmp_path, real=tmp_path)) == 0
    line = gpucheck.read_lines(tmp_path)[-1]
    assert line["key"] == "real t1-resnet32x1" and line["rows"][0]["data"]["test_acc"] == 90
    row = _report(tmp_path)["checks"][-1]
    assert row["part"] == "real" and row["figure"] == "90.00 % (He et al. 92.49 %)"
    md = (tmp_path / gpucheck.MD_NAME).read_text()
    assert "| real        | real t1-resnet32x1 | ok     | 90.00 % (He et al. 92.49 %) |" in md


@pytest.mark.current
def test_nothing_buildable_is_a_failure(tmp_path, monkeypatch):
    missing = (r"import json, sys; from pathlib import Path; (Path(sys.argv[2]) / 'logs' / "
               r"(sys.argv[1].replace(' ', '-') + '.json')).write_text(json.dumps([{'status': "
               r"'MISSING', 'figure': '', 'detail': 'no such backend here'}]))")
    monkeypatch.setattr(gpucheck, "child_argv", lambda plan, key: [
        sys.executable, "-c", missing, key, str(plan.out_dir)])
    monkeypatch.setattr(gpucheck, "plan_checks", lambda plan: ["verify torch", "speed t1-crmn32x1 theano-jax float32"])
    assert gpucheck.run(gpucheck.GpucheckPlan("cpu", True, tmp_path)) == 1
    report = _report(tmp_path)
    assert [r["status"] for r in report["checks"]] == ["ok", "MISSING", "MISSING"]
    assert report["failed"] == 1


@pytest.mark.current
@pytest.mark.parametrize("argv, says", [
    (["--only", "speed,bogus"], "'bogus'"),
    (["--budget", "0"], "--budget"),
    (["--budget", "-5"], "--budget"),
    (["--budget", "nan"], "--budget"),
    (["--real", "no/such/cifar.tar.xz"], "--real no/such/cifar.tar.xz"),
])
def test_bad_options_are_one_line_before_anything_exists(run_main, tmp_path, argv, says):
    out = tmp_path / "out"
    rc, _, err = run_main(["gpucheck", "--device", "cpu", "--out-dir", str(out), *argv])
    assert rc == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.current
def test_help_names_the_default_budget_and_the_parts(capsys):
    from crmn.cli import parser

    with pytest.raises(SystemExit):
        parser.parse(["gpucheck", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"default: {gpucheck.DEFAULT_BUDGET:g}," in text and "--real DATA" in text
    assert "parts: verify, smoke, packing, speed (environment always runs" in text
    assert gpucheck.PARTS == ("environment", "verify", "smoke", "packing", "speed")


def _children(pid: int, command: str):
    """PIDs of the live (not zombie) child processes of ``pid`` whose command line holds
    ``command`` (Theano's import starts short-lived compiler probes too)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and command.encode() in argv:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_for(predicate, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError("gave up waiting")


@pytest.mark.current
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL to the group"])
def test_a_run_cut_short_keeps_every_finished_check_and_says_where(tmp_path, how):
    """Through the real command line: the signal arrives while the smoke child trains. The
    process itself gets TERM or INT (so gpucheck must end its child); ``timeout -s KILL``
    kills the whole process group, and the files rendered before the check still say
    where the run was."""
    p = subprocess.Popen(cli_argv("gpucheck", "--device", "cpu", "--quick", "--only",
                                  "smoke", "--out-dir", tmp_path),
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _wait_for(lambda: (_report(tmp_path) or {}).get("running") == "smoke theano-jax float32")
        child = _wait_for(lambda: _children(p.pid, "smoke"))[0]
        if how == "SIGKILL to the group":
            os.killpg(p.pid, signal.SIGKILL)
        else:
            os.kill(p.pid, getattr(signal, how))
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    _wait_for(lambda: not _alive(child), timeout=30)
    report = _report(tmp_path)
    md = (tmp_path / gpucheck.MD_NAME).read_text()
    assert [r["check"] for r in report["checks"]] == ["environment"]
    keys = [x.get("key") for x in gpucheck.read_lines(tmp_path)]
    if how == "SIGKILL to the group":
        assert p.returncode == -signal.SIGKILL and keys == ["environment"]
        assert report["running"] == "smoke theano-jax float32" and report["cut_short"] is None
        assert "**Running** `smoke theano-jax float32`" in md
    else:
        assert p.returncode == (EXIT_STOPPED if how == "SIGTERM" else EXIT_INTERRUPTED), err
        assert keys == ["environment", None]  # the cut is the last line
        assert report["cut_short"]["signal"] == how
        assert report["cut_short"]["check"] == "smoke theano-jax float32"
        assert report["running"] is None
        assert f"**Cut short** by {how}" in md and "`smoke theano-jax float32`" in md
        assert f"cut short by {how} in check smoke theano-jax float32" in err
        assert out.rstrip().endswith(md.rstrip())  # the table is still printed, last


@pytest.mark.current
def test_gpu_call_installs_the_wheels_into_a_temporary_folder_and_prints_the_table(tmp_path):
    """scripts/gpu_call.sh with this interpreter standing in for the GPU machine's python3
    (in CI's current-environment part: .venv-current's): the wheels of .whl/ go into a
    fresh folder under TMPDIR, which the run imports Theano from and which is gone after."""
    wheels = ROOT / ".whl"
    if not (list(wheels.glob("theano_pymc-1.1.2-*.whl"))
            and list(wheels.glob("[Ll]asagne-0.1-*.whl"))):
        # a clean clone's pinned suite runs before CRMN_PROFILE=current builds .whl/; the
        # current part, which installs .venv-current from them, always has them
        pytest.skip(".whl/ holds no theano-pymc / Lasagne wheels yet (CRMN_PROFILE=current "
                    "bash scripts/ensure_env.sh builds them)")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "out"
    env = dict(os.environ, CRMN_GPU_PYTHON=sys.executable, CRMN_GPU_DEVICE="cpu",
               CRMN_GPU_OUT=str(out), TMPDIR=str(tmp))
    env.pop("PYTHONPATH", None)
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_call.sh"), "--quick", "--only",
                        "environment"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = _report(out)
    where = Path(report["environment"]["theano-pymc from"])
    assert where.parent == tmp and where.name.startswith("crmn-wheels.")
    assert report["environment"]["theano-pymc"] == "1.1.2"
    assert report["environment"]["lasagne"] == "0.1"
    assert not where.exists()  # removed at the end
    md = (out / gpucheck.MD_NAME).read_text()
    # the table is the last thing printed, once
    assert p.stdout.rstrip().endswith(md.rstrip()) and p.stdout.count("# gpucheck") == 1
    assert "| environment | environment |" in md


@pytest.mark.current
def test_gpu_call_without_the_wheels_is_one_line(tmp_path):
    env = dict(os.environ, CRMN_GPU_PYTHON=sys.executable, CRMN_WHEELS=str(tmp_path),
               CRMN_GPU_OUT=str(tmp_path / "out"))
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_call.sh")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.startswith("gpu_call: ")
    assert "theano-pymc 1.1.2" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
