"""`--runs-per-gpu K`: several runs on each GPU, on the CPU through the cuda path. A stand-in
`nvidia-smi` lists two GPUs, a stand-in `nvidia-cuda-mps-control` logs its calls and keeps a
sleeping process as its daemon; the runs are the archive's toy backend (tests/toy_backend.py)
or a stand-in that records its environment and sleeps, ends or fails."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import launch_grid as grid
from crmn.launch import manifest, status

#: one run: records what the launcher gave it in <exp>/seen/<row>.<pid>.json, then trains the
#: toy backend (toy, or toy-slow: slower steps), sleeps (slow), ends (quick) or fails (fail)
RUN = """
import json, os, sys, time
from pathlib import Path
run_dir, mode = Path(sys.argv[1]), sys.argv[2]
seen = run_dir.parents[1] / "seen"
seen.mkdir(exist_ok=True)
keys = ("CUDA_VISIBLE_DEVICES", "CUDA_MPS_PIPE_DIRECTORY", "OMP_NUM_THREADS", "CRMN_RUNS_PER_GPU")
record = {k: os.environ.get(k) for k in keys}
record.update(pid=os.getpid(), start=time.time())
path = seen / f"{run_dir.parent.name}.{os.getpid()}.json"
path.write_text(json.dumps(record))
if mode.startswith("toy"):
    import toy_backend
    # toy-slow steps slowly: still training when it is killed, however busy the machine
    toy_backend.run_toy(run_dir, resume=True, sleep_s=0.5 if mode == "toy-slow" else 0.04)
elif mode == "slow":
    time.sleep(120)
elif mode == "fail":
    sys.exit(1)
record["end"] = time.time()
path.write_text(json.dumps(record))
"""

#: the local launcher as launch.main runs it with --device cuda --runs-per-gpu 2 (no --jobs)
LAUNCHER = """
import sys
from pathlib import Path
from crmn.launch import local, manifest
from crmn.launch.manifest import Task
exp, script, modes = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
tasks = [Task(i, f"row{i}", 0, (sys.executable, script, str(exp / f"row{i}" / "seed0"), mode,
                                "--rows", f"row{i}", "--seed", "0"))
         for i, mode in enumerate(modes)]
manifest.write(exp, tasks)
sys.exit(local.run(exp, tasks, local.default_jobs("cuda", 2), "cuda", 2))
"""

NVIDIA_SMI = """#!/bin/sh
case "$1" in
  -L) echo "GPU 0: Stand-in GPU (UUID: GPU-0)"; echo "GPU 1: Stand-in GPU (UUID: GPU-1)" ;;
  --query-gpu=name) echo "Stand-in GPU"; echo "Stand-in GPU" ;;
  *) exit 9 ;;
esac
"""

#: `-d` starts a "daemon" (a sleep) and notes its PID in the pipe folder; on stdin,
#: get_server_list succeeds while it lives, quit ends it; every start and quit is logged
MPS_CONTROL = """#!/bin/sh
pidfile="$CUDA_MPS_PIPE_DIRECTORY/daemon.pid"
if [ "$1" = -d ]; then
  echo "start $CUDA_MPS_PIPE_DIRECTORY" >>"$MPS_CALLS"
  sleep 300 </dev/null >/dev/null 2>&1 &
  echo $! >"$pidfile"
  exit 0
fi
read cmd
pid=$(cat "$pidfile" 2>/dev/null)
case "$cmd" in
  get_server_list) [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null ;;
  quit) echo quit >>"$MPS_CALLS"; [ -z "$pid" ] || kill "$pid"; rm -f "$pidfile" ;;
  *) exit 2 ;;
esac
"""


def _bin(tmp_path: Path, mps: bool) -> dict:
    """The stand-ins on PATH, a private TMPDIR (the MPS folder), the environment of a launch."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    tools = {"nvidia-smi": NVIDIA_SMI, **({"nvidia-cuda-mps-control": MPS_CONTROL} if mps else {})}
    for name, text in tools.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return grid.env(PATH=f"{folder}:{os.environ['PATH']}", TMPDIR=str(tmp_path / "tmp"),
                    MPS_CALLS=str(tmp_path / "mps-calls"),
                    PYTHONPATH=f"{grid.ROOT}:{grid.ROOT / 'tests'}")


def _launch(tmp_path: Path, modes, env, **kw) -> subprocess.Popen:
    script = tmp_path / "run.py"
    script.write_text(RUN)
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path / "exp"), str(script),
                             ",".join(modes)], env=env, cwd=grid.ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _seen(exp: Path) -> dict:
    """``{row: [record, ...]}`` of every run started, in start order."""
    out = {}
    for p in sorted((exp / "seen").glob("*.json")):
        out.setdefault(p.name.split(".")[0], []).append(json.loads(p.read_text()))
    return {k: sorted(v, key=lambda r: r["start"]) for k, v in out.items()}


def _calls(tmp_path: Path) -> list:
    path = tmp_path / "mps-calls"
    return [ln.split()[0] for ln in path.read_text().splitlines()] if path.exists() else []


def test_runs_per_gpu_2_runs_four_toy_runs_two_per_gpu_a_killed_one_resumes(tmp_path):
    """Two stand-in GPUs, K = 2: four toy runs at once, two per device id, overlapping in
    time; one killed with SIGKILL leaves the others to finish; launching again resumes it."""
    env = _bin(tmp_path, mps=False)
    exp = tmp_path / "exp"
    p = _launch(tmp_path, ["toy", "toy", "toy-slow", "toy"], env)
    runs = [exp / f"row{i}" / "seed0" for i in range(4)]
    grid.wait_for(lambda: all(grid.epochs_logged(r) >= 1 for r in runs), "an epoch of all four",
                  timeout=120)
    victim = json.loads((exp / "tasks" / "2.start").read_text())["pid"]
    os.kill(victim, signal.SIGKILL)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 1, err[-2000:]  # the killed run counts as failed
    first = out.splitlines()[0]
    assert "4 at once, GPUs 0,1, 2 per GPU (no MPS (nvidia-cuda-mps-control not found)" in first
    assert "FAILED (exit 137)" in out and out.count(": done after") == 3, out
    seen = _seen(exp)
    first = [v[0] for v in seen.values()]
    assert sorted(r["CUDA_VISIBLE_DEVICES"] for r in first) == ["0", "0", "1", "1"]
    assert all(r["CRMN_RUNS_PER_GPU"] == "2" and r["OMP_NUM_THREADS"] == "1" for r in first)
    done = [r for r in first if "end" in r]
    assert len(done) == 3 and "end" not in seen["row2"][0]  # the killed one never ended
    assert max(r["start"] for r in first) < min(r["end"] for r in done)  # all four at once
    assert [(exp / "tasks" / f"{i}.rc").read_text() for i in range(4)] == ["0\n", "0\n",
                                                                        "137\n", "0\n"]
    config = json.loads((runs[0] / "config.json").read_text())
    assert config["runs_per_gpu"] == 2 and config["flags"]["OMP_NUM_THREADS"] == "1"
    # launching again: the killed run resumes from its checkpoint, the others are no-ops
    q = _launch(tmp_path, ["toy"] * 4, env)
    out, err = q.communicate(timeout=120)
    assert q.returncode == 0, err[-2000:]
    assert "resuming" in (exp / "tasks" / "2.out").read_text()
    assert [status.task_state(exp, t, None).state for t in manifest.read(exp)] == \
        ["finished"] * 4


def test_mps_daemon_started_once_seen_by_the_runs_stopped_once(tmp_path):
    """With the control program: one daemon for the launch, its pipe folder in every run's
    environment, stopped once at the end, also when a run failed."""
    env = _bin(tmp_path, mps=True)
    p = _launch(tmp_path, ["quick", "quick", "fail", "quick"], env)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1, err[-2000:]
    pipe = str(tmp_path / "tmp" / f"crmn-mps-{os.getuid()}" / "pipe")
    assert f"MPS daemon started (pipes {pipe}" in out.splitlines()[0]
    assert _calls(tmp_path) == ["start", "quit"]
    seen = _seen(tmp_path / "exp")
    assert len(seen) == 4 and all(r["CUDA_MPS_PIPE_DIRECTORY"] == pipe
                                  for v in seen.values() for r in v)


def test_mps_daemon_stopped_on_ctrl_c_a_stale_one_stopped_a_live_one_reused(tmp_path):
    """SIGINT to the launcher: the daemon is stopped once. A launcher killed with SIGKILL
    leaves its daemon: the next launch stops that one and starts its own. A daemon another
    live process started is used as it is: neither started again nor stopped."""
    env = _bin(tmp_path, mps=True)
    exp = tmp_path / "exp"
    pids = lambda: [json.loads((exp / "tasks" / f"{i}.start").read_text())["pid"]
                    for i in range(4)]
    p = _launch(tmp_path, ["slow"] * 4, env)
    grid.wait_for(lambda: all((exp / "tasks" / f"{i}.start").exists() for i in range(4)),
                  "four runs")
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-2000:]
    assert _calls(tmp_path) == ["start", "quit"]
    # SIGKILL: the runs die with the launcher, the daemon stays
    p = _launch(tmp_path, ["slow"] * 4, env)
    grid.wait_for(lambda: _calls(tmp_path) == ["start", "quit", "start"], "the second daemon")
    owner = tmp_path / "tmp" / f"crmn-mps-{os.getuid()}" / "launcher.pid"
    grid.wait_for(owner.exists, "the owner file")
    daemon = int((owner.parent / "pipe" / "daemon.pid").read_text())
    grid.wait_for(lambda: all((exp / "tasks" / f"{i}.start").exists() for i in range(4)),
                  "four runs")
    killed = p.pid
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=30)
    grid.wait_for(lambda: not any(status.pid_alive(r) for r in pids()), "the runs to die")
    assert status.pid_alive(daemon)
    q = _launch(tmp_path, ["quick"] * 4, env)
    out, err = q.communicate(timeout=60)
    assert q.returncode == 0, err[-2000:]
    assert f"stale MPS daemon of launcher {killed} (killed) stopped; MPS daemon started" in out
    assert _calls(tmp_path) == ["start", "quit", "start", "quit", "start", "quit"]
    grid.wait_for(lambda: not status.pid_alive(daemon), "the stale daemon to end", timeout=10)
    # a daemon this (live) process started: used, not doubled, not stopped
    mps_env = {**env, "CUDA_MPS_PIPE_DIRECTORY": str(owner.parent / "pipe")}
    subprocess.run(["nvidia-cuda-mps-control", "-d"], env=mps_env, check=True)
    owner.write_text(f"{os.getpid()}\n")
    try:
        q = _launch(tmp_path, ["quick"] * 4, env)
        out, err = q.communicate(timeout=60)
        assert q.returncode == 0, err[-2000:]
        assert f"MPS: using the daemon launcher {os.getpid()} runs" in out.splitlines()[0]
        assert _calls(tmp_path)[6:] == ["start"]  # by this test only
    finally:
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env=mps_env)


# ---------------------------------------------------------------------------------------
# bench-speeds.json: speeds, the kept ceiling, the measured packing


def test_speeds_file_keeps_its_numbers_beside_a_ceiling_a_packing_and_a_bad_value(tmp_path,
                                                                               monkeypatch):
    """A value that is no number (a ceiling, a packing table, a hand's mistake) is skipped
    alone; the estimate scales by the kept ceiling without timing one, and on a GPU names the
    --runs-per-gpu that gpucheck measured fastest."""
    from crmn import cost, plan as plans, roofline
    from crmn.cli import parser
    from crmn.registry import BackendOptions

    path = tmp_path / "speeds.json"
    cpu = BackendOptions("torch", "cpu")
    ceiling = {"device": "cpu", "fp32_tflops": 0.001, "bf16_tflops": None}
    cost.record([{"row": "t1-resnet32x1", "sec_per_epoch": 10.0}], [cpu], path, ceiling=ceiling)
    cost.record_packing("Stand-in GPU", {"gpu": "Stand-in GPU",
                                         "speedup": {"1": 1.0, "2": 1.8, "4": 2.5}}, path)
    data = json.loads(path.read_text())
    data["t1-crmn32x1|torch|cpu|float32"] = "fast"  # broken by hand
    path.write_text(json.dumps(data))
    assert cost.read_speeds(path) == {"t1-resnet32x1|torch|cpu|float32": 10.0}
    assert cost.read_ceiling("cpu", path)["fp32_tflops"] == 0.001
    assert cost.best_packing(cost.read_packing("Stand-in GPU", path)) == (4, 2.5)
    # a better ceiling measured later replaces the kept one, figure by figure
    cost.record([], [], path, ceiling=roofline.best_ceiling(
        cost.read_ceiling("cpu", path), {**ceiling, "fp32_tflops": 0.0005, "bf16_tflops": 0.1}))
    assert cost.read_ceiling("cpu", path) == {**ceiling, "bf16_tflops": 0.1}
    monkeypatch.setattr(cost, "speeds_path", lambda: path)
    monkeypatch.setattr(roofline, "fp32_ceiling", lambda device: pytest.fail("timed again"))
    plan = plans.train_plan(parser.parse(["table1", "--rows", "t1-crmn32x1", "--seeds", "1",
                                          "--device", "cpu", "--backend", "torch"]))
    flops = roofline.train_flops_per_image(plan.runs[0].spec.model)
    guess = flops * 50_000 / (cost.ASSUMED_SHARE * 1e9) * cost.expected_epochs(
        plan.runs[0].spec.train)
    assert f"about {cost._time(guess)} (FLOPs at 25%" in cost.estimate(plan)
    gpu = dataclasses.replace(plan, runs=tuple(dataclasses.replace(r, spec=dataclasses.replace(
        r.spec, backend_options=BackendOptions("torch", "cuda"))) for r in plan.runs))
    speeds = {cost.key("t1-crmn32x1", BackendOptions("torch", "cuda")): 36.0}
    line = cost.estimate(gpu, speeds, cost.read_packing("Stand-in GPU", path))
    total = 36.0 * cost.expected_epochs(plan.runs[0].spec.train)
    assert f"about {cost._time(total)} (bench's s/epoch" in line
    assert (f"with --runs-per-gpu 4, the fastest measured (2.50x the throughput of one run per "
            f"GPU, gpucheck on Stand-in GPU): about {cost._time(total / 2.5)} per GPU") in line
    assert "gpucheck --only packing` measures" in cost.estimate(gpu, speeds, {})


@pytest.mark.slow
def test_gpucheck_quick_packing_on_the_cpu_shows_k_1_and_2(tmp_path):
    """`gpucheck --quick --device cpu --only packing`: for each of its two rows, one and two
    processes at once, their images/s together, the speed-up over one, each one's peak memory
    and threads (the host's cores shared); nothing kept for the cost estimate (tiny networks)."""
    from conftest import run_cli
    from crmn import cost, gpucheck

    p = run_cli(["gpucheck", "--device", "cpu", "--quick", "--only", "packing", "--out",
                 tmp_path], timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    report = json.loads((tmp_path / gpucheck.JSON_NAME).read_text())
    rows = {r["check"]: r for r in report["checks"] if r["part"] == "packing"}
    assert sorted(rows) == sorted(f"packing {row} K={k}" for row in ("t1-resnet32x1",
                                                                    "t1-crmn32x1") for k in (1, 2))
    cores = len(os.sched_getaffinity(0))
    for check, r in rows.items():
        k = r["data"]["k"]
        assert r["status"] == "ok" and r["data"]["images_per_s"] > 0
        assert f"{max(1, cores // k)} threads each" in r["detail"] and "MiB each" in r["detail"]
        if k == 1:
            assert r["data"]["speedup"] == 1.0 and "1.00x K=1" in r["figure"]
    md = (tmp_path / gpucheck.MD_NAME).read_text()
    assert "packing t1-resnet32x1 K=2" in md and "packing t1-crmn32x1 K=2" in md
    assert not any(k.startswith("packing|") for k in json.loads(
        cost.speeds_path().read_text() if cost.speeds_path().exists() else "{}"))


#: what a run's log and summary hold that is a timing, not a result
TIMINGS = {"seconds", "images_per_s", "time", "compile_seconds", "sec_per_epoch"}


@pytest.mark.slow
def test_runs_packed_two_at_a_time_equal_the_same_runs_alone(tmp_path):
    """Nothing changes in a run by being packed: two tiny torch runs trained two at a time
    (`--jobs 2 --runs-per-gpu 2`) log and sum up exactly as the same runs trained alone, one
    after another, at the same thread count (one)."""
    data = grid.fake_data(tmp_path / "data")
    base = ["table1", "--rows", ",".join(grid.ROWS), "--seeds", "1", "--backend", "torch",
            "--n", "1", "--k", "0.5", "--batch-size", "50", "--schedule", "2,0,0",
            "--no-progress", "--data-dir", str(data)]
    alone = grid.cli(*base, "--out-dir", str(tmp_path / "alone"))
    packed = grid.cli(*base, "--out-dir", str(tmp_path / "packed"), "--jobs", "2",
                      "--runs-per-gpu", "2")
    assert alone.returncode == 0 and packed.returncode == 0, packed.stderr[-2000:]
    assert "manifest" not in alone.stdout and "2 at once" in packed.stdout
    for row in grid.ROWS:
        runs = [tmp_path / how / "table1" / row / "seed0" for how in ("alone", "packed")]
        logs = [[{k: v for k, v in json.loads(ln).items() if k not in TIMINGS}
                 for ln in (r / "log.jsonl").read_text().splitlines()] for r in runs]
        assert len(logs[0]) == 2 and logs[0] == logs[1], row
        sums = [{k: v for k, v in json.loads((r / "summary.json").read_text()).items()
                 if k not in TIMINGS} for r in runs]
        assert sums[0] == sums[1], row
        configs = [json.loads((r / "config.json").read_text()) for r in runs]
        assert [c["runs_per_gpu"] for c in configs] == [1, 2]
        assert [c["flags"]["OMP_NUM_THREADS"] for c in configs] == ["1", "1"]
    assert grid.assert_same_checkpoints(tmp_path / "alone" / "table1",
                                        tmp_path / "packed" / "table1") > 50


def test_a_k_whose_memory_would_not_fit_is_refused_naming_the_largest_that_does(tmp_path,
                                                                              monkeypatch):
    """gpucheck's packing on this GPU model measured a peak per process: K runs that would
    not fit 90 % of the GPU's memory are refused in one line naming the largest K that
    fits; without a packing table the note says the fit is unchecked."""
    from crmn import cost
    from crmn.errors import ConfigError
    from crmn.launch import local

    monkeypatch.setenv("PATH", _bin(tmp_path, mps=False)["PATH"])
    path = tmp_path / "speeds.json"
    monkeypatch.setattr(cost, "speeds_path", lambda: path)
    assert local.memory_fit(4) == ("their memory fit unchecked: gpucheck --only packing has "
                                   "not run on this GPU model")
    gib = 2 ** 30
    cost.record_packing("Stand-in GPU", {"gpu": "Stand-in GPU", "memory_bytes": 10 * gib,
                                         "rows": {"t1-crmn32x1": {"peak_mem_bytes": {
                                             "1": 2 * gib, "2": 2.1 * gib}}},
                                         "speedup": {"1": 1.0, "2": 1.5}}, path)
    assert local.memory_fit(4) == "4 x 2150 MiB peak fit Stand-in GPU (10 GiB)"
    with pytest.raises(ConfigError) as e:
        local.memory_fit(5)
    assert str(e.value) == ("--runs-per-gpu 5: 5 runs of 2150 MiB peak each (gpucheck's "
                            "packing on Stand-in GPU) would not fit 90 % of its 10 GiB; at "
                            "most 4 fit: use --runs-per-gpu 4")
