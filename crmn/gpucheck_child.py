"""One gpucheck check in a process of its own (``python -m crmn.gpucheck_child KEY DEVICE
OUT_DIR [--quick]``, :func:`crmn.gpucheck.child_argv`): its rows in ``logs/KEY.json``."""
from __future__ import annotations

import multiprocessing
import os
import queue as queues
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

from crmn import registry, runlog
from crmn.errors import ConfigError, CRMNError, RunError
from crmn.gpucheck import (LASAGNE_CHECK, NEEDS, ROOT, GpucheckPlan, configurations,
                           read_lines, row)
from crmn.registry import BackendOptions

PACKING_K = (1, 2, 4, 8)  # concurrent processes of one row tried in turn (--quick: 1, 2)
LASAGNE_SDIST = "Lasagne-0.1.tar.gz"  # in $CRMN_WHEELS (scripts/lasagne_tests.sh fetches it)


def _bench(row_id: str, options: BackendOptions, quick: bool, steps: Tuple[int, int],
           **kw) -> Dict:
    """bench.bench_row of ``row_id``: 60 steps, or (``quick``) ``steps`` of a tiny network."""
    from crmn import bench, paper
    from crmn.config import ModelConfig
    paper_row = paper.row(row_id)
    if not quick:
        return bench.bench_row(paper_row, options, 60, 3, **kw)
    model = ModelConfig(classes=paper_row.classes, memory=paper_row.memory, n=1, k=0.5)
    return bench.bench_row(paper_row, options, *steps, batch_size=8, model=model, **kw)


def _pack_one(row_id: str, options: BackendOptions, quick: bool, barrier, queue) -> None:
    """One of K processes timing ``row_id`` at once: (start, end, images, peak memory)."""
    start = []

    def ready() -> None:  # every process warmed up (compiled): the K time their steps together
        barrier.wait()
        start.append(time.time())
    r = _bench(row_id, options, quick, (4, 2), ready=ready)
    queue.put((start[0], start[0] + r["seconds"], r["images_per_s"] * r["seconds"],
               r["peak_mem_bytes"]))


def _pack(plan: GpucheckPlan, row_id: str, options: BackendOptions, k: int) -> List[tuple]:
    """:func:`_pack_one`'s figures of ``k`` processes started together."""
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
    """K = 1, 2, 4, 8 processes of ``row_id`` (torch bfloat16 + compile) at once, each with its
    share of the cores, while the speed-up grows; on a GPU kept for crmn/cost.py's estimate."""
    from crmn import cost
    options = configurations(plan.device)["torch bfloat16"]
    registry.probe(options)
    budget, t0 = NEEDS[f"packing {row_id}"][2 if plan.quick else 0], time.monotonic()
    memory = None
    if plan.device.startswith("cuda"):
        import torch
        memory = torch.cuda.get_device_properties(torch.device(plan.device)).total_memory
    rows, cores = [], len(os.sched_getaffinity(0))
    table = {"speedup": {}, "images_per_s": {}, "peak_mem_bytes": {}}
    for k in PACKING_K[:2] if plan.quick else PACKING_K:
        peak = max(table["peak_mem_bytes"].values(), default=0)
        late = not plan.quick and rows and (time.monotonic() - t0) * 2 > budget
        if late or (memory and k * peak > 0.9 * memory):
            break  # twice what it took so far would not fit its budget; or K copies its memory
        threads = str(max(1, cores // k))
        os.environ["OMP_NUM_THREADS"] = threads  # inherited by the K processes
        got = _pack(plan, row_id, options, k)
        rate = sum(g[2] for g in got) / (max(g[1] for g in got) - min(g[0] for g in got))
        speedup = rate / table["images_per_s"].get("1", rate)
        peak = max(g[3] or 0 for g in got)
        table["speedup"][str(k)], table["images_per_s"][str(k)] = speedup, rate
        table["peak_mem_bytes"][str(k)] = peak
        rows.append(row("ok", f"K={k}: {rate:.0f} img/s together, {speedup:.2f}x K=1",
                        f"peak {peak / 2 ** 20:.0f} MiB each, {threads} threads each; "
                        f"{options.describe()}", check=f"packing {row_id} K={k}",
                        data={"k": k, "images_per_s": rate, "speedup": speedup}))
        if k > 1 and speedup <= table["speedup"].get(str(k // 2), 0):
            break  # the speed-up stopped growing
    gpu = not plan.quick and cost.gpu_model()
    if gpu:  # the cost estimate's figures: the slower row's at each K
        by_row = {**(cost.read_packing(gpu) or {}).get("rows", {}), row_id: table}
        shared = set.intersection(*(set(t["speedup"]) for t in by_row.values()))
        cost.record_packing(gpu, {"gpu": gpu, "memory_bytes": memory, "rows": by_row,
                                  "speedup": {k: min(t["speedup"][k] for t in by_row.values())
                                              for k in sorted(shared, key=int)}})
    return rows


def lasagne_example(name: str, folder: Path) -> Path:
    """Lasagne 0.1's ``examples/<name>`` into ``folder``, byte for byte from its source archive."""
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
    """examples/mnist.py cnn's seconds in JAX mode on the device and on the CPU (one epoch)."""
    folder = plan.out_dir / "lasagne"
    folder.mkdir(parents=True, exist_ok=True)
    script = lasagne_example("mnist.py", folder)
    write_mnist(folder / "mnist.pkl.gz")
    seconds, env = {}, {**os.environ, "PYTHONPATH": str(ROOT)}
    for device in dict.fromkeys((plan.device, "cpu")):
        record = folder / f"cnn-{device}.json"
        argv = [sys.executable, "-m", "crmn.cli", "lasagne", "--theano-mode", "jax", "--device",
                device, "--record", str(record), script.name, "cnn", "1"]
        rc = subprocess.run(argv, cwd=folder, env=env).returncode
        if rc:
            raise RunError(f"examples/mnist.py cnn on {device} exited {rc}: see its output in "
                           f"{plan.out_dir / 'logs'}")
        seconds[device] = runlog.read_json(record)["seconds"]
    figure = ", ".join(f"{d} {s:.1f} s" for d, s in seconds.items())
    return row("ok", figure, "examples/mnist.py cnn through JAX mode, one epoch of 10,000 "
               "synthetic images, float32, compile included", data=seconds)


def check_rows(plan: GpucheckPlan, key: str) -> List[Dict]:
    """The rows of check ``key``: Lasagne's example, packing, the ceiling, speed or verify."""
    from crmn import bench, roofline, verify
    kind, _, rest = key.partition(" ")
    row_id, _, config = rest.partition(" ")
    if key == LASAGNE_CHECK:
        return [lasagne_cnn_row(plan)]
    if kind == "packing":
        return packing_rows(plan, rest)
    if rest == "ceiling":  # torch must see the GPU; on the CPU there is nothing to probe
        if plan.device != "cpu":
            registry.probe(BackendOptions("torch", plan.device))
        c = roofline.measure_ceiling(plan.device)
        return [row("ok", f"fp32 {c['fp32_tflops']:.3g} TFLOP/s", bench.describe_ceiling(c),
                    data=c)]
    if kind == "speed":  # against the ceiling measured earlier in the run, and torch float32
        options = configurations(plan.device)[config]
        registry.probe(options)
        done = {x["key"]: r["data"] for x in read_lines(plan.out_dir) for r in x["rows"]
                if "data" in r}
        r = _bench(row_id, options, plan.quick, (2, 1), ceiling=done.get("speed ceiling"))
        return [row("ok", f"{r['sec_per_epoch']:.2f} s/epoch",
                    bench.describe(r, done.get(f"speed {row_id} torch float32")), data=r)]
    t64 = BackendOptions("torch", plan.device, "float64")
    j64 = BackendOptions("theano", plan.device, "float64", theano_mode="jax")
    for options in {"torch": [t64], "references": [j64]}.get(rest, [t64, j64]):
        registry.probe(options)  # what the check builds must be there (else the row says MISSING)
    results, configs = [], verify.DEFAULT_CONFIGS[:1 if plan.quick else 2]
    if rest == "references":
        results, configs = [verify.verify_references(plan.device)], []
    for name, cfg, train in configs:
        if rest == "torch":  # the GPU against the CPU
            results += verify.verify_device(cfg, train, name, plan.device)
        else:  # the JAX mode against torch, both on the device
            results += verify.verify_backends(cfg, train, f"{name} on {plan.device}",
                                              backends=(("torch", t64), ("theano-jax", j64)))
    worst = [max(r.diffs, key=lambda k: r.diffs[k] / r.tol(k)) for r in results]
    return [row("PASS" if r.passed else "FAIL", f"{r.diffs[w]:.3e}",
                f"worst: {w} (<= {r.tol(w):g})", check=r.name) for r, w in zip(results, worst)]


if __name__ == "__main__":  # KEY DEVICE OUT_DIR [--quick]
    plan = GpucheckPlan(sys.argv[2], sys.argv[4:] == ["--quick"], Path(sys.argv[3]))
    try:
        rows = check_rows(plan, sys.argv[1])
    except CRMNError as exc:  # one line; the later checks still run
        rows = [row("MISSING" if isinstance(exc, ConfigError) else "FAIL", detail=str(exc))]
    runlog.write_json(plan.out_dir / "logs" / (sys.argv[1].replace(" ", "-") + ".json"), rows)
