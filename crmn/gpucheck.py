"""One command that turns a machine with a GPU into the archive's GPU figures, within a
time budget, keeping every figure it measured even when it is killed.

``bash run_experiments.sh gpucheck [--device cuda|cpu] [--quick] [--budget S] [--only P,..]
[--out DIR]`` runs, on the Python it finds (a current scientific Python works:
``CRMN_PYTHON=...``; ``scripts/gpu_call.sh`` brings the theano-pymc and Lasagne wheels), a
list of individually budgeted checks in this order of priority (issue #22):

1. **environment**: Python, numpy, jax, torch, Theano-PyMC (and where it is imported from),
   Lasagne, the GPU and its driver (always run: it heads both files); then, with the speed
   part, the device's **ceiling** (:func:`crmn.roofline.measure_ceiling`: large matrix
   products per precision, a large copy), a few seconds;
2. **verify** in float64 on the device, one check per engine pair: torch on the device
   against torch on the CPU (:func:`crmn.verify.verify_device`), Theano through JAX against
   torch on the device, and Theano through JAX against the stored Theano-C references
   (:func:`crmn.verify.verify_references`);
3. **smoke** of the faithful graph (Theano-JAX float32): three epochs of ``smoke`` through
   the real command line, in a child process, on fake data; the training loss must fall;
4. **speed** (:func:`crmn.bench.bench_row`: seconds per epoch, compile seconds, the ratio to
   the paper's, achieved TFLOP/s and their share of the ceiling, peak memory) of t1-resnet32x1 and t1-crmn32x1 for torch float32, Theano-JAX float32 and
   torch bfloat16 (+ ``torch.compile`` on a GPU), then the same for t1-crmn32x4 and
   t1-resnet134x1, the Theano-JAX compile of ResNet-134 (the longest, ~200 s) last;
5. **smoke** for the torch engines.

Budget
------
Before each check its expected seconds (:data:`COSTS`, per device kind) are held against
the time left of ``--budget`` (default :data:`DEFAULT_BUDGET`, what fits one 10-minute
call); a check that does not fit is a row ``not run: budget`` (never a silent gap) and the
later, cheaper checks still get their turn. The budget plans; it does not cut a check that
runs longer than expected (the caller's own time limit does, see below).

Nothing measured is lost
------------------------
``gpucheck.json`` and ``gpucheck.md`` are replaced atomically (:func:`crmn.runlog.replace_file`)
before and after every check: before, they name the check now running (``"running"``), so
even a ``kill -9`` leaves files that say where the run stopped. SIGTERM, SIGINT (Ctrl-C)
and SIGUSR1 are caught by a watcher thread (Python's signal handlers would wait for a long
XLA compile to return; the thread wakes through :func:`signal.set_wakeup_fd`): it writes
both files with ``"cut_short": {"signal", "check", "after_s"}`` and a line saying so, ends
the smoke child process, and exits 3 (130 after SIGINT), as :mod:`crmn.errors` says a
stopped run does.

Exit code 1 if any check failed (a missing engine is reported, not a failure; a check not
run for the budget neither). The goals of issue #19 (Theano-JAX float32 within 1.5x of
torch float32; torch bfloat16 + compile at least 100x the paper's speed) are reported
beside the figures, not enforced. ``--quick`` runs the same path on tiny networks (n=1,
k=0.5) with few steps: a check of the command itself, about two minutes on a CPU.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from importlib import metadata, util
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from crmn import bench, paper, registry, roofline, runlog, tables, verify
from crmn.config import ModelConfig
from crmn.errors import EXIT_INTERRUPTED, EXIT_STOPPED, ConfigError, CRMNError
from crmn.registry import StackOptions

ROOT = Path(__file__).resolve().parent.parent
#: the parts ``--only`` chooses from, in the order they first run (environment always runs)
PARTS = ("environment", "verify", "smoke", "speed")
#: seconds of the whole run when ``--budget`` is not given: one 10-minute call less the
#: start of the machine's Python and the wheels' install (scripts/gpu_call.sh)
DEFAULT_BUDGET = 540.0
#: the rows timed (issue #19), in two groups of priority (issue #22): the two small rows,
#: then the widest CRMN and the deepest ResNet
ROW_GROUPS = (("t1-resnet32x1", "t1-crmn32x1"), ("t1-crmn32x4", "t1-resnet134x1"))
ROWS = sum(ROW_GROUPS, ())
#: --quick times the small group only
QUICK_ROWS = ROW_GROUPS[0]
#: --quick: every row as a tiny network in its own protocol
QUICK_MODEL = dict(n=1, k=0.5)
#: timed steps and warm-up steps per row and engine: (full, quick)
STEPS = {False: (60, 3), True: (2, 1)}
QUICK_BATCH = 8
#: issue #19's goals
JAX_TO_TORCH_GOAL = 1.5
BF16_SPEEDUP_GOAL = 100.0
#: files written into --out
JSON_NAME, MD_NAME = "gpucheck.json", "gpucheck.md"
#: statuses of a row that is not a measurement
NOT_RUN = "not run: budget"
#: signals that cut a run short, and the exit code each gives (crmn/errors.py)
CUT_SIGNALS = {signal.SIGTERM: EXIT_STOPPED, signal.SIGUSR1: EXIT_STOPPED,
               signal.SIGINT: EXIT_INTERRUPTED}
#: seconds a smoke child has to end after SIGTERM before it is killed
CHILD_GRACE_S = 5.0

#: device kinds of :data:`COSTS`, in the order of :data:`COST_TABLE`'s columns
KINDS = ("cuda", "cpu", "quick")
#: Expected seconds of each check (:func:`plan_checks`' keys) per device kind: ``cuda``,
#: ``cpu`` (the full check on a CPU), ``quick`` (``--quick`` on any device; it times the
#: two small rows only).
#:
#: ``cuda`` starts from the CPU figures of issue #22 (XLA compiles on the host: ResNet-134x1
#: 196 s in JAX mode, CRMN-32x4 33 s, CRMN n=1 k=1 42-48 s; REPRODUCING §5), torch.compile's
#: 20-90 s per process on an H100 and the H100 epochs of REPRODUCING §5 for 60 steps.
#: ``cpu`` is rough (per-image rates of REPRODUCING §5 on 2 cores, 63 steps), ``quick`` was
#: measured on the archive's 2-core machine, shared with other work (``gpucheck --device
#: cpu --quick``: 167 s in all, each check's seconds about 3/4 of its entry here).
#:
#: To refine the table from a run: every row of ``gpucheck.json`` carries its check's
#: ``key``, ``expected_s`` and measured ``seconds``; :func:`measured_costs` reads them back
#: (``python -c "from crmn import gpucheck; print(gpucheck.measured_costs('gpucheck.json'))"``)
#: and its numbers, rounded up by a margin of ~20 %, replace that device kind's column here.
#:
#: check key: expected seconds (cuda, cpu, quick); None where that kind has no such check
COST_TABLE: Dict[str, Tuple[Optional[float], ...]] = {
    "environment": (2, 2, 1),
    "ceiling": (6, 6, 4),
    "verify torch": (30, 40, 8),
    "verify theano-jax vs torch": (120, 150, 16),
    "verify references": (40, 40, 45),
    "smoke jax-f32": (90, 120, 40),
    "speed t1-resnet32x1 torch-f32": (15, 90, 1),
    "speed t1-resnet32x1 jax-f32": (50, 400, 8),
    "speed t1-resnet32x1 torch-bf16": (45, 200, 1),
    "speed t1-crmn32x1 torch-f32": (15, 120, 1),
    "speed t1-crmn32x1 jax-f32": (55, 450, 11),
    "speed t1-crmn32x1 torch-bf16": (60, 250, 1),
    "speed t1-crmn32x4 torch-f32": (20, 420, None),
    "speed t1-crmn32x4 jax-f32": (45, 1200, None),
    "speed t1-crmn32x4 torch-bf16": (60, 800, None),
    "speed t1-resnet134x1 torch-f32": (25, 330, None),
    "speed t1-resnet134x1 torch-bf16": (100, 700, None),
    "speed t1-resnet134x1 jax-f32": (210, 1500, None),
    "smoke torch-f32": (30, 40, 32),
    "smoke torch-bf16": (90, 60, 35),
}
#: expected seconds per device kind and check key (:data:`COST_TABLE` by column)
COSTS: Dict[str, Dict[str, float]] = {
    kind: {key: costs[i] for key, costs in COST_TABLE.items() if costs[i] is not None}
    for i, kind in enumerate(KINDS)}


@dataclasses.dataclass(frozen=True)
class GpucheckPlan:
    """What one ``gpucheck`` runs: checked once by :func:`crmn.cli.plans.gpucheck_plan`.

    ``budget``: seconds the checks may take in all; ``parts``: the :data:`PARTS` chosen
    (``--only``), environment always among them.
    """

    device: str  # cpu | cuda | cuda:N
    quick: bool  # tiny networks, few steps
    out_dir: Path  # gpucheck.json, gpucheck.md and the smoke runs
    budget: float = DEFAULT_BUDGET  # seconds
    parts: Tuple[str, ...] = PARTS  # a subset of PARTS, in PARTS' order

    def __post_init__(self):
        registry.check_device(self.device)
        if not (math.isfinite(self.budget) and self.budget > 0):
            raise ConfigError(f"--budget wants a number of seconds > 0, got {self.budget!r}: "
                              f"give one, e.g. --budget {DEFAULT_BUDGET:.0f}")
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown:
            raise ConfigError(f"unknown gpucheck part(s) {', '.join(map(repr, unknown))}; "
                              f"choose from {', '.join(PARTS)}")
        object.__setattr__(self, "parts", tuple(p for p in PARTS
                                                if p in self.parts or p == "environment"))

    @property
    def kind(self) -> str:
        """The device kind of :data:`COSTS`."""
        return "quick" if self.quick else ("cuda" if self.device.startswith("cuda") else "cpu")


@dataclasses.dataclass(frozen=True)
class Engine:
    """A stack setting timed and trained: ``id`` keys :data:`COSTS`, ``label`` is shown."""

    id: str
    label: str
    options: StackOptions


def engines(device: str) -> Tuple[Engine, ...]:
    """The engines timed and trained, in the order each row times them (torch float32,
    Theano-JAX float32, torch bfloat16); ``torch.compile`` only on a GPU (on a CPU it would
    time the C++ compiler, not the network)."""
    on_gpu = device.startswith("cuda")
    return (Engine("torch-f32", "torch float32", StackOptions("torch", device, "float32")),
            Engine("jax-f32", "theano-jax float32",
                   StackOptions("theano", device, "float32", theano_mode="jax")),
            Engine("torch-bf16", "torch bfloat16" + (" + compile" if on_gpu else ""),
                   StackOptions("torch", device, "bfloat16", compile=on_gpu)))


def _version(distribution: str) -> str:
    """The installed version of a package (read from its metadata: nothing is imported)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "missing"


def _where(module: str) -> str:
    """The folder a top-level package would be imported from (found, not imported), so the
    file shows which copy of Theano ran (scripts/gpu_call.sh's or the environment's)."""
    spec = util.find_spec(module)
    return str(Path(spec.origin).parent.parent) if spec and spec.origin else "missing"


def _nvidia_smi() -> Dict[str, str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    name, _, driver = out[0].partition(",") if out else ("", "", "")
    return {"gpu": name.strip(), "driver": driver.strip()} if out else {}


def environment(device: str) -> Dict[str, str]:
    """What this machine runs: versions, where Theano comes from, the GPU and its driver
    (where nvidia-smi is)."""
    env = {"python": platform.python_version(), "numpy": _version("numpy"),
           "jax": _version("jax"), "jaxlib": _version("jaxlib"), "torch": _version("torch"),
           "theano-pymc": _version("theano-pymc"), "theano-pymc from": _where("theano"),
           "lasagne": _version("Lasagne"), "device": device, "host": platform.node()}
    env.update(_nvidia_smi())
    return env


def _missing(options: StackOptions) -> Optional[str]:
    try:
        registry.probe(options)
    except ConfigError as exc:
        return str(exc)
    return None


def _row(part: str, check: str, status: str, figure: str = "", detail: str = "") -> Dict:
    return {"part": part, "check": check, "status": status, "figure": figure,
            "detail": detail}


def _verify_rows(results: List[verify.Result]) -> List[Dict]:
    rows = []
    for r in results:
        worst = max(r.diffs, key=lambda k: r.diffs[k] / r.tol(k))
        rows.append(_row("verify", r.name, "PASS" if r.passed else "FAIL",
                         f"{r.diffs[worst]:.3e}", f"worst: {worst} (<= {r.tol(worst):g})"))
    return rows


class _Probes:
    """Whether each engine can be built here, asked once per run (probing imports a stack,
    and on a GPU starts its framework)."""

    def __init__(self):
        self._why: Dict[StackOptions, Optional[str]] = {}

    def __call__(self, options: StackOptions) -> Optional[str]:
        if options not in self._why:
            self._why[options] = _missing(options)
        return self._why[options]


def _verify_checks(device: str, quick: bool, probe: _Probes) -> List[Tuple[str, str, Callable]]:
    """The float64 checks on the device, one per engine pair: (key, name, run)."""
    configs = verify.DEFAULT_CONFIGS[:1] if quick else verify.DEFAULT_CONFIGS[:2]
    torch64 = StackOptions("torch", device, "float64")
    jax64 = StackOptions("theano", device, "float64", theano_mode="jax")
    names = {"verify torch": f"torch on {device} against the CPU",
             "verify theano-jax vs torch": f"theano-jax against torch on {device}",
             "verify references": f"theano-jax on {device} against the stored references"}

    def missing(key: str, *options: StackOptions) -> List[Dict]:
        whys = list(dict.fromkeys(filter(None, map(probe, options))))
        return [_row("verify", names[key], "MISSING", detail="; ".join(whys))] if whys else []

    def torch_device() -> List[Dict]:
        return missing("verify torch", torch64) or sum(
            (_verify_rows(verify.verify_device(cfg, train, name, device))
             for name, cfg, train in configs), [])

    def jax_torch() -> List[Dict]:
        return missing("verify theano-jax vs torch", torch64, jax64) or sum(
            (_verify_rows(verify.verify_stacks(cfg, train, f"{name} on {device}",
                                               stacks=(("torch", torch64),
                                                       ("theano-jax", jax64))))
             for name, cfg, train in configs), [])

    def references() -> List[Dict]:
        return (missing("verify references", jax64)
                or _verify_rows([verify.verify_references(device)]))

    runs = {"verify torch": torch_device, "verify theano-jax vs torch": jax_torch,
            "verify references": references}
    return [(key, names[key], runs[key]) for key in names]


def speed_name(row_id: str, engine: Engine) -> str:
    return f"{row_id} {engine.label}"


def ceiling_check(device: str, ceiling: Dict, probe: _Probes) -> List[Dict]:
    """The device's own limits (:func:`crmn.roofline.measure_ceiling`), measured once in
    the run's first seconds; kept in ``ceiling`` for every speed row. A GPU is measured
    through torch: where torch cannot use it, a MISSING row (the speed rows then show no
    share of a ceiling)."""
    why = None if device == "cpu" else probe(StackOptions("torch", device, "float32"))
    if why:
        return [_row("speed", "device ceiling", "MISSING", detail=why)]
    ceiling.update(roofline.measure_ceiling(device))
    tf = [f"{name} {ceiling[key]:.3g}" for name, key in (
        ("float32", "fp32_tflops"), ("tf32", "tf32_tflops"), ("bfloat16", "bf16_tflops"))
        if ceiling.get(key) is not None]
    return [_row("speed", "device ceiling", "ok", "TFLOP/s " + ", ".join(tf),
                 f"copy {ceiling['copy_gb_s']:.3g} GB/s; {ceiling['library']}, "
                 f"{ceiling['gemm_side']}-square products")]


def _roofline_detail(r: Dict) -> str:
    """A speed row's place against the machine: achieved TFLOP/s, share of the ceiling of
    its precision, peak memory."""
    mem = ("" if r["peak_mem_bytes"] is None
           else f"; peak {r['peak_mem_bytes'] / 2 ** 20:.0f} MiB ({r['peak_mem_kind']})")
    return (f"{r['tflops']:.3g} TFLOP/s ({r['flops_per_image'] / 1e9:.3g} GFLOP/image) = "
            f"{bench.percent(r['ceiling_fraction'])} of the ceiling{mem}")


def speed_check(row_id: str, engine: Engine, quick: bool, probe: _Probes,
                timings: Dict, ceiling: Optional[Dict] = None) -> List[Dict]:
    """One row in one engine through :func:`crmn.bench.bench_row`, set against the
    measured ``ceiling`` (empty or None where it was not measured); the result is kept in
    ``timings[(row_id, engine.id)]`` for the goals."""
    name = speed_name(row_id, engine)
    why = probe(engine.options)
    if why:
        return [_row("speed", name, "MISSING", detail=why)]
    steps, warmup = STEPS[quick]
    row = paper.row(row_id)
    model = (ModelConfig(classes=row.classes, memory=row.memory, **QUICK_MODEL)
             if quick else None)
    r = bench.bench_row(row, engine.options, steps, warmup=warmup, model=model,
                        batch_size=QUICK_BATCH if quick else None, ceiling=ceiling or None)
    timings[(row_id, engine.id)] = r
    ratio = f"{r['speedup']:.3g}x the paper" if r["speedup"] else "tiny network"
    return [_row("speed", name, "ok", f"{r['sec_per_epoch']:.2f} s/epoch",
                 f"{ratio}; compile {r['compile_s']:.1f} s; {_roofline_detail(r)}; "
                 f"{r['device']}")]


def goals(timings: Dict, quick: bool) -> List[Dict]:
    """Issue #19's goals per row timed (the full run only: tiny networks compare nothing)."""
    if quick:
        return []
    rows = []
    for row_id in ROWS:
        jax, f32 = timings.get((row_id, "jax-f32")), timings.get((row_id, "torch-f32"))
        if jax and f32:
            ratio = jax["sec_per_epoch"] / f32["sec_per_epoch"]
            rows.append(_row("goal", f"{row_id}: theano-jax / torch float32",
                             "met" if ratio <= JAX_TO_TORCH_GOAL else "not met",
                             f"{ratio:.2f}x", f"goal <= {JAX_TO_TORCH_GOAL}x; theano-jax "
                             f"{jax['tflops']:.3g} vs torch {f32['tflops']:.3g} TFLOP/s"))
        bf16 = timings.get((row_id, "torch-bf16"))
        if bf16 and bf16["speedup"]:
            rows.append(_row("goal", f"{row_id}: torch bfloat16 vs the paper",
                             "met" if bf16["speedup"] >= BF16_SPEEDUP_GOAL else "not met",
                             f"{bf16['speedup']:.3g}x", f"goal >= {BF16_SPEEDUP_GOAL:g}x; "
                             f"{bf16['tflops']:.3g} TFLOP/s"))
    return rows


def _smoke_argv(options: StackOptions, out: Path) -> List[str]:
    argv = [sys.executable, "-m", "crmn.cli", "smoke", "--backend", options.backend,
            "--device", options.device, "--dtype", options.dtype, "--schedule", "3,0,0",
            "--epochs-cap", "3", "--no-progress", "--out-dir", str(out)]
    if options.backend == "theano":
        argv += ["--theano-mode", options.theano_mode]
    return argv + (["--compile"] if options.compile else [])


def smoke_name(engine: Engine) -> str:
    return f"smoke, 3 epochs, {engine.label}"


def smoke_check(engine: Engine, out_dir: Path, probe: _Probes, recorder: "Recorder") -> List[Dict]:
    """Three epochs of ``smoke`` in ``engine`` through the real command line, in a child
    process the recorder ends if the run is cut short; the training loss must fall."""
    name = smoke_name(engine)
    why = probe(engine.options)
    if why:
        return [_row("smoke", name, "MISSING", detail=why)]
    out = out_dir / f"smoke-{engine.id}"
    # the child imports what this process imports: the archive first, then our PYTHONPATH
    # (scripts/gpu_call.sh puts the wheels' folder there)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    p = recorder.spawn(_smoke_argv(engine.options, out), cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=path))
    try:
        _, stderr = p.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        p.kill()
        _, stderr = p.communicate()
    finally:
        recorder.forget_child()
    took = time.perf_counter() - t0
    log = out / "smoke" / "tiny-crmn-n1-k0.5" / "seed0" / runlog.LOG
    losses = [e["train_loss"] for e in runlog.read_log(log)
              if e["phase"] == "final"] if p.returncode == 0 and log.exists() else []
    falls = len(losses) == 3 and losses[-1] < losses[0]
    err = (stderr.strip().splitlines() or [""])[-1]
    return [_row("smoke", name, "PASS" if falls else "FAIL",
                 " > ".join(f"{v:.3f}" for v in losses),
                 f"{took:.0f} s" if p.returncode == 0 else f"exit {p.returncode}: {err}")]


@dataclasses.dataclass(frozen=True)
class Check:
    """One individually budgeted check: its :data:`COSTS` key, its part, its name in the
    table (when not run), what it runs."""

    key: str
    part: str
    name: str
    run: Callable[[], List[Dict]]


def plan_checks(plan: GpucheckPlan, recorder: "Recorder",
                timings: Dict) -> List[Check]:
    """The checks of ``plan`` in issue #22's order of priority (module docstring), the
    environment excluded (it heads the files and always runs)."""
    probe = _Probes()
    by_id = {e.id: e for e in engines(plan.device)}
    checks = []
    ceiling: Dict = {}  # measured first, read by every speed row
    if "speed" in plan.parts:
        checks.append(Check("ceiling", "speed", "device ceiling",
                            lambda: ceiling_check(plan.device, ceiling, probe)))
    if "verify" in plan.parts:
        checks += [Check(key, "verify", name, fn)
                   for key, name, fn in _verify_checks(plan.device, plan.quick, probe)]

    def smoke(eid: str) -> Check:
        return Check(f"smoke {eid}", "smoke", smoke_name(by_id[eid]), lambda: smoke_check(
            by_id[eid], plan.out_dir, probe, recorder))

    if "smoke" in plan.parts:
        checks.append(smoke("jax-f32"))
    if "speed" in plan.parts:
        for group in (QUICK_ROWS,) if plan.quick else ROW_GROUPS:
            pairs = [(row_id, eid) for row_id in group for eid in by_id]
            # the deepest ResNet's Theano-JAX compile is the longest: the last of its group
            pairs.sort(key=lambda p: p == ("t1-resnet134x1", "jax-f32"))
            checks += [Check(f"speed {row_id} {eid}", "speed", speed_name(row_id, by_id[eid]),
                             lambda row_id=row_id, eid=eid: speed_check(
                                 row_id, by_id[eid], plan.quick, probe, timings, ceiling))
                       for row_id, eid in pairs]
    if "smoke" in plan.parts:
        checks += [smoke("torch-f32"), smoke("torch-bf16")]
    return checks


def render(report: Dict) -> str:
    """``gpucheck.md``: the environment, where the run stands, then one table of every
    check (the measured seconds of each beside its expected seconds)."""
    env = report["environment"]
    head = ", ".join(f"{k} {v}" for k, v in env.items())
    body = [[r["part"], r["check"], r["status"], r["figure"], r["detail"],
             "" if r.get("seconds") is None else f"{r['seconds']:.0f}",
             "" if r.get("expected_s") is None else f"{r['expected_s']:.0f}"]
            for r in report["checks"]]
    return (f"# gpucheck\n\n{head}\n\n{state_line(report)}\n\n" +
            tables.markdown(["part", "check", "status", "figure", "detail", "s",
                             "expected s"], body) + "\n")


def state_line(report: Dict) -> str:
    """One line: complete, cut short (by which signal, in which check), or still running."""
    took = f"{report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget"
    cut = report.get("cut_short")
    if cut:
        return (f"**Cut short** by {cut['signal']} after {cut['after_s']:.0f} s, in check "
                f"`{cut['check'] or 'between checks'}`: the rows below are every check that "
                "finished before it.")
    if report["running"]:
        return (f"**Running** `{report['running']}` ({took} so far). If this line is the "
                "last word, the run was killed in that check; the rows below finished.")
    return (f"Complete: {took}; {report['failed']} failed, {report['not_run']} not run "
            "for the budget.")


class Recorder:
    """The state of one run and its two files, replaced after every change.

    One lock orders the main thread's updates and the signal watcher's last write
    (:meth:`cut`), which keeps the lock until the process ends, so nothing is written or
    started after it.
    """

    def __init__(self, plan: GpucheckPlan, env: Dict[str, str]):
        self.plan, self.env = plan, env
        self.rows: List[Dict] = []
        self.timings: Dict = {}
        self.running: Optional[str] = None
        self.cut_short: Optional[Dict] = None
        self.t0 = time.monotonic()
        self._child: Optional[subprocess.Popen] = None
        self._lock = threading.Lock()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def report(self) -> Dict:
        rows = self.rows + goals(self.timings, self.plan.quick)
        failed = sum(r["status"] == "FAIL" for r in rows)
        engine_rows = [r for r in rows if r["part"] in ("verify", "speed", "smoke")]
        if engine_rows and all(r["status"] == "MISSING" for r in engine_rows):
            failed += 1  # nothing could be built here: the check proved nothing
        return {"environment": self.env, "device": self.plan.device, "quick": self.plan.quick,
                "budget_s": self.plan.budget, "parts": list(self.plan.parts),
                "seconds": round(self.elapsed(), 1), "running": self.running,
                "cut_short": self.cut_short, "checks": rows, "failed": failed,
                "not_run": sum(r["status"] == NOT_RUN for r in rows)}

    def _write(self) -> Dict:
        report = self.report()
        out = self.plan.out_dir
        runlog.write_json(out / JSON_NAME, report)
        runlog.write_bytes_atomic(out / MD_NAME, render(report).encode())
        return report

    def start(self, key: str) -> None:
        with self._lock:
            self.running = key
            self._write()

    def finish(self, check: Check, rows: List[Dict], seconds: Optional[float],
               expected: float) -> Dict:
        """Add the rows of ``check`` (``seconds`` None: not run) and write both files."""
        for r in rows:
            r.update(key=check.key, seconds=None if seconds is None else round(seconds, 1),
                     expected_s=expected)
        with self._lock:
            self.rows += rows
            self.running = None
            return self._write()

    def spawn(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start a child process that :meth:`cut` will end (never one after a cut)."""
        with self._lock:
            self._child = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE, text=True, **kwargs)
            return self._child

    def forget_child(self) -> None:
        with self._lock:
            self._child = None

    def close(self) -> Dict:
        """The last write of a run that was not cut short; the final report."""
        with self._lock:
            return self._write()

    def cut(self, signum: int) -> None:
        """Called by the watcher thread on a signal: the child is ended and the files say
        the run was cut short, and where. Keeps the lock: nothing is written after it."""
        self._lock.acquire()
        self.cut_short = {"signal": signal.Signals(signum).name, "check": self.running,
                          "after_s": round(self.elapsed(), 1)}
        self.running = None
        child = self._child
        if child is not None and child.returncode is None:
            child.terminate()
            deadline = time.monotonic() + CHILD_GRACE_S
            while child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            child.kill()  # a no-op on a child already reaped
        self._write()


def _watch(fd: int, recorder: Recorder) -> None:
    """The watcher thread: wakes on a byte from :func:`signal.set_wakeup_fd` (the signal's
    number; 0 from :func:`_cut_on_signals` means the run ended), records the cut, exits."""
    while True:
        data = os.read(fd, 1)
        if not data or data[0] == 0:
            return
        if data[0] not in CUT_SIGNALS:
            continue
        name = signal.Signals(data[0]).name
        try:
            recorder.cut(data[0])
            cut = recorder.cut_short
            line = (f"gpucheck: cut short by {name} in check {cut['check'] or '-'} after "
                    f"{cut['after_s']:.0f} s; wrote {recorder.plan.out_dir / JSON_NAME} "
                    f"and {MD_NAME}")
        except (OSError, CRMNError) as exc:  # e.g. a full disk: the last files stay
            line = f"gpucheck: cut short by {name}; could not write its files: {exc}"
        os.write(2, (line + "\n").encode())
        os._exit(CUT_SIGNALS[data[0]])  # the files are on disk; the main thread may be in XLA


class _cut_on_signals:
    """While the block runs, SIGTERM / SIGINT / SIGUSR1 go to :func:`_watch` (a no-op in a
    thread other than the main one, where Python cannot take signals)."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self.active = threading.current_thread() is threading.main_thread()

    def __enter__(self):
        if not self.active:
            return self
        self.r, self.w = os.pipe()
        os.set_blocking(self.w, False)
        # a Python-level handler is what makes the C-level one write to the wakeup fd; it
        # does nothing itself (the watcher thread does the work, even while the main
        # thread waits inside a compiler)
        self.old = {s: signal.signal(s, lambda *_: None) for s in CUT_SIGNALS}
        self.old_fd = signal.set_wakeup_fd(self.w, warn_on_full_buffer=False)
        self.thread = threading.Thread(target=_watch, args=(self.r, self.recorder),
                                       name="gpucheck-signals", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if not self.active:
            return False
        signal.set_wakeup_fd(self.old_fd)
        for s, handler in self.old.items():
            signal.signal(s, handler)
        os.write(self.w, b"\0")
        self.thread.join()
        os.close(self.r)
        os.close(self.w)
        return False


def _release_memory() -> None:
    """Between checks: free the last check's networks, and hand torch's cached device
    memory back so that a JAX check after a torch one finds it (JAX's side: it does not
    preallocate, :func:`original.jax_mode.configure`)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _say(rows: List[Dict]) -> None:
    for r in rows:
        print(f"gpucheck: {r['part']}: {r['check']}: {r['status']} {r['figure']} "
              f"{r['detail']}".rstrip(), flush=True)


def run(plan: GpucheckPlan) -> int:
    """Every check of ``plan`` that fits its budget, in order; writes gpucheck.json and
    gpucheck.md into ``plan.out_dir`` before and after each; the exit code (1 if a check
    failed; 3 or 130 when a signal cut the run short, from the watcher thread)."""
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(plan, {})
    costs = COSTS[plan.kind]
    with _cut_on_signals(recorder):
        recorder.env.update(environment(plan.device))
        print("gpucheck: " + ", ".join(f"{k} {v}" for k, v in recorder.env.items()),
              flush=True)
        env_check = Check("environment", "environment", "versions and device", list)
        recorder.finish(env_check, [_row("environment", env_check.name, "ok",
                                         recorder.env["python"], recorder.env["device"])],
                        recorder.elapsed(), costs["environment"])
        for check in plan_checks(plan, recorder, recorder.timings):
            expected = costs[check.key]
            left = plan.budget - recorder.elapsed()
            if expected > left:
                rows = [_row(check.part, check.name, NOT_RUN,
                             detail=f"expected {expected:.0f} s, {max(left, 0):.0f} s left")]
                recorder.finish(check, rows, None, expected)
                _say(rows)
                continue
            recorder.start(check.key)
            t = time.monotonic()
            try:
                rows = check.run()
            except CRMNError as exc:  # one line, and the later checks still run
                rows = [_row(check.part, check.name, "FAIL", detail=str(exc))]
            recorder.finish(check, rows, time.monotonic() - t, expected)
            _say(rows)
            _release_memory()
        report = recorder.close()
    text = render(report)
    print(text)
    print(f"gpucheck: {report['failed']} failed check(s), {report['not_run']} not run for the "
          f"budget; wrote {plan.out_dir / JSON_NAME} and {plan.out_dir / MD_NAME}")
    return 1 if report["failed"] else 0


def measured_costs(path) -> Dict[str, float]:
    """``{check key: measured seconds}`` of a finished ``gpucheck.json`` (checks not run are
    left out): the figures that refine :data:`COSTS` for the device kind it ran on."""
    report = runlog.read_json(Path(path))
    return {r["key"]: r["seconds"] for r in report["checks"]
            if r.get("key") and r.get("seconds") is not None}
