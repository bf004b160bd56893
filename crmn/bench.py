"""Training speed per paper row against the paper's seconds per epoch (Table 1).

Each row trains for a fixed number of SGD steps on synthetic CIFAR-shaped data (random
normal images, random labels: speed does not depend on the pixels) through the training
loop's own :func:`crmn.train.train_epoch`, so the GPU path's resident data, per-epoch gather
and captured step are what is timed. A short warm-up epoch first (graph compilation, cuDNN autotuning, CUDA-graph
capture) is timed and reported apart. Printed per row: images/s, seconds per 50,000-image
epoch, the paper's seconds per epoch (``crmn.paper``) and the speed-up over the paper::

    run_experiments.sh bench --backend torch --device cuda --steps 500
    run_experiments.sh bench --rows t1-resnet32x1 --device cpu --steps 5 --json bench.json

The paper's "seconds per epoch" is read as one pass over CIFAR-100's 50,000 training images.
"""
from __future__ import annotations

import time
from typing import Dict, Optional, Sequence

import numpy as np

from crmn import paper, stacks
from crmn.config import ModelConfig, TrainConfig
from crmn.data import BatchSampler
from crmn.errors import ConfigError
from crmn.train import train_epoch

EPOCH_IMAGES = 50_000  # CIFAR-100 training set: the paper's epoch


def _sampler(rng, steps: int, classes: int, train: TrainConfig) -> BatchSampler:
    """``steps`` batches of random CIFAR-shaped images and labels (speed ignores pixels)."""
    n = steps * train.batch_size
    x = rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, classes, n).astype(np.int64)
    return BatchSampler(x, y, train.batch_size, seed=train.seed, pad=train.pad)


def bench_row(row: paper.Row, backend: str, device: str, precision: str, steps: int,
              warmup: int = 3, batch_size: Optional[int] = None, seed: int = 0,
              compile: bool = False, channels_last: Optional[bool] = None,
              theano_mode: str = stacks.DEFAULT_THEANO_MODE) -> Dict:
    """Time ``steps`` SGD steps of ``row``; returns the figures of one table line.

    Returns
    -------
    dict with ``row, label, backend, stack`` (``theano-c``, ``theano-jax`` or ``torch``),
    ``device, precision, batch_size, steps, warmup_s`` (first epoch of ``warmup`` steps:
    compile / capture), ``compile_s`` (of which compiling), ``seconds`` (the ``steps``
    steps), ``images_per_s``, ``sec_per_epoch`` (50,000 images), ``paper_sec_per_epoch``
    and ``speedup`` (paper / ours).
    """
    model = ModelConfig.for_row(row)
    train = TrainConfig.for_row(row, seed=seed)
    if batch_size is not None:
        train = TrainConfig(batch_size=batch_size, lr_stages=row.lr_stages, seed=seed)
    B = train.batch_size
    if compile or channels_last is not None:
        if backend != "torch":
            raise ConfigError("--compile and --channels-last/--channels-first need "
                              "--backend torch")
        from modern.backend import TorchBackend

        be = TorchBackend(model, train, device=device, dtype=precision, compile=compile,
                          channels_last=channels_last)
    else:
        be = stacks.build(backend, model, train, device=device, dtype=precision,
                          theano_mode=theano_mode)
    layout = "channels-last" if getattr(be, "channels_last", False) else "channels-first"
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    warm = train_epoch(be, _sampler(rng, warmup, model.classes, train), 0, 0.01)
    s = _sampler(rng, steps, model.classes, train)
    if getattr(be, "fast_epoch", False):  # the torch GPU path copies the training set once
        be.resident(s)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = train_epoch(be, s, 1, 0.01)  # ends with a host sync: device work is finished
    seconds = time.perf_counter() - t0
    ips = stats.images / seconds
    ours = EPOCH_IMAGES / ips
    theirs = row.paper_sec_per_epoch
    return {
        "row": row.id, "label": row.label, "backend": backend,
        "stack": f"theano-{theano_mode}" if backend == "theano" else backend,
        "device": be.device, "compile_s": warm.compile_seconds,
        "precision": precision + ("+compile" if compile else ""), "layout": layout,
        "batch_size": B, "steps": steps, "warmup_s": warmup_s,
        "seconds": seconds, "images_per_s": ips, "sec_per_epoch": ours,
        "paper_sec_per_epoch": theirs,
        "speedup": (theirs / ours) if theirs else None, "loss": stats.loss,
    }


def format_table(results: Sequence[Dict]) -> str:
    head = (f"{'row':16s} {'model':15s} {'stack':10s} {'batch':>5s} {'img/s':>9s} "
            f"{'s/epoch':>8s} {'paper s':>8s} {'speedup':>8s} {'warm-up s':>9s} "
            f"{'compile s':>9s}")
    lines = [head, "-" * len(head)]
    for r in results:
        paper_s = f"{r['paper_sec_per_epoch']:8.0f}" if r["paper_sec_per_epoch"] else f"{'-':>8s}"
        # three significant digits: a CPU run is a small fraction of the paper's speed
        speed = f"{r['speedup']:7.3g}x" if r["speedup"] else f"{'-':>8s}"
        lines.append(f"{r['row']:16s} {r['label']:15s} {r.get('stack', '-'):10s} "
                     f"{r['batch_size']:5d} {r['images_per_s']:9.0f} "
                     f"{r['sec_per_epoch']:8.2f} {paper_s} {speed} {r['warmup_s']:9.1f} "
                     f"{r.get('compile_s', 0.0):9.1f}")
    return "\n".join(lines)


def mode_ratios(results: Sequence[Dict]) -> str:
    """Per row timed in all three stacks: the JAX mode's step time against the torch
    stack's and the C mode's, and the C mode's compile time against the JAX mode's."""
    lines = []
    for row in dict.fromkeys(r["row"] for r in results):
        by = {r["stack"]: r for r in results if r["row"] == row}
        if not {"theano-jax", "theano-c", "torch"} <= set(by):
            continue
        jax, c, torch = by["theano-jax"], by["theano-c"], by["torch"]
        compile_ratio = (c["compile_s"] / jax["compile_s"]) if jax["compile_s"] else None
        lines.append(f"{row}: theano-jax step = {jax['sec_per_epoch'] / torch['sec_per_epoch']:.2f}"
                     f" x torch, {jax['sec_per_epoch'] / c['sec_per_epoch']:.2f} x theano-c; "
                     f"theano-c compile = " + (f"{compile_ratio:.1f} x theano-jax"
                                               if compile_ratio else "-") +
                     f" ({c['compile_s']:.1f} s vs {jax['compile_s']:.1f} s; C modules cached "
                     "in ~/.theano compile faster the second time)")
    return "\n".join(lines)
