"""Time the torch backend's train step of paper rows under variants such as ``bf16-cl-compile``
(a GPU tool); ``--kernels`` lists the costliest kernels of one eager step, ``--count-ops``
counts the aten operators torch.profiler records (on the CPU too). ``-percast``: autocast
casts each weight at its use instead of once per step."""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
import types
from typing import Callable, Optional

import numpy as np

from crmn import registry
from crmn.config import ModelConfig, TrainConfig
from crmn.errors import ConfigError
from crmn.registry import BackendOptions

_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
_SUFFIXES = {"cl": ("channels_last", True), "nocl": ("channels_last", False),
             "compile": ("compile", True), "notf32": ("tf32", False),
             "percast": ("cast_once", False)}


def variant_options(variant: str) -> dict:
    """TorchBackend keyword arguments of a variant name such as ``bf16-cl-compile``."""
    head, *suffixes = variant.split("-")
    if head not in _DTYPES or any(s not in _SUFFIXES for s in suffixes):
        raise ConfigError(f"unknown variant {variant!r}: a dtype ({', '.join(_DTYPES)}) "
                          f"and suffixes from {', '.join(_SUFFIXES)}")
    return {"dtype": _DTYPES[head], **dict(_SUFFIXES[s] for s in suffixes)}


def _backend(row, variant: str, device: str, graph: bool, batch_size: Optional[int] = None):
    """The torch backend of ``variant`` and one random batch on its device."""
    import torch

    train = TrainConfig.for_row(row)
    if batch_size is not None:
        train = dataclasses.replace(train, batch_size=batch_size)
    expert = variant_options(variant)
    options = BackendOptions("torch", device, expert.pop("dtype"),
                             compile=expert.pop("compile", False))
    backend = registry.build(options, ModelConfig.for_row(row), train, graph=graph, **expert)
    rng, B = np.random.default_rng(0), train.batch_size
    x = torch.as_tensor(rng.standard_normal((B, 3, 32, 32), dtype=np.float32))
    y = torch.as_tensor(rng.integers(0, row.classes, B))
    return backend, x.to(backend.dev), y.to(backend.dev)


def time_variant(row, variant: str, steps: int, kernels: bool, device: str = "cuda",
                 out: Callable[[str], None] = print) -> float:
    """Milliseconds per ``step`` (CUDA graph, batch on the device) of one variant."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    backend, x, y = _backend(row, variant, device, graph=True)
    t0 = time.perf_counter()
    backend.step(x, y, 0.01)  # the first step captures the graph
    setup = time.perf_counter() - t0
    for _ in range(10):
        backend.step(x, y, 0.01)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        backend.step(x, y, 0.01)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    epoch = ms * 50_000 / x.shape[0] / 1000
    out(f"{row.id:16s} {variant:18s} {ms:7.3f} ms/step  {epoch:6.2f} s/epoch  "
        f"paper {row.paper_sec_per_epoch} s  x{row.paper_sec_per_epoch / epoch:6.1f}  "
        f"(setup {setup:.1f} s)")
    if kernels:  # one eager step after three, under the profiler
        eager, x, y = _backend(row, variant, device, graph=False)
        for _ in range(3):
            eager.step(x, y, 0.01)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            eager.step(x, y, 0.01)
            torch.cuda.synchronize()
        out(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15,
                                      max_name_column_width=70))
    return ms


@contextlib.contextmanager
def op_counter():
    """Counts (``.counts``, without ``aten::``) of the aten operators torch.profiler records
    under it: composite operators and views count too, beside the operators they call."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    found = types.SimpleNamespace(counts=collections.Counter())
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        yield found
    found.counts.update({e.key[len("aten::"):]: e.count for e in prof.key_averages()
                         if e.key.startswith("aten::")})


def count_variant(row, variant: str, device: str, batch_size: Optional[int] = None,
                  out: Callable[[str], None] = print) -> collections.Counter:
    """Operators of one eager train step (the second: the first allocates), printed."""
    backend, x, y = _backend(row, variant, device, graph=False, batch_size=batch_size)
    backend.step(x, y, 0.01)
    with op_counter() as counter:
        backend.step(x, y, 0.01)
    c = counter.counts
    top = ", ".join(f"{n} {k}" for n, k in c.most_common(6))
    out(f"{row.id:16s} {variant:18s} {sum(c.values()):6d} ops/step  casts {c['_to_copy']:4d}"
        f"  ({top})")
    return c


def profile(rows, variants, *, steps: int = 100, kernels: bool = False,
            count_ops: bool = False, device: str = "cuda", batch_size: Optional[int] = None,
            out: Callable[[str], None] = print) -> int:
    """Every variant (cmd_profile checks the names) of every row; the number that failed."""
    failed = 0
    for row in rows:
        for v in variants:
            try:
                if count_ops:
                    count_variant(row, v, device, batch_size, out=out)
                else:
                    time_variant(row, v, steps, kernels, device, out=out)
            except Exception as e:  # noqa: BLE001 - one variant must not stop the comparison
                failed += 1
                out(f"{row.id:16s} {v:18s} FAILED: {type(e).__name__}: {str(e)[:300]}")
    return failed
