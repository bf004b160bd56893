"""crmn/gpucheck.py: the one command that proves a GPU, run here on the CPU (--quick): its
budget, its files written as it goes, a run cut short by a signal, and scripts/gpu_call.sh."""
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
from crmn.errors import EXIT_INTERRUPTED, EXIT_STOPPED


def _report(out: Path):
    """gpucheck.json of ``out``, or None before the first write (the file is replaced
    atomically, so a half-written one would fail json.loads here, as it should)."""
    try:
        return json.loads((out / gpucheck.JSON_NAME).read_text())
    except FileNotFoundError:
        return None


def _statuses(report):
    return {r["check"]: r["status"] for r in report["checks"]}


@pytest.mark.slow
def test_quick_cpu_run_fits_the_default_budget_and_writes_both_files(tmp_path):
    p = run_cli(["gpucheck", "--device", "cpu", "--quick", "--out", tmp_path], timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    report = _report(tmp_path)
    assert report["failed"] == 0 and report["quick"] is True
    assert report["budget_s"] == gpucheck.DEFAULT_BUDGET
    # every check fitted: none is listed "not run: budget", and the run says it is complete
    assert report["not_run"] == 0 and all(r["status"] != gpucheck.NOT_RUN
                                          for r in report["checks"])
    assert report["running"] is None and report["cut_short"] is None
    parts = {r["part"] for r in report["checks"]}
    assert {"environment", "verify", "speed", "smoke"} <= parts
    statuses = _statuses(report)
    # every engine this environment has was trained; one without torch says so instead
    for engine in gpucheck.engines("cpu"):
        assert statuses[gpucheck.smoke_name(engine)] in ("PASS", "MISSING"), statuses
    assert statuses.get("smoke, 3 epochs, theano-jax float32") == "PASS"
    assert any("references" in c and s == "PASS" for c, s in statuses.items())
    # each check's measured seconds, ready to refine the cost table
    measured = gpucheck.measured_costs(tmp_path / gpucheck.JSON_NAME)
    assert set(measured) == {"environment"} | set(gpucheck.COSTS["quick"])
    md = (tmp_path / gpucheck.MD_NAME).read_text()
    assert md.startswith("# gpucheck") and "| smoke " in md and "Complete:" in md
    env = report["environment"]
    assert env["device"] == "cpu" and env["python"] and env["numpy"]


@pytest.mark.slow
def test_a_small_budget_lists_every_check_that_did_not_fit(tmp_path):
    p = run_cli(["gpucheck", "--device", "cpu", "--quick", "--budget", "20", "--out",
                 tmp_path], timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    report = _report(tmp_path)
    assert report["budget_s"] == 20 and report["failed"] == 0
    skipped = [r for r in report["checks"] if r["status"] == gpucheck.NOT_RUN]
    ran = [r for r in report["checks"] if r["status"] != gpucheck.NOT_RUN]
    assert skipped and report["not_run"] == len(skipped)
    # no silent gap: every check of the plan is in the file, run or listed as not run
    assert {r["key"] for r in report["checks"]} == {"environment"} | set(gpucheck.COSTS["quick"])
    assert all(r["seconds"] is None and "s left" in r["detail"] for r in skipped)
    assert all(r["seconds"] is not None for r in ran)
    md = (tmp_path / gpucheck.MD_NAME).read_text()
    assert md.count(gpucheck.NOT_RUN) == len(skipped)


def _fake_plan(monkeypatch, tmp_path, costs, budget, seen):
    """A plan of fake checks (named by ``costs``) that each record what gpucheck.json held
    on disk while they ran, so the test sees the files written as the run goes."""
    monkeypatch.setitem(gpucheck.COSTS, "quick", dict(costs, environment=0))

    def fake(recorder, key):
        def run():
            seen[key] = _report(tmp_path)
            return [gpucheck._row("speed", key, "ok", "1 s/epoch")]
        return gpucheck.Check(key, "speed", key, run)

    monkeypatch.setattr(gpucheck, "plan_checks", lambda plan, recorder, timings: [
        fake(recorder, key) for key in costs])
    return gpucheck.GpucheckPlan("cpu", True, tmp_path, budget=budget)


@pytest.mark.current
def test_a_check_that_does_not_fit_is_listed_and_later_ones_still_run(tmp_path, monkeypatch):
    seen = {}
    plan = _fake_plan(monkeypatch, tmp_path, {"a": 1, "too big": 1000, "b": 2}, 100, seen)
    assert gpucheck.run(plan) == 0
    report = _report(tmp_path)
    rows = {r["check"]: r for r in report["checks"]}
    assert rows["too big"]["status"] == gpucheck.NOT_RUN
    assert rows["too big"]["expected_s"] == 1000 and rows["too big"]["seconds"] is None
    assert rows["a"]["status"] == rows["b"]["status"] == "ok"
    assert rows["b"]["expected_s"] == 2 and rows["b"]["seconds"] >= 0
    assert set(seen) == {"a", "b"} and report["not_run"] == 1
    # written before each check: it names the check running and holds every finished one
    assert seen["a"]["running"] == "a"
    assert [r["check"] for r in seen["a"]["checks"]] == ["versions and device"]
    assert seen["b"]["running"] == "b"
    assert [r["check"] for r in seen["b"]["checks"]] == ["versions and device", "a",
                                                         "too big"]
    md = (tmp_path / gpucheck.MD_NAME).read_text()
    assert "Complete:" in md and "1 not run for the budget" in md


@pytest.mark.current
def test_the_plan_runs_in_priority_order_and_every_check_has_a_cost(tmp_path):
    for device, quick in (("cuda", False), ("cpu", False), ("cpu", True), ("cuda", True)):
        plan = gpucheck.GpucheckPlan(device, quick, tmp_path)
        keys = [c.key for c in gpucheck.plan_checks(plan, None, {})]
        assert set(keys) <= set(gpucheck.COSTS[plan.kind]), (device, quick)
        # the device's ceiling in the first seconds, then issue #22's order
        assert keys[:5] == ["ceiling", "verify torch", "verify theano-jax vs torch",
                            "verify references", "smoke jax-f32"]
        assert keys[-2:] == ["smoke torch-f32", "smoke torch-bf16"]
        speed = [k for k in keys if k.startswith("speed")]
        assert speed[:3] == ["speed t1-resnet32x1 torch-f32", "speed t1-resnet32x1 jax-f32",
                             "speed t1-resnet32x1 torch-bf16"]
        if not quick:  # the small rows first, ResNet-134's JAX compile the last speed check
            assert len(speed) == 12 and speed[-1] == "speed t1-resnet134x1 jax-f32"
            assert all("crmn32x4" not in k and "134" not in k for k in speed[:6])
    only = gpucheck.GpucheckPlan("cpu", True, tmp_path, parts=("speed",))
    assert only.parts == ("environment", "speed")
    assert {c.part for c in gpucheck.plan_checks(only, None, {})} == {"speed"}


@pytest.mark.current
def test_nothing_buildable_is_a_failure_with_one_line_per_check(tmp_path, monkeypatch):
    monkeypatch.setattr(gpucheck, "_missing", lambda options: "no such engine here")
    assert gpucheck.run(gpucheck.GpucheckPlan("cuda", True, tmp_path)) == 1
    report = _report(tmp_path)
    missing = [r for r in report["checks"] if r["status"] == "MISSING"]
    # the ceiling (measured through torch on a GPU); verify: 3 pairs; speed: 2 rows x 3; smoke: 3
    assert len(missing) == 1 + 3 + 6 + 3
    assert all(r["detail"] == "no such engine here" for r in missing)
    assert report["failed"] == 1


@pytest.mark.current
@pytest.mark.parametrize("argv, says", [
    (["--only", "speed,bogus"], "'bogus'"),
    (["--budget", "0"], "--budget"),
    (["--budget", "-5"], "--budget"),
    (["--budget", "nan"], "--budget"),
])
def test_bad_options_are_one_line_before_anything_exists(run_main, tmp_path, argv, says):
    out = tmp_path / "out"
    rc, _, err = run_main(["gpucheck", "--device", "cpu", "--out", str(out), *argv])
    assert rc == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.current
def test_help_names_the_default_budget_and_the_parts(capsys):
    from crmn.cli import parser

    with pytest.raises(SystemExit):
        parser.parse(["gpucheck", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"default: {gpucheck.DEFAULT_BUDGET:g}," in text
    assert "parts: verify, smoke, speed (environment always runs" in text
    assert gpucheck.PARTS == ("environment", "verify", "smoke", "speed")


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
    kills the whole process group, and the files written before the check still say
    where the run was."""
    p = subprocess.Popen(cli_argv("gpucheck", "--device", "cpu", "--quick", "--only",
                                  "smoke", "--out", tmp_path),
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _wait_for(lambda: (_report(tmp_path) or {}).get("running") == "smoke jax-f32")
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
    assert [r["check"] for r in report["checks"]] == ["versions and device"]
    if how == "SIGKILL to the group":
        assert p.returncode == -signal.SIGKILL
        assert report["running"] == "smoke jax-f32" and report["cut_short"] is None
        assert "**Running** `smoke jax-f32`" in md
    else:
        assert p.returncode == (EXIT_STOPPED if how == "SIGTERM" else EXIT_INTERRUPTED), err
        assert report["cut_short"]["signal"] == how
        assert report["cut_short"]["check"] == "smoke jax-f32"
        assert report["running"] is None
        assert f"**Cut short** by {how}" in md and "`smoke jax-f32`" in md
        assert f"cut short by {how} in check smoke jax-f32" in err


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
    assert p.stdout.rstrip().endswith(md.rstrip())  # the table is the last thing printed
    assert "| environment | versions and device |" in md


@pytest.mark.current
def test_gpu_call_without_the_wheels_is_one_line(tmp_path):
    env = dict(os.environ, CRMN_GPU_PYTHON=sys.executable, CRMN_WHEELS=str(tmp_path),
               CRMN_GPU_OUT=str(tmp_path / "out"))
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_call.sh")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.startswith("gpu_call: ")
    assert "theano-pymc 1.1.2" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
