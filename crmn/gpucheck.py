"""The archive's GPU figures within ``--budget`` (REPRODUCING.md §5): each check is a child
process with its own time limit (``logs/``), appending a line to ``gpucheck.jsonl`` whence
``gpucheck.json`` and ``gpucheck.md``: a run cut short (SIGTERM, SIGUSR1: exit 3; SIGINT: 130)
or killed keeps what it finished. Exit 1 when a check failed (a missing backend is no failure)."""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from crmn import plan as plans, registry, runlog, tables
from crmn.errors import EXIT_INTERRUPTED, EXIT_STOPPED, ConfigError, CRMNError, UsageError
from crmn.registry import BackendOptions

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("environment", "verify", "smoke", "packing", "speed")  # --only; environment always runs
DEFAULT_BUDGET = 540.0  # seconds: one 10-minute call less the machine's start
HE_ACC = 92.49  # % test accuracy of ResNet-32 on CIFAR-10 (He et al. 2015, Table 6)
JSONL_NAME, JSON_NAME, MD_NAME = "gpucheck.jsonl", "gpucheck.json", "gpucheck.md"
NOT_RUN, NOT_FINISHED = "not run: budget", "not finished: budget"
CUT_SIGNALS = {signal.SIGTERM: EXIT_STOPPED, signal.SIGUSR1: EXIT_STOPPED,
               signal.SIGINT: EXIT_INTERRUPTED}
#: the checks in order of priority, and the seconds each needs on (cuda, cpu, --quick; None:
#: not run): it runs when that fits what is left of the budget, stops at 3 times that + 60 s
NEEDS: Dict[str, Tuple[float, float, Optional[float]]] = {
    "real t1-resnet32x1": (330, 1e6, 240), "real t1-crmn32x1": (360, 1e6, 200),
    "speed ceiling": (15, 15, 15), "verify torch": (40, 50, 30),
    "verify theano-jax vs torch": (130, 160, 50), "verify references": (50, 50, 60),
    "smoke theano-jax float32": (100, 130, 70),
    "packing t1-resnet32x1": (150, None, 25), "packing t1-crmn32x1": (150, None, 25),
    "speed t1-resnet32x1 torch float32": (20, 100, 15),
    "speed t1-resnet32x1 theano-jax float32": (60, 400, 25),
    "speed t1-resnet32x1 torch bfloat16": (50, 200, 15),
    "speed t1-crmn32x1 torch float32": (20, 130, 15),
    "speed t1-crmn32x1 theano-jax float32": (65, 450, 30),
    "speed t1-crmn32x1 torch bfloat16": (70, 250, 15),
    "speed t1-crmn32x4 torch float32": (25, 420, None),
    "speed t1-crmn32x4 theano-jax float32": (55, 1200, None),
    "speed t1-crmn32x4 torch bfloat16": (70, 800, None),
    "speed t1-resnet134x1 torch float32": (30, 330, None),
    "speed t1-resnet134x1 torch bfloat16": (110, 700, None),
    "speed t1-resnet134x1 theano-jax float32": (220, 1500, None),  # the longest compile, last
    "smoke torch float32": (40, 50, 45), "smoke torch bfloat16": (100, 70, 50),
    "speed lasagne-mnist-cnn": (240, 300, None)}
LASAGNE_CHECK = "speed lasagne-mnist-cnn"  # Lasagne's own examples/mnist.py, unmodified
#: the configurations' names in gpucheck.jsonl files written before issue 33
OLD_NAMES = {"torch-f32": "torch float32", "jax-f32": "theano-jax float32",
             "torch-bf16": "torch bfloat16"}


@dataclass(frozen=True)
class GpucheckPlan:
    """What one ``gpucheck`` runs, checked before anything is created."""

    device: str  # cpu | cuda | cuda:N
    quick: bool  # tiny networks, few steps: a check of the command itself
    out_dir: Path  # the files, logs/ and the training runs
    budget: float = DEFAULT_BUDGET  # seconds
    parts: Tuple[str, ...] = PARTS  # environment always among them, in PARTS' order
    real: Optional[Path] = None  # CIFAR-10 (a tarball or folder) for the real-data check

    def __post_init__(self):
        registry.check_device(self.device)
        unknown = ", ".join(repr(p) for p in self.parts if p not in PARTS)
        for bad, why in ((not 0 < self.budget < float("inf"), "--budget "
                          f"wants seconds > 0, got {self.budget!r}: give one, e.g. --budget 540"),
                         (unknown, f"unknown gpucheck part(s) {unknown}; choose from "
                                   f"{', '.join(PARTS)}"),
                         (self.real and not Path(self.real).exists(), f"--real {self.real}: "
                          "no such file or folder; give CIFAR-10 (images or a tarball)")):
            if bad:
                raise ConfigError(why)
        object.__setattr__(self, "real", self.real and Path(self.real).resolve())
        object.__setattr__(self, "out_dir", Path(self.out_dir).resolve())  # children: cwd ROOT
        object.__setattr__(self, "parts", tuple(p for p in PARTS
                                                if p in self.parts or p == "environment"))


def plan_from_args(args) -> GpucheckPlan:
    """The checked plan of ``args``; ``--device auto``: cuda where torch or jax sees a GPU."""
    device = args.device
    try:  # a bad value, or a GPU not here: one line, exit 2, nothing created
        if device == registry.AUTO:
            device = "cpu" if registry.no_gpu("cuda") else "cuda"
        elif missing := registry.no_gpu(device):
            raise ConfigError(f"{missing}: run it on a GPU machine (scripts/gpu_call.sh), or "
                              "check the command itself on this CPU with --device cpu --quick")
        return GpucheckPlan(device, args.quick, Path(args.out_dir), args.budget, args.only,
                            args.real)
    except ConfigError as exc:
        raise UsageError(f"run_experiments.sh gpucheck: {exc}") from None


def configurations(device: str) -> Dict[str, BackendOptions]:
    """The backend configurations gpucheck times, by name: registry.label and the dtype."""
    every = (BackendOptions("torch", device, "float32"),
             BackendOptions("theano", device, "float32", theano_mode="jax"),
             BackendOptions("torch", device, "bfloat16", compile=device != "cpu"))  # on a GPU
    return {f"{registry.label(o)} {o.dtype}": o for o in every}


def plan_checks(plan: GpucheckPlan) -> List[str]:  # after the environment, in NEEDS' order
    column, real = 2 if plan.quick else int(plan.device == "cpu"), ("real",) * bool(plan.real)
    return [k for k, need in NEEDS.items()
            if need[column] is not None and k.split()[0] in plan.parts + real]


def child_argv(plan: GpucheckPlan, key: str) -> List[str]:
    """Check ``key``'s child, the one place gpucheck spells a command line: smoke and the real
    runs (He et al.'s setting; ``--quick``: a tiny network, 1 epoch, 500 images) through the
    archive's command line, the others through :mod:`crmn.gpucheck_child`."""
    kind, _, rest = key.partition(" ")
    if kind not in ("smoke", "real"):
        own = [sys.executable, "-m", "crmn.gpucheck_child", key, plan.device, str(plan.out_dir)]
        return own + ["--quick"] * plan.quick
    if kind == "smoke":
        options = configurations(plan.device)[rest]
        run_plan = plans.smoke_plan_for(options, plan.out_dir / f"smoke-{rest.replace(' ', '-')}",
                                        epochs_cap=3, schedule=(3, 0, 0))
    else:  # real: He et al.'s setting in torch bfloat16
        name, folder, model, subset, schedule = "torch bfloat16", "real", {}, None, (82, 41, 41)
        if plan.quick:
            folder, model, subset, schedule = "real-quick", dict(n=1, k=0.5), 500, (1, 0, 0)
        if plan.quick and util.find_spec("torch") is None:  # --quick without torch: JAX mode
            name = "theano-jax float32"
        run_plan = plans.row_plan_for(rest, configurations(plan.device)[name],
                                      plan.out_dir / folder, dataset="cifar10",
                                      data_dir=plan.real, subset=subset, model=model,
                                      train=dict(flip=True, schedule=schedule))
    return plans.render_argv(run_plan, run_plan.runs[0], [sys.executable, "-m", "crmn.cli"],
                             resume=kind == "real")  # --resume: a real run cut short goes on


def row(status: str, figure: str = "", detail: str = "", **data) -> Dict:
    """One row of the table (and of a line of ``gpucheck.jsonl``)."""
    return {"status": status, "figure": figure, "detail": detail, **data}


def environment(device: str) -> Dict[str, str]:
    """Versions (nothing imported), where Theano comes from, the GPU and its driver."""
    have = {(d.metadata["Name"] or "").lower(): d.version  # the first on the path wins
            for d in reversed(list(metadata.distributions()))}
    names = ("numpy", "jax", "jaxlib", "torch", "theano-pymc")
    env = {"python": platform.python_version(), **{n: have.get(n, "missing") for n in names}}
    spec = util.find_spec("theano")
    origin = spec.origin if spec else None
    env["theano-pymc from"] = str(Path(origin).parents[1]) if origin else "missing"
    env.update(lasagne=have.get("lasagne", "missing"), device=device, host=platform.node())
    smi = subprocess.run("timeout 30 nvidia-smi --query-gpu=name,driver_version --format=csv,"
                         "noheader 2>/dev/null", shell=True, capture_output=True, text=True).stdout
    if smi:
        env.update(zip(("gpu", "driver"), [v.strip() for v in smi.split("\n")[0].split(",")]))
    return env


def read_lines(out_dir: Path, line: Optional[Dict] = None) -> List[Dict]:
    """``gpucheck.jsonl``'s lines (a last one cut by a kill dropped), after appending ``line``."""
    if line is not None:
        with open(out_dir / JSONL_NAME, "ab", buffering=0) as f:
            f.write((json.dumps(line, allow_nan=False, default=str) + "\n").encode())
            os.fsync(f.fileno())
    lines = runlog.read_log(Path(out_dir) / JSONL_NAME, events=True)
    for x in lines:  # a file of an earlier gpucheck may name the configurations otherwise
        if "key" in x:
            x["key"] = " ".join(OLD_NAMES.get(w, w) for w in x["key"].split(" "))
    return lines


def run_check(plan: GpucheckPlan, key: str, limit: float, cut: List[int]) -> List[Dict]:
    """Check ``key`` in a child process, for ``limit`` seconds at most or until a signal."""
    log, argv = plan.out_dir / "logs" / (key.replace(" ", "-") + ".log"), child_argv(plan, key)
    log.with_suffix(".json").unlink(missing_ok=True)
    with open(log, "wb") as f:
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)  # imports ours
    deadline = time.monotonic() + limit
    while p.poll() is None and not cut and time.monotonic() < deadline:
        time.sleep(0.1)
    if p.poll() is None:
        p.kill()
        p.wait()
        return [row(NOT_FINISHED, detail=f"stopped after {limit:.0f} s; log {log}")]
    tail = f"exit {p.returncode}: " + (log.read_text(errors="replace").strip().splitlines()
                                       or [""])[-1] + f" (log {log})"
    kind, _, row_id = key.partition(" ")
    runs = Path(argv[argv.index("--out-dir") + 1]) if "--out-dir" in argv else None
    if kind == "smoke":  # the training loss must fall over the three epochs
        losses = [e["train_loss"] for log in runs.glob(f"smoke/*/seed0/{runlog.LOG}")
                  for e in runlog.read_log(log) if e["phase"] == "final" and not p.returncode]
        figure = " > ".join(f"{v:.3f}" for v in losses)
        if len(losses) == 3 and losses[-1] < losses[0]:
            return [row("PASS", figure)]
        return [row("MISSING" if p.returncode == 2 else "FAIL", figure, tail)]
    if kind == "real":
        return [real_row(runs / "table1" / row_id / "seed0", p.returncode, tail)]
    try:
        return runlog.read_json(log.with_suffix(".json"))
    except CRMNError:
        return [row("FAIL", detail=tail)]


def real_row(run_dir: Path, rc: int, tail: str) -> Dict:
    """The real-data check's row from the run's summary.json, beside He et al.'s figure."""
    s = runlog.finished_summary(run_dir)
    if s is None:  # exit 2: the backend or an option is not there
        return row("MISSING" if rc == 2 else "FAIL", detail=f"{tail}; {run_dir} did not "
                    "finish: run gpucheck again to continue it")
    acc = 100 * s["test_acc"]
    return row("ok", f"{acc:.2f} % (He et al. {HE_ACC} %)", f"{s['final_epochs']} epochs, "
                f"{s['backend']} on {s['device']}; {s['data']}; run {run_dir}",
                data={"test_acc": acc, "he_acc": HE_ACC, "run_dir": str(run_dir)})


def render(out_dir: Path, seconds: float, running: Optional[str] = None) -> Dict:
    """``gpucheck.json`` and ``gpucheck.md`` from the lines of ``gpucheck.jsonl``."""
    lines = read_lines(out_dir)
    rows = [{"part": x["key"].split()[0], "check": x["key"], **r, "key": x["key"],
             "seconds": x["seconds"], "expected_s": x["expected_s"]}
            for x in lines if "rows" in x for r in x["rows"]]
    failed = sum(r["status"] == "FAIL" for r in rows)
    if len(rows) > 1 and all(r["status"] == "MISSING" for r in rows[1:]):
        failed += 1  # nothing could be built here: a failure too
    cut = next((x["cut"] for x in lines if "cut" in x), None)
    report = {**lines[0]["plan"], "environment": lines[0]["environment"], "seconds":
              round(seconds, 1), "running": running, "cut_short": cut, "checks": rows,
              "failed": failed, "not_run": sum(r["status"].endswith("budget") for r in rows)}
    took = f"{seconds:.0f} s of a {report['budget']:.0f} s budget"
    state = f"Complete: {took}; {failed} failed, {report['not_run']} not run for the budget."
    if running:
        state = (f"**Running** `{running}` ({took} so far); if this is the last word, the run "
                 "was killed there.")
    if cut:
        state = (f"**Cut short** by {cut['signal']} after {cut['after_s']:.0f} s in check "
                 f"`{cut['check'] or 'between checks'}`; the rows below finished before it.")
    table = tables.markdown(["part", "check", "status", "figure", "detail", "s", "expected s"],
                            [[r["part"], r["check"], r["status"], r["figure"], r["detail"],
                              *("" if r[k] is None else f"{r[k]:.0f}"
                                for k in ("seconds", "expected_s"))] for r in rows])
    runlog.write_json(out_dir / JSON_NAME, report)
    md = "# gpucheck\n\n" + ", ".join(f"{k} {v}" for k, v in report["environment"].items())
    runlog.write_bytes_atomic(out_dir / MD_NAME, f"{md}\n\n{state}\n\n{table}\n".encode())
    return report


def run(plan: GpucheckPlan) -> int:
    """Every check of ``plan`` that fits its budget, in order; the table printed last."""
    out, t0, running = plan.out_dir, time.monotonic(), None
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / JSONL_NAME).unlink(missing_ok=True)
    cut: List[int] = []  # the signals received, read between and during checks
    old = {s: signal.signal(s, lambda signum, _: cut.append(signum)) for s in CUT_SIGNALS}
    try:
        env = environment(plan.device)
        print("gpucheck: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
        read_lines(out, {"key": "environment", "seconds": 0, "expected_s": 0, "rows": [
            row("ok", env["python"], plan.device)], "environment": env, "plan": vars(plan)})
        for key in plan_checks(plan):
            need = NEEDS[key][2 if plan.quick else int(plan.device == "cpu")]
            left, t = plan.budget - (time.monotonic() - t0), time.monotonic()
            line = {"key": key, "seconds": None, "expected_s": need, "rows": [
                row(NOT_RUN, detail=f"needs {need:.0f} s, {max(left, 0):.0f} s left")]}
            if need <= left and not cut:
                render(out, t - t0, running := key)
                line["rows"] = run_check(plan, key, min(left, 3 * need + 60), cut)
                line["seconds"] = round(time.monotonic() - t, 1)
            if cut:  # a check stopped by the signal is not a finished one
                break
            read_lines(out, line)
            running = None
            print("\n".join(f"gpucheck: {r.get('check', key)}: {r['status']} {r['figure']} "
                            f"{r['detail']}" for r in line["rows"]), flush=True)
        if cut:
            name = signal.Signals(cut[0]).name
            read_lines(out, {"cut": {"signal": name, "check": running,
                                     "after_s": round(time.monotonic() - t0, 1)}})
            print(f"gpucheck: cut short by {name} in check {running or '-'}", file=sys.stderr)
        report = render(out, time.monotonic() - t0)
        print(f"gpucheck: {report['failed']} failed check(s), {report['not_run']} not run for "
              f"the budget; wrote {out / JSON_NAME} and {MD_NAME}\n\n" +
              (out / MD_NAME).read_text(), end="", flush=True)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return CUT_SIGNALS[cut[0]] if cut else int(report["failed"] > 0)
