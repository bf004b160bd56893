"""Throughput of the batch sampler (:class:`crmn.data.BatchSampler`) on the CPU."""
from __future__ import annotations

import time
from typing import Dict

import numpy as np

from crmn.data.sampler import BatchSampler

PAD = 4  # zero padding per side before the random crop, as in training


def time_sampler(n: int = 10000, batch_size: int = 100, epochs: int = 2,
                 seed: int = 0) -> Dict[str, object]:
    """Images per second of :class:`BatchSampler`, flips off and on, over ``epochs``."""
    if n < 1 or batch_size < 1 or batch_size > n or epochs < 1:
        raise ValueError(f"need n >= batch_size >= 1 and epochs >= 1, got n={n}, "
                         f"batch_size={batch_size}, epochs={epochs}")
    x = np.random.default_rng(seed).standard_normal((n, 3, 32, 32), dtype=np.float32)
    y = np.zeros(n, dtype=np.int64)
    out: Dict[str, object] = {"n": n, "batch_size": batch_size, "epochs": epochs, "pad": PAD,
                              "numpy": np.__version__}
    for key, flip in (("flip_off", False), ("flip_on", True)):
        sampler = BatchSampler(x, y, batch_size, seed, pad=PAD, flip=flip)
        t0 = time.perf_counter()
        images = sum(len(xb) for e in range(epochs) for xb, _ in sampler.epoch(e))
        dt = time.perf_counter() - t0
        out[key] = {"images": images, "seconds": dt, "images_per_s": images / dt,
                    "ms_per_batch": 1e3 * dt / (epochs * len(sampler))}
    return out
