"""Time the captured train step of paper rows under several settings, on a GPU.

A development tool beside :mod:`crmn.bench` (which times whole epochs through the Backend):
this one replays the CUDA graph of one step ``--steps`` times between CUDA events, for each
variant, so settings can be compared in one call; ``--kernels`` also lists the most costly
kernels of one eager step (torch.profiler). ::

    python -m modern.profile_step --rows t1-resnet32x1 --variants fp32,bf16,bf16-native
    python -m modern.profile_step --rows t1-resnet134x1 --variants bf16,bf16-percast --count-ops --device cpu

``--count-ops`` counts instead of timing: the aten operators one eager step dispatches,
views left out (they launch no kernel), by name. It runs on the CPU too, where the counts
mirror what a GPU step launches, up to how each operator splits into kernels.

Variants: ``fp32`` / ``bf16`` (dtype float32 / bfloat16), suffixes ``-cl`` (channels last),
``-nocl`` (no channels last), ``-cudnnbn`` (cuDNN batch norm instead of the native one),
``-compile`` (torch.compile'd forward inside the graph), ``-notf32``, ``-percast`` (bf16:
autocast casts each weight at its use, instead of the backend's one cast per step).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
import time
from typing import Optional

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from crmn import paper
from crmn.config import ModelConfig, TrainConfig
from crmn.errors import ConfigError
from modern import model as model_mod
from modern.backend import TorchBackend


def _backend(row, variant: str, device: str = "cuda", graph: bool = True,
             batch_size: Optional[int] = None) -> TorchBackend:
    parts = variant.split("-")
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[parts[0]]
    opts = dict(dtype=dtype, device=device, graph=graph)
    if "cl" in parts:
        opts["channels_last"] = True
    if "nocl" in parts:
        opts["channels_last"] = False
    if "compile" in parts:
        opts["compile"] = True
    if "notf32" in parts:
        opts["tf32"] = False
    if "percast" in parts:
        opts["cast_once"] = False
    model_mod.BatchNorm.cudnn = "cudnnbn" in parts
    train = TrainConfig.for_row(row)
    if batch_size is not None:
        train = dataclasses.replace(train, batch_size=batch_size)
    return TorchBackend(ModelConfig.for_row(row), train, **opts)


def time_variant(row, variant: str, steps: int, kernels: bool) -> float:
    be = _backend(row, variant)
    B = be.train_cfg.batch_size
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, row.classes, B)
    t0 = time.perf_counter()
    be.train_step(x, y, 0.01)  # capture
    setup = time.perf_counter() - t0
    graph = be._graph[0]
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    epoch = ms * 50_000 / B / 1000
    print(f"{row.id:16s} {variant:18s} {ms:7.3f} ms/step  {epoch:6.2f} s/epoch  "
          f"paper {row.paper_sec_per_epoch} s  x{row.paper_sec_per_epoch / epoch:6.1f}  "
          f"(setup {setup:.1f} s)", flush=True)
    if kernels:
        eager = _backend(row, variant)
        eager.use_graph = False
        for _ in range(3):
            eager.train_step(x, y, 0.01)
        torch.cuda.synchronize()
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eager.train_step(x, y, 0.01)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15,
                                        max_name_column_width=70))
    return ms


class _OpCounter(TorchDispatchMode):
    """Counts the non-view aten operators dispatched under it, by name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_variant(row, variant: str, device: str,
                  batch_size: Optional[int] = None) -> collections.Counter:
    """Operators of one eager train step (the second: the first allocates), printed.

    The count does not depend on the batch size; a small ``batch_size`` makes it quick.
    """
    be = _backend(row, variant, device=device, graph=False, batch_size=batch_size)
    B = be.train_cfg.batch_size
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, row.classes, B)
    be.train_step(x, y, 0.01)
    with _OpCounter() as counter:
        be.train_step(x, y, 0.01)
    c = counter.counts
    top = ", ".join(f"{n} {k}" for n, k in c.most_common(6))
    print(f"{row.id:16s} {variant:18s} {sum(c.values()):6d} ops/step  casts {c['_to_copy']:4d}"
          f"  ({top})", flush=True)
    return c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m modern.profile_step")
    ap.add_argument("--rows", default="t1-resnet32x1")
    ap.add_argument("--variants", default="fp32,bf16")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--count-ops", action="store_true",
                    help="count one eager step's operators instead of timing the graph")
    ap.add_argument("--device", default="cuda", help="with --count-ops: cpu works too")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="with --count-ops: images per step (default: the row's)")
    args = ap.parse_args(argv)
    try:
        rows = paper.select_or_fail(args.rows)
    except ConfigError as e:
        print(f"profile_step: {e}", file=sys.stderr)
        return 2
    for row in rows:
        for v in args.variants.split(","):
            try:
                if args.count_ops:
                    count_variant(row, v, args.device, args.batch_size)
                else:
                    time_variant(row, v, args.steps, args.kernels)
            except Exception as e:  # a variant that fails must not stop the comparison
                print(f"{row.id:16s} {v:18s} FAILED: {type(e).__name__}: {str(e)[:300]}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
