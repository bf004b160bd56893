"""A whole epoch's augmented batches in a few gather kernels from the padded training set
kept on the device (airbench's recipe); bit for bit ``BatchSampler.epoch``'s (docs/spec.md §6)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE = 32  # CIFAR / SVHN crop size, pixels


@dataclass
class ResidentData:
    """A training set on a device: padded images (N, 3, 32+2p, 32+2p) and labels (N,)."""

    xpad: torch.Tensor
    y: torch.Tensor
    pad: int
    source: object  # the host array it came from (keeps its id unique while cached)


def make_resident(x: np.ndarray, y: np.ndarray, pad: int, device: torch.device,
                  dtype: torch.dtype) -> ResidentData:
    """Images (N, 3, 32, 32) and labels (N,) on ``device``, zero-padded as the sampler pads."""
    xt = torch.as_tensor(np.asarray(x), dtype=dtype).to(device)
    xpad = F.pad(xt, (pad, pad, pad, pad))  # (N, 3, 32+2p, 32+2p)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.int64).to(device)
    return ResidentData(xpad=xpad, y=yt, pad=pad, source=x)


def gather_epoch(data: ResidentData, order, dy, dx, flip) -> tuple:
    """An epoch plan's ``order``, crop offsets ``dy, dx`` and ``flip`` (M,) applied to the
    resident images: ``x`` (M, 3, 32, 32) and ``y`` (M,) int64."""
    dev = data.xpad.device
    order, dy, dx = (torch.as_tensor(np.asarray(a, dtype=np.int64)).to(dev)
                     for a in (order, dy, dx))
    flip = torch.as_tensor(np.asarray(flip, dtype=bool)).to(dev)
    ar = torch.arange(IMAGE, device=dev)
    rows = dy[:, None] + ar  # (M, 32)
    cols = dx[:, None] + torch.where(flip[:, None], IMAGE - 1 - ar, ar)  # flipped: right to left
    ch = torch.arange(data.xpad.shape[1], device=dev)
    x = data.xpad[order[:, None, None, None], ch[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]  # (M, C, 32, 32)
    return x, data.y[order]
