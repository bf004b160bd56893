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
from crmn.errors import (EXIT_INTERRUPTED, EXIT_STOPPED, ConfigError, CRMNError, RunError,
                         UsageError)
from crmn.registry import BackendOptions

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("environment", "verify", "smoke", "packing", "speed")  # --only; environment always runs
PACKING_K = (1, 2, 4, 8)  # concurrent processes of one row tried in turn (--quick: 1, 2)
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
    "speed t1-resnet32x1 theano-jax float32": (60, 400, 25), "speed t1-resnet32x1 torch bfloat16": (50, 200, 15),
    "speed t1-crmn32x1 torch float32": (20, 130, 15), "speed t1-crmn32x1 theano-jax float32": (65, 450, 30),
    "speed t1-crmn32x1 torch bfloat16": (70, 250, 15), "speed t1-crmn32x4 torch float32": (25, 420, None),
    "speed t1-crmn32x4 theano-jax float32": (55, 1200, None), "speed t1-crmn32x4 torch bfloat16": (70, 800, None),
    "speed t1-resnet134x1 torch float32": (30, 330, None),
    "speed t1-resnet134x1 torch bfloat16": (110, 700, None),
    "speed t1-resnet134x1 theano-jax float32": (220, 1500, None),  # the longest compile, last
    "smoke torch float32": (40, 50, 45), "smoke torch bfloat16": (100, 70, 50),
    "speed lasagne-mnist-cnn": (240, 300, None)}
LASAGNE_CHECK = "speed lasagne-mnist-cnn"  # Lasagne's own examples/mnist.py, unmodified
LASAGNE_SDIST = "Lasagne-0.1.tar.gz"  # in $CRMN_WHEELS (scripts/lasagne_tests.sh fetches it)



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


def _gpu_device(device: str) -> str:
    """``device`` (auto: cuda where torch or jax sees a GPU, else cpu); a GPU named where
    none is seen: :class:`ConfigError` with the ways that work here."""
    if device == registry.AUTO:
        return "cpu" if registry.no_gpu("cuda") else "cuda"
    missing = registry.no_gpu(device)
    if missing:
        raise ConfigError(f"{missing}: run it on a GPU machine (scripts/gpu_call.sh), or "
                          "check the command itself on this CPU with --device cpu --quick")
    return device


def plan_from_args(args) -> GpucheckPlan:
    try:  # a bad value: one line, exit 2, nothing created
        return GpucheckPlan(_gpu_device(args.device), args.quick, Path(args.out_dir),
                            args.budget, args.only, args.real)
    except ConfigError as exc:
        raise UsageError(f"run_experiments.sh gpucheck: {exc}") from None


def configurations(device: str) -> Dict[str, BackendOptions]:
    """The backend configurations gpucheck times, by name: registry.label and the dtype."""
    every = (BackendOptions("torch", device, "float32"),
             BackendOptions("theano", device, "float32", theano_mode="jax"),
             BackendOptions("torch", device, "bfloat16", compile=device != "cpu"))  # on a GPU
    return {f"{registry.label(o)} {o.dtype}": o for o in every}


#: the configurations' names in gpucheck.jsonl files written before issue 33
OLD_NAMES = {"torch-f32": "torch float32", "jax-f32": "theano-jax float32",
             "torch-bf16": "torch bfloat16"}


def plan_checks(plan: GpucheckPlan) -> List[str]:  # after the environment, in NEEDS' order
    column, real = 2 if plan.quick else int(plan.device == "cpu"), ("real",) * bool(plan.real)
    return [k for k, need in NEEDS.items()
            if need[column] is not None and k.split()[0] in plan.parts + real]


def child_argv(plan: GpucheckPlan, key: str) -> List[str]:
    """Check ``key``'s child, the one place gpucheck spells a command line: smoke and the real
    runs (He et al.'s setting; ``--quick``: a tiny network, 1 epoch, 500 images) through the
    archive's command line, the others through ``python -m crmn.gpucheck KEY DEVICE OUT_DIR``."""
    kind, _, rest = key.partition(" ")
    if kind not in ("smoke", "real"):
        return [sys.executable, "-m", "crmn.gpucheck", key, plan.device, str(plan.out_dir)] + \
            ["--quick"] * plan.quick
    if kind == "smoke":
        options = configurations(plan.device)[rest]
        run_plan = plans.smoke_plan_for(options, plan.out_dir / f"smoke-{rest.replace(' ', '-')}",
                                        epochs_cap=3, schedule=(3, 0, 0))
    else:  # real: torch bfloat16, or the JAX mode where --quick runs without torch
        name = "torch bfloat16"
        if plan.quick and util.find_spec("torch") is None:
            name = "theano-jax float32"
        model, subset, schedule = {}, None, (82, 41, 41)  # He et al.'s setting
        if plan.quick:
            model, subset, schedule = dict(n=1, k=0.5), 500, (1, 0, 0)
        folder = plan.out_dir / ("real-quick" if plan.quick else "real")
        run_plan = plans.row_plan_for(rest, configurations(plan.device)[name], folder,
                                      dataset="cifar10", data_dir=plan.real, subset=subset,
                                      model=model, train=dict(flip=True, schedule=schedule))
    return plans.render_argv(run_plan, run_plan.runs[0], [sys.executable, "-m", "crmn.cli"],
                             resume=kind == "real")  # --resume: a real run cut short goes on


def _row(status: str, figure: str = "", detail: str = "", **data) -> Dict:
    return {"status": status, "figure": figure, "detail": detail, **data}


def environment(device: str) -> Dict[str, str]:
    """Versions (nothing imported), where Theano comes from, the GPU and its driver."""
    have = {(d.metadata["Name"] or "").lower(): d.version  # the first on the path wins
            for d in reversed(list(metadata.distributions()))}
    spec = util.find_spec("theano")
    env = {"python": platform.python_version(), **{d: have.get(d.lower(), "missing") for d in (
        "numpy", "jax", "jaxlib", "torch", "theano-pymc")}, "theano-pymc from":
           str(Path(spec.origin).parents[1]) if spec and spec.origin else "missing",
           "lasagne": have.get("lasagne", "missing"), "device": device, "host": platform.node()}
    smi = subprocess.run("timeout 30 nvidia-smi --query-gpu=name,driver_version --format=csv,"
                         "noheader 2>/dev/null", shell=True, capture_output=True, text=True).stdout
    env.update(zip(("gpu", "driver"), [v.strip() for v in smi.split("\n")[0].split(",") if smi]))
    return env


def _pack_one(row_id: str, options: BackendOptions, quick: bool, barrier, queue) -> None:
    """One of K processes timing ``row_id`` at once: (start, end, images, peak memory)."""
    from crmn import bench, paper
    from crmn.config import ModelConfig
    row, start = paper.row(row_id), []

    def ready() -> None:  # every process warmed up (compiled): the K time their steps together
        barrier.wait()
        start.append(time.time())
    r = bench.bench_row(row, options, *((4, 2) if quick else (60, 3)), batch_size=8 if quick
                        else None, model=ModelConfig(classes=row.classes, memory=row.memory,
                                                     n=1, k=0.5) if quick else None, ready=ready)
    queue.put((start[0], start[0] + r["seconds"], r["images_per_s"] * r["seconds"],
               r["peak_mem_bytes"]))


def _pack(plan: GpucheckPlan, row_id: str, options: BackendOptions, k: int) -> List[tuple]:
    """:func:`_pack_one`'s figures of ``k`` processes started together."""
    import multiprocessing
    import queue as queues
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each, as a run has
    barrier, out = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=_pack_one, args=(row_id, options, plan.quick, barrier, out))
             for _ in range(k)]
    for p in procs:
        p.start()
    got = []
    while len(got) < k:
        try:
            got.append(out.get(timeout=1))
        except queues.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                log = plan.out_dir / "logs" / f"packing-{row_id}.log"
                raise RunError(f"packing {row_id}: a process of K = {k} failed (exit codes "
                               f"{[p.exitcode for p in procs]}); see {log}")
    for p in procs:
        p.join()
    return got


def packing_rows(plan: GpucheckPlan, row_id: str) -> List[Dict]:
    """K = 1, 2, 4, 8 processes of ``row_id`` (torch bfloat16 + compile) at once, each with
    its share of the cores: their images/s together, the speed-up over K = 1, each one's peak
    memory; K stops rising when the speed-up stops growing, memory or the budget would not
    allow the next. On a GPU the table is kept for the cost estimate (crmn/cost.py)."""
    from crmn import cost
    options = configurations(plan.device)["torch bfloat16"]
    registry.probe(options)
    budget, t0 = NEEDS[f"packing {row_id}"][2 if plan.quick else 0], time.monotonic()
    memory = None
    if plan.device.startswith("cuda"):
        import torch
        memory = torch.cuda.get_device_properties(torch.device(plan.device)).total_memory
    rows, table, cores = [], {"speedup": {}, "images_per_s": {}, "peak_mem_bytes": {}}, \
        len(os.sched_getaffinity(0))
    for k in PACKING_K[:2] if plan.quick else PACKING_K:
        peak = max(table["peak_mem_bytes"].values(), default=0)
        late = not plan.quick and rows and (time.monotonic() - t0) * 2 > budget
        if late or (memory and k * peak > 0.9 * memory):
            break  # twice what it took so far would not fit its budget; or K copies its memory
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // k))  # inherited by the K processes
        got = _pack(plan, row_id, options, k)
        rate = sum(g[2] for g in got) / (max(g[1] for g in got) - min(g[0] for g in got))
        one = table["images_per_s"].get("1", rate)
        table["images_per_s"][str(k)], table["speedup"][str(k)] = rate, rate / one
        table["peak_mem_bytes"][str(k)] = max(g[3] or 0 for g in got)
        rows.append(_row("ok", f"K={k}: {rate:.0f} img/s together, {rate / one:.2f}x K=1",
                         f"peak {table['peak_mem_bytes'][str(k)] / 2 ** 20:.0f} MiB each, "
                         f"{os.environ['OMP_NUM_THREADS']} threads each; {options.describe()}",
                         check=f"packing {row_id} K={k}", data={"k": k, "images_per_s": rate,
                                                               "speedup": rate / one}))
        if k > 1 and rate / one <= table["speedup"].get(str(k // 2), 0):
            break  # the speed-up stopped growing
    gpu = None if plan.quick else environment(plan.device).get("gpu")
    if gpu:  # the cost estimate's figures: the slower row's at each K
        kept = cost.read_packing(gpu) or {}
        by_row = {**kept.get("rows", {}), row_id: table}
        shared = set.intersection(*(set(t["speedup"]) for t in by_row.values()))
        cost.record_packing(gpu, {"gpu": gpu, "memory_bytes": memory, "rows": by_row,
                                  "speedup": {k: min(t["speedup"][k] for t in by_row.values())
                                              for k in sorted(shared, key=int)}})
    return rows


def lasagne_example(name: str, folder: Path) -> Path:
    """Lasagne 0.1's ``examples/<name>``, byte for byte from its source archive, into
    ``folder``; ConfigError where the archive is not in $CRMN_WHEELS."""
    import tarfile
    sdist = Path(os.environ.get("CRMN_WHEELS", ROOT / ".whl")) / LASAGNE_SDIST
    if not sdist.is_file():
        raise ConfigError(f"no {sdist}: run `bash scripts/lasagne_tests.sh` once where PyPI "
                          f"is reachable (it fetches Lasagne 0.1's source archive there)")
    with tarfile.open(sdist) as tar:  # one named member, read as bytes: nothing extracted
        data = tar.extractfile(f"Lasagne-0.1/examples/{name}").read()
    (folder / name).write_bytes(data)
    return folder / name


def write_mnist(path: Path, train: int = 10000, seed: int = 0) -> None:
    """A file in the layout examples/mnist.py reads (pickled ((x, y) train, val, test),
    x (n, 784) float32): a bright pixel at the label's place over noise (500 val/test)."""
    import gzip
    import pickle
    import numpy as np
    rng = np.random.RandomState(seed)

    def split(n):
        y = rng.randint(0, 10, n)
        x = (rng.rand(n, 784) * 0.3).astype(np.float32)
        x[np.arange(n), y * 70 + 35] += 1.0
        return x, y.astype(np.int64)

    with gzip.open(path, "wb", compresslevel=1) as f:
        pickle.dump((split(train), split(500), split(500)), f, protocol=2)


def lasagne_cnn_row(plan: GpucheckPlan) -> Dict:
    """examples/mnist.py cnn, unmodified, one epoch of 10,000 synthetic images through JAX
    mode on the device and on the CPU: the seconds of each."""
    folder = plan.out_dir / "lasagne"
    folder.mkdir(parents=True, exist_ok=True)
    script = lasagne_example("mnist.py", folder)
    write_mnist(folder / "mnist.pkl.gz")
    seconds = {}
    for device in dict.fromkeys((plan.device, "cpu")):
        record = folder / f"cnn-{device}.json"
        rc = subprocess.run([sys.executable, "-m", "crmn.cli", "lasagne", "--theano-mode",
                             "jax", "--device", device, "--record", str(record), script.name,
                             "cnn", "1"], cwd=folder,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode
        if rc:
            raise RunError(f"examples/mnist.py cnn on {device} exited {rc}: see its output in "
                           f"{plan.out_dir / 'logs'}")
        seconds[device] = runlog.read_json(record)["seconds"]
    figure = ", ".join(f"{d} {s:.1f} s" for d, s in seconds.items())
    return _row("ok", figure, "examples/mnist.py cnn through JAX mode, one epoch of 10,000 "
                "synthetic images, float32, compile included",
                data=seconds)


def check_rows(plan: GpucheckPlan, key: str) -> List[Dict]:
    """In the child: the rows of the ceiling, a verify pair, the packing or a speed row."""
    from crmn import bench, paper, roofline, verify
    from crmn.config import ModelConfig
    if key == LASAGNE_CHECK:
        return [lasagne_cnn_row(plan)]
    kind, _, rest = key.partition(" ")
    row_id, _, eid = rest.partition(" ")
    if kind == "packing":
        return packing_rows(plan, rest)
    t64 = BackendOptions("torch", plan.device, "float64")
    j64 = BackendOptions("theano", plan.device, "float64", theano_mode="jax")
    if kind == "verify":  # what the check builds must be there (else the row says MISSING)
        needed = {"torch": [t64], "references": [j64]}.get(rest, [t64, j64])
    elif rest == "ceiling":  # torch must see the GPU; on the CPU there is nothing to probe
        needed = [BackendOptions("torch", plan.device)] if plan.device != "cpu" else []
    else:
        needed = [configurations(plan.device)[eid]]
    for options in needed:
        registry.probe(options)
    if rest == "ceiling":
        c = roofline.measure_ceiling(plan.device)
        return [_row("ok", f"fp32 {c['fp32_tflops']:.3g} TFLOP/s", bench.describe_ceiling(c),
                     data=c)]
    if kind == "speed":  # against the ceiling measured earlier in the run, and torch float32
        row, done = paper.row(row_id), {x["key"]: r["data"] for x in read_lines(plan.out_dir)
                                        for r in x["rows"] if "data" in r}
        r = bench.bench_row(row, configurations(plan.device)[eid], *(
            (2, 1) if plan.quick else (60, 3)), batch_size=8 if plan.quick else None,
            model=ModelConfig(classes=row.classes, memory=row.memory, n=1, k=0.5)
            if plan.quick else None, ceiling=done.get("speed ceiling"))
        return [_row("ok", f"{r['sec_per_epoch']:.2f} s/epoch", bench.describe(
            r, done.get(f"speed {row_id} torch float32")), data=r)]
    results = []
    if rest == "references":
        results.append(verify.verify_references(plan.device))
    for name, cfg, train in [] if rest == "references" else \
            verify.DEFAULT_CONFIGS[:1 if plan.quick else 2]:
        if rest == "torch":  # the GPU against the CPU
            results += verify.verify_device(cfg, train, name, plan.device)
        else:  # the JAX mode against torch, both on the device
            results += verify.verify_backends(cfg, train, f"{name} on {plan.device}",
                                              backends=(("torch", t64), ("theano-jax", j64)))
    worst = [max(r.diffs, key=lambda k: r.diffs[k] / r.tol(k)) for r in results]
    return [_row("PASS" if r.passed else "FAIL", f"{r.diffs[w]:.3e}",
                 f"worst: {w} (<= {r.tol(w):g})", check=r.name) for r, w in zip(results, worst)]


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
        return [_row(NOT_FINISHED, detail=f"stopped after {limit:.0f} s; log {log}")]
    tail = f"exit {p.returncode}: " + (log.read_text(errors="replace").strip().splitlines()
                                       or [""])[-1] + f" (log {log})"
    kind, _, row = key.partition(" ")
    runs = Path(argv[argv.index("--out-dir") + 1]) if "--out-dir" in argv else None
    if kind == "smoke":  # the training loss must fall over the three epochs
        losses = [e["train_loss"] for log in runs.glob(f"smoke/*/seed0/{runlog.LOG}")
                  for e in runlog.read_log(log) if e["phase"] == "final" and not p.returncode]
        figure = " > ".join(f"{v:.3f}" for v in losses)
        if len(losses) == 3 and losses[-1] < losses[0]:
            return [_row("PASS", figure)]
        return [_row("MISSING" if p.returncode == 2 else "FAIL", figure, tail)]
    if kind == "real":
        return [real_row(runs / "table1" / row / "seed0", p.returncode, tail)]
    try:
        return runlog.read_json(log.with_suffix(".json"))
    except CRMNError:
        return [_row("FAIL", detail=tail)]


def real_row(run_dir: Path, rc: int, tail: str) -> Dict:
    """The real-data check's row from the run's summary.json, beside He et al.'s figure."""
    s = runlog.finished_summary(run_dir)
    if s is None:  # exit 2: the backend or an option is not there
        return _row("MISSING" if rc == 2 else "FAIL", detail=f"{tail}; {run_dir} did not "
                    "finish: run gpucheck again to continue it")
    acc = 100 * s["test_acc"]
    return _row("ok", f"{acc:.2f} % (He et al. {HE_ACC} %)", f"{s['final_epochs']} epochs, "
                f"{s['backend']} on {s['device']}; {s['data']}; run {run_dir}",
                data={"test_acc": acc, "he_acc": HE_ACC, "run_dir": str(run_dir)})


def render(out_dir: Path, seconds: float, running: Optional[str] = None) -> Dict:
    """``gpucheck.json`` and ``gpucheck.md`` from the lines of ``gpucheck.jsonl``."""
    lines = read_lines(out_dir)
    rows = [{"part": x["key"].split()[0], "check": x["key"], **r, "key": x["key"],
             "seconds": x["seconds"], "expected_s": x["expected_s"]}
            for x in lines if "rows" in x for r in x["rows"]]
    failed = sum(r["status"] == "FAIL" for r in rows) + (len(rows) > 1 and all(  # nothing
        r["status"] == "MISSING" for r in rows[1:]))  # could be built here: a failure too
    cut = next((x["cut"] for x in lines if "cut" in x), None)
    report = {**lines[0]["plan"], "environment": lines[0]["environment"], "seconds":
              round(seconds, 1), "running": running, "cut_short": cut, "checks": rows,
              "failed": failed, "not_run": sum(r["status"].endswith("budget") for r in rows)}
    took = f"{seconds:.0f} s of a {report['budget']:.0f} s budget"
    state = (f"**Cut short** by {cut['signal']} after {cut['after_s']:.0f} s in check `"
             f"{cut['check'] or 'between checks'}`; the rows below finished before it." if cut
             else f"**Running** `{running}` ({took} so far); if this is the last word, the run "
             f"was killed there." if running else f"Complete: {took}; {failed} failed, "
             f"{report['not_run']} not run for the budget.")
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
            _row("ok", env["python"], plan.device)], "environment": env, "plan": vars(plan)})
        for key in plan_checks(plan):
            need = NEEDS[key][2 if plan.quick else int(plan.device == "cpu")]
            left, t = plan.budget - (time.monotonic() - t0), time.monotonic()
            line = {"key": key, "seconds": None, "expected_s": need, "rows": [
                _row(NOT_RUN, detail=f"needs {need:.0f} s, {max(left, 0):.0f} s left")]}
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


if __name__ == "__main__":  # one check in a child: KEY DEVICE OUT_DIR [--quick] (child_argv)
    plan = GpucheckPlan(sys.argv[2], sys.argv[4:] == ["--quick"], Path(sys.argv[3]))
    try:
        rows = check_rows(plan, sys.argv[1])
    except CRMNError as exc:  # one line; the later checks still run
        rows = [_row("MISSING" if isinstance(exc, ConfigError) else "FAIL", detail=str(exc))]
    runlog.write_json(plan.out_dir / "logs" / (sys.argv[1].replace(" ", "-") + ".json"), rows)
