"""The batch sampler both backends draw from (docs/spec.md §4, §6): every random choice of an
epoch comes from ``default_rng([seed, epoch])``, so a seed means the same batches in both
backends, across a resumed run, and on a GPU that applies the :class:`EpochPlan` itself."""
from __future__ import annotations

from typing import Iterator, NamedTuple, Tuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from crmn.errors import ConfigError


class EpochPlan(NamedTuple):
    """Every random choice of one epoch, independent of the batch size: position ``j`` yields
    ``P[:, dy[j]:dy[j]+H, dx[j]:dx[j]+W]`` of ``P = x[order[j]]`` zero-padded by ``pad``,
    columns reversed when ``flip[j]``; batch ``i`` is positions ``i·B .. (i+1)·B - 1``."""

    epoch: int
    order: np.ndarray  # int64 (N,): a permutation of the training images
    dy: np.ndarray  # int64 (N,): crop row offset in the padded image, 0..2·pad
    dx: np.ndarray  # int64 (N,): crop column offset, 0..2·pad
    flip: np.ndarray  # bool (N,): mirror left-right (all False unless flips are on)


class BatchSampler:
    """Shuffled, padded-and-cropped batches of normalised float32 (N, C, H, W) ``x`` (zeros
    padded after normalisation), the last incomplete one dropped; ``flip``: off in the paper."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int,
                 pad: int = 4, flip: bool = False):
        if x.ndim != 4 or x.dtype != np.float32:
            raise ValueError(f"x must be float32 (N, C, H, W), got {x.dtype}{x.shape}")
        if y.shape != (len(x),):
            raise ValueError(f"y must have shape ({len(x)},), got {y.shape}")
        if batch_size < 1 or batch_size > len(x):
            raise ConfigError(f"batch size {batch_size} does not fit {len(x)} training images")
        if pad < 0:
            raise ConfigError(f"crop padding must be >= 0, got {pad}")
        self.x, self.y = x, np.asarray(y, dtype=np.int64)
        self.batch_size, self.seed, self.pad, self.flip = batch_size, seed, pad, flip

    def __len__(self) -> int:
        return len(self.x) // self.batch_size

    def plan(self, epoch: int) -> EpochPlan:
        """The order, crops and flips of ``epoch`` from ``default_rng([seed, epoch])``, drawn
        in a fixed sequence; flips are drawn even when off, so turning them on moves no crop."""
        rng = np.random.default_rng([self.seed, epoch])
        n, span = len(self.x), 2 * self.pad + 1
        order = rng.permutation(n).astype(np.int64)
        dy = rng.integers(0, span, size=n, dtype=np.int64)
        dx = rng.integers(0, span, size=n, dtype=np.int64)
        flip = (rng.random(n) < 0.5) & self.flip
        return EpochPlan(epoch, order, dy, dx, flip)

    def batch(self, plan: EpochPlan, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """Batch ``i`` of ``plan``, gathered in one indexing of a strided view of all windows."""
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} outside 0..{len(self) - 1}")
        b, p = self.batch_size, self.pad
        sl = slice(i * b, (i + 1) * b)
        idx = plan.order[sl]
        _, c, h, w = self.x.shape
        padded = np.zeros((b, c, h + 2 * p, w + 2 * p), dtype=np.float32)
        padded[:, :, p:p + h, p:p + w] = self.x[idx]
        windows = sliding_window_view(padded, (h, w), axis=(2, 3))  # (B, c, 2p+1, 2p+1, h, w)
        # advanced indices on axes 0, 2, 3 around a slice: the result is (B, c, h, w)
        xb = windows[np.arange(b), :, plan.dy[sl], plan.dx[sl]]
        flip = plan.flip[sl]
        if flip.any():
            xb[flip] = xb[flip, :, :, ::-1]
        return xb, self.y[idx]

    def epoch(self, epoch: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        plan = self.plan(epoch)
        for i in range(len(self)):
            yield self.batch(plan, i)


def iterate_eval(x: np.ndarray, y: np.ndarray,
                 batch_size: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """In-order, un-augmented batches ``(x[s:s+B], y[s:s+B])``, the last one partial."""
    if batch_size < 1:
        raise ConfigError(f"evaluation batch size must be >= 1, got {batch_size}")
    for s in range(0, len(x), batch_size):
        yield x[s:s + batch_size], y[s:s + batch_size]
