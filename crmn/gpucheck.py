"""One command that turns a machine with a GPU into the archive's GPU figures.

``bash run_experiments.sh gpucheck [--device cuda|cpu] [--quick] [--out DIR]`` runs, on the
Python it finds (a current scientific Python works: ``CRMN_PYTHON=...``), four parts:

1. **environment**: Python, numpy, jax, torch, Theano-PyMC, Lasagne, the GPU and its driver;
2. **verify** in float64 on the device, for every engine that can be built there: torch on
   the device against torch on the CPU (:func:`crmn.verify.verify_device`), Theano through
   JAX on the device against the stored Theano-C references
   (:func:`crmn.verify.verify_references`) and against torch on the device;
3. **speed**: seconds per epoch, compile seconds and the ratio to the paper's seconds per
   epoch of :data:`ROWS` for each engine of :func:`engines` (torch float32, torch bfloat16
   with ``torch.compile``, Theano-JAX float32), through :func:`crmn.bench.bench_row`;
4. **training**: three epochs of ``smoke`` per engine through the real command line, on fake
   data; the training loss must fall.

It writes ``gpucheck.json`` and ``gpucheck.md`` into ``--out`` and prints the Markdown. An
engine that cannot be built here is one line saying what is missing; the exit code is 1 if
any check failed (a missing engine is not a failure, it is reported). The goals of issue
#19 (Theano-JAX float32 within 1.5x of torch float32; torch bfloat16 + compile at least
100x the paper's speed) are reported beside the figures, not enforced. ``--quick`` runs
the same path on tiny networks (n=1, k=0.5) with few steps: a check of the command itself,
minutes on a CPU.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from crmn import bench, paper, registry, runlog, tables, verify
from crmn.config import ModelConfig
from crmn.errors import ConfigError, CRMNError
from crmn.registry import StackOptions

ROOT = Path(__file__).resolve().parent.parent
#: the rows timed (issue #19): the smallest and deepest ResNet, the CRMN and its widest
ROWS = ("t1-resnet32x1", "t1-resnet134x1", "t1-crmn32x1", "t1-crmn32x4")
QUICK_ROWS = ("t1-resnet32x1", "t1-crmn32x1")
#: --quick: every row as a tiny network in its own protocol
QUICK_MODEL = dict(n=1, k=0.5)
#: timed steps and warm-up steps per row and engine: (full, quick)
STEPS = {False: (60, 3), True: (2, 1)}
QUICK_BATCH = 8
#: issue #19's goals
JAX_TO_TORCH_GOAL = 1.5
BF16_SPEEDUP_GOAL = 100.0


def engines(device: str) -> Tuple[Tuple[str, StackOptions], ...]:
    """The engines timed and trained; ``torch.compile`` only on a GPU (on a CPU it would
    time the C++ compiler, not the network)."""
    on_gpu = device.startswith("cuda")
    return (("torch float32", StackOptions("torch", device, "float32")),
            ("torch bfloat16" + (" + compile" if on_gpu else ""),
             StackOptions("torch", device, "bfloat16", compile=on_gpu)),
            ("theano-jax float32", StackOptions("theano", device, "float32",
                                                theano_mode="jax")))


def _version(distribution: str) -> str:
    """The installed version of a package (read from its metadata: nothing is imported)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "missing"


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
    """What this machine runs: versions, the GPU and its driver (where nvidia-smi is)."""
    env = {"python": platform.python_version(), "numpy": _version("numpy"),
           "jax": _version("jax"), "jaxlib": _version("jaxlib"), "torch": _version("torch"),
           "theano-pymc": _version("theano-pymc"), "lasagne": _version("Lasagne"),
           "device": device, "host": platform.node()}
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


def check_verify(device: str, quick: bool) -> List[Dict]:
    """Part 2: float64 on the device, every engine that can be built there."""
    configs = verify.DEFAULT_CONFIGS[:2]
    torch64 = StackOptions("torch", device, "float64")
    jax64 = StackOptions("theano", device, "float64", theano_mode="jax")
    rows = []
    torch_missing, jax_missing = _missing(torch64), _missing(jax64)
    for label, why in (("torch", torch_missing), ("theano-jax", jax_missing)):
        if why:
            rows.append(_row("verify", f"{label} on {device}", "MISSING", detail=why))
    for name, cfg, train in configs[:1] if quick else configs:
        if not torch_missing:
            rows += _verify_rows(verify.verify_device(cfg, train, name, device))
        if not torch_missing and not jax_missing:
            rows += _verify_rows(verify.verify_stacks(
                cfg, train, f"{name} on {device}",
                stacks=(("torch", torch64), ("theano-jax", jax64))))
    if not jax_missing:
        rows += _verify_rows([verify.verify_references(device)])
    return rows


def check_speed(device: str, quick: bool) -> Tuple[List[Dict], List[Dict]]:
    """Part 3: the bench rows and, per row, the goals."""
    steps, warmup = STEPS[quick]
    rows, timings = [], {}
    for label, options in engines(device):
        why = _missing(options)
        if why:
            rows.append(_row("speed", label, "MISSING", detail=why))
            continue
        for row_id in QUICK_ROWS if quick else ROWS:
            row = paper.row(row_id)
            model = (ModelConfig(classes=row.classes, memory=row.memory, **QUICK_MODEL)
                     if quick else None)
            try:
                r = bench.bench_row(row, options, steps, warmup=warmup, model=model,
                                    batch_size=QUICK_BATCH if quick else None)
            except CRMNError as exc:
                rows.append(_row("speed", f"{row_id} {label}", "FAIL", detail=str(exc)))
                continue
            timings[(row_id, label)] = r
            ratio = f"{r['speedup']:.3g}x the paper" if r["speedup"] else "tiny network"
            rows.append(_row("speed", f"{row_id} {label}", "ok",
                             f"{r['sec_per_epoch']:.2f} s/epoch",
                             f"{ratio}; compile {r['compile_s']:.1f} s; {r['device']}"))
    return rows, ([] if quick else _goals(timings))


def _goals(timings: Dict) -> List[Dict]:
    """Issue #19's goals per row (the full run only: tiny networks compare nothing)."""
    goals = []
    for row_id in ROWS:
        jax = timings.get((row_id, "theano-jax float32"))
        f32 = timings.get((row_id, "torch float32"))
        if jax and f32:
            ratio = jax["sec_per_epoch"] / f32["sec_per_epoch"]
            goals.append(_row("goal", f"{row_id}: theano-jax / torch float32",
                              "met" if ratio <= JAX_TO_TORCH_GOAL else "not met",
                              f"{ratio:.2f}x", f"goal <= {JAX_TO_TORCH_GOAL}x"))
        bf16 = next((v for (rid, lab), v in timings.items()
                     if rid == row_id and lab.startswith("torch bfloat16")), None)
        if bf16 and bf16["speedup"]:
            goals.append(_row("goal", f"{row_id}: torch bfloat16 vs the paper",
                              "met" if bf16["speedup"] >= BF16_SPEEDUP_GOAL else "not met",
                              f"{bf16['speedup']:.3g}x", f"goal >= {BF16_SPEEDUP_GOAL:g}x"))
    return goals


def _smoke_argv(options: StackOptions, out: Path) -> List[str]:
    argv = [sys.executable, "-m", "crmn.cli", "smoke", "--backend", options.backend,
            "--device", options.device, "--dtype", options.dtype, "--schedule", "3,0,0",
            "--epochs-cap", "3", "--no-progress", "--out-dir", str(out)]
    if options.backend == "theano":
        argv += ["--theano-mode", options.theano_mode]
    return argv + (["--compile"] if options.compile else [])


def check_training(device: str, out_dir: Path) -> List[Dict]:
    """Part 4: three epochs of ``smoke`` per engine through the real command line."""
    rows = []
    for label, options in engines(device):
        why = _missing(options)
        if why:
            rows.append(_row("training", label, "MISSING", detail=why))
            continue
        out = out_dir / ("train-" + label.replace(" ", "-").replace("+", "plus"))
        t0 = time.perf_counter()
        p = subprocess.run(_smoke_argv(options, out), cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=1800)
        took = time.perf_counter() - t0
        log = out / "smoke" / "tiny-crmn-n1-k0.5" / "seed0" / runlog.LOG
        losses = [e["train_loss"] for e in runlog.read_log(log)
                  if e["phase"] == "final"] if p.returncode == 0 and log.exists() else []
        falls = len(losses) == 3 and losses[-1] < losses[0]
        err = (p.stderr.strip().splitlines() or [""])[-1]
        rows.append(_row("training", f"smoke, 3 epochs, {label}", "PASS" if falls else "FAIL",
                         " > ".join(f"{v:.3f}" for v in losses),
                         f"{took:.0f} s" if p.returncode == 0 else f"exit {p.returncode}: {err}"))
    return rows


def render(env: Dict[str, str], rows: List[Dict]) -> str:
    """``gpucheck.md``: the environment, then one table of every check."""
    head = ", ".join(f"{k} {v}" for k, v in env.items())
    body = [[r["part"], r["check"], r["status"], r["figure"], r["detail"]] for r in rows]
    return (f"# gpucheck\n\n{head}\n\n" +
            tables.markdown(["part", "check", "status", "figure", "detail"], body) + "\n")


def run(device: str, quick: bool, out_dir: Path) -> int:
    """All four parts; writes gpucheck.json and gpucheck.md into ``out_dir``; the exit code
    (1 if a check failed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    env = environment(device)
    print("gpucheck: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    rows: List[Dict] = []
    for name, part in (("verify", lambda: check_verify(device, quick)),
                       ("speed", lambda: sum(check_speed(device, quick), [])),
                       ("training", lambda: check_training(device, out_dir))):
        t = time.perf_counter()
        got = part()
        for r in got:
            print(f"gpucheck: {r['part']}: {r['check']}: {r['status']} {r['figure']} "
                  f"{r['detail']}".rstrip(), flush=True)
        print(f"gpucheck: {name} took {time.perf_counter() - t:.0f} s", flush=True)
        rows += got
    env["seconds"] = f"{time.perf_counter() - t0:.0f}"
    failed = [r for r in rows if r["status"] == "FAIL"]
    if all(r["status"] == "MISSING" for r in rows if r["part"] != "goal"):
        failed.append(_row("all", "no engine could be built here", "FAIL"))
    runlog.write_json(out_dir / "gpucheck.json", {"environment": env, "quick": quick,
                                                  "checks": rows, "failed": len(failed)})
    text = render(env, rows)
    (out_dir / "gpucheck.md").write_text(text)
    print(text)
    print(f"gpucheck: {len(failed)} failed check(s); wrote {out_dir / 'gpucheck.json'} and "
          f"{out_dir / 'gpucheck.md'}")
    return 1 if failed else 0
