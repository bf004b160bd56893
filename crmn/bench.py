"""Training speed per paper row against the paper's seconds per epoch (Table 1): fixed SGD
steps on random CIFAR-shaped data through :func:`crmn.train.train_epoch`, after a warm-up epoch
timed apart. Theano's compile shows cold (``cache``: hit, miss or off) and warm (a second build
right after, which finds what the first stored)."""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from crmn import paper, registry, roofline, tables
from crmn.config import ModelConfig, TrainConfig
from crmn.data import BatchSampler
from crmn.registry import BackendOptions
from crmn.train import train_epoch

EPOCH_IMAGES = 50_000  # CIFAR-100 training set: the paper's epoch


def _sampler(rng, steps: int, classes: int, train: TrainConfig) -> BatchSampler:
    n = steps * train.batch_size
    x = rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, classes, n).astype(np.int64)
    return BatchSampler(x, y, train.batch_size, seed=train.seed, pad=train.pad)


def bench_row(row: paper.Row, options: BackendOptions, steps: int, warmup: int = 3,
              batch_size: Optional[int] = None, seed: int = 0,
              channels_last: Optional[bool] = None, model: Optional[ModelConfig] = None,
              ceiling: Optional[Dict] = None, ready: Optional[Callable[[], None]] = None) -> Dict:
    """The figures of one table line: ``steps`` SGD steps of ``row`` in ``options``' backend.
    ``model``: another network in the row's protocol (``speedup`` is then None); ``ceiling``:
    :func:`crmn.roofline.measure_ceiling`'s, for the utilisation columns; ``ready``: called
    between the warm-up and the timed steps (gpucheck's packing lines up K processes there)."""
    own = model is None
    model = ModelConfig.for_row(row) if own else model
    train = TrainConfig.for_row(row, seed=seed)
    if batch_size is not None:
        train = TrainConfig(batch_size=batch_size, lr_stages=row.lr_stages, seed=seed)
    expert = {} if channels_last is None else {"channels_last": channels_last}
    name = registry.label(options)
    precision = options.dtype + ("+compile" if options.compile else "")
    roofline.reset_peak_memory(name, options.device)
    backend = registry.build(options, model, train, **expert)
    layout = "channels-last" if getattr(backend, "channels_last", False) else "channels-first"
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    warm = train_epoch(backend, _sampler(rng, warmup, model.classes, train), 0, 0.01)
    s = _sampler(rng, steps, model.classes, train)
    if getattr(backend, "fast_epoch", False):  # the backend's fast path copies the data once
        backend.resident(s)
    warmup_s = time.perf_counter() - t0
    if ready is not None:
        ready()
    t0 = time.perf_counter()
    stats = train_epoch(backend, s, 1, 0.01)  # ends with a host sync: device work is finished
    seconds = time.perf_counter() - t0
    rebuilt = None  # the warm column: a second build's first step, finding the cache filled
    if options.backend == "theano" and options.compile_cache:
        again = registry.build(options, model, train, **expert)
        rebuilt = train_epoch(again, _sampler(rng, 1, model.classes, train), 0, 0.01)
    ips = stats.images / seconds
    ours = EPOCH_IMAGES / ips
    theirs = row.paper_sec_per_epoch if own else None
    return {
        "row": row.id, "label": row.label, "backend": name,
        "device": backend.device, "compile_s": warm.compile_seconds,
        "cache_outcome": getattr(backend, "cache_outcome", None),
        "warm_compile_s": rebuilt.compile_seconds if rebuilt else None,
        "warm_cache_outcome": rebuilt.cache_outcome if rebuilt else None,
        "precision": precision, "layout": layout,
        "batch_size": train.batch_size, "steps": steps, "warmup_s": warmup_s,
        "seconds": seconds, "images_per_s": ips, "sec_per_epoch": ours,
        "paper_sec_per_epoch": theirs, "speedup": (theirs / ours) if theirs else None,
        "loss": stats.loss, **roofline.utilisation(model, ips, name, precision, ceiling),
        **roofline.peak_memory(name, options.device),
    }


def _figure(r: Dict, key: str, unit: float, spec: str) -> str:
    """``r[key] / unit`` formatted, "-" where missing (older JSON, no peak)."""
    value = r.get(key)
    return "-" if value is None else format(value / unit, spec)


def format_table(results: Sequence[Dict]) -> str:
    """The bench table (GFLOP/img: forward + backward per trained image)."""
    body = [[r["row"], r["label"], r.get("backend", "-"), r["batch_size"],
             f"{r['images_per_s']:.0f}", f"{r['sec_per_epoch']:.2f}",
             f"{r['paper_sec_per_epoch']:.0f}" if r["paper_sec_per_epoch"] else "-",
             f"{r['speedup']:.3g}x" if r["speedup"] else "-", f"{r['warmup_s']:.1f}",
             f"{r.get('compile_s', 0.0):.1f}", r.get("cache_outcome") or "-",
             "-" if r.get("warm_compile_s") is None else f"{r['warm_compile_s']:.1f}",
             _figure(r, "flops_per_image", 1e9, ".3g"), _figure(r, "tflops", 1, ".3g"),
             roofline.share(r.get("ceiling_fraction")),
             _figure(r, "peak_mem_bytes", 2 ** 20, ".0f")]
            for r in results]
    return tables.markdown(["row", "model", "backend", "batch", "img/s", "s/epoch", "paper s",
                            "speedup", "warm-up s", "cold compile s", "cache",
                            "warm compile s", "GFLOP/img", "TFLOP/s", "of ceiling",
                            "peak MiB"], body, align="lllrrrrrrrlrrrrr")


def describe(r: Dict, torch_f32: Optional[Dict] = None) -> str:
    """One line on a timed row: its speed beside the goals (bfloat16 >= 100x the paper,
    Theano-JAX float32 within 1.5x of ``torch_f32``), the roofline."""
    out = [f"{r['speedup']:.3g}x the paper" if r["speedup"] else "tiny network"]
    if r["speedup"] and r["precision"].startswith("bfloat16"):
        out[0] += f" (goal >= 100x: {'met' if r['speedup'] >= 100 else 'not met'})"
    if r["speedup"] and r["backend"] == "theano-jax" and torch_f32:
        x = r["sec_per_epoch"] / torch_f32["sec_per_epoch"]
        out.append(f"{x:.2f}x torch float32's time (goal <= 1.5x: "
                   f"{'met' if x <= 1.5 else 'not met'})")
    out += [f"compile {r['compile_s']:.1f} s", f"{r['tflops']:.3g} TFLOP/s "
            f"({r['flops_per_image'] / 1e9:.3g} GFLOP/image) = "
            f"{roofline.share(r['ceiling_fraction'])} of the ceiling"]
    if r["peak_mem_bytes"] is not None:
        out.append(f"peak {r['peak_mem_bytes'] / 2 ** 20:.0f} MiB ({r['peak_mem_kind']})")
    return "; ".join(out + [f"{r['precision']} on {r['device']}"])


def describe_ceiling(c: Dict) -> str:
    tf = {k: "-" if c.get(k + "_tflops") is None else f"{c[k + '_tflops']:.3g}"
          for k in ("fp32", "tf32", "bf16")}
    return (f"ceiling on {c['device']} ({c['library']}, {c['gemm_side']}-square products, "
            f"best of {c['seconds']:.1f} s): float32 {tf['fp32']}, tf32 {tf['tf32']}, "
            f"bfloat16 {tf['bf16']} TFLOP/s; copy {c['copy_gb_s']:.3g} GB/s")


def mode_ratios(results: Sequence[Dict]) -> str:
    """Per row timed in all three backends: the JAX mode's step and compile against the others'."""
    lines = []
    for row in dict.fromkeys(r["row"] for r in results):
        by = {r["backend"]: r for r in results if r["row"] == row}
        if {"theano-jax", "theano-c", "torch"} <= set(by):
            jax, c, torch = by["theano-jax"], by["theano-c"], by["torch"]
            ratio = f"{c['compile_s'] / jax['compile_s']:.1f} x" if jax["compile_s"] else "-"
            step = jax["sec_per_epoch"]
            lines.append(f"{row}: theano-jax step = {step / torch['sec_per_epoch']:.2f} x torch, "
                         f"{step / c['sec_per_epoch']:.2f} x theano-c; "
                         f"theano-c compile = {ratio} theano-jax ({c['compile_s']:.1f} s vs "
                         f"{jax['compile_s']:.1f} s cold; Theano's cached C modules compile "
                         "faster the second time)")
    return "\n".join(lines)
