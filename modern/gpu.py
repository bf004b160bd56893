"""A whole epoch's augmented batches in a few batched kernels, from data resident on a device.

airbench's recipe: the training set is copied to the GPU once, zero-padded once, and every
epoch the sampler's :class:`crmn.data.EpochPlan` (image order, crop offsets, flips: every
random choice of the epoch, drawn by the framework-free sampler) is applied to all images at
once with gather kernels. The result is bit for bit the batches that
``crmn.data.BatchSampler.epoch`` yields on the CPU, so both stacks and both devices see the
same data for the same seed (SPEC §6). The functions run on any torch device; the tests
compare them with the sampler on CPU tensors.
"""
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
    """Copy images (N, 3, 32, 32) and labels (N,) to ``device``, zero-padded by ``pad``.

    The padding is zeros after normalisation, as the sampler pads (SPEC §4).
    """
    xt = torch.as_tensor(np.asarray(x), dtype=dtype).to(device)
    xpad = F.pad(xt, (pad, pad, pad, pad))  # (N, 3, 32+2p, 32+2p)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.int64).to(device)
    return ResidentData(xpad=xpad, y=yt, pad=pad, source=x)


def gather_epoch(data: ResidentData, order, dy, dx, flip) -> tuple:
    """Apply one epoch's plan to the resident images: crops and flips for all positions.

    Parameters
    ----------
    data : ResidentData
    order : int array (M,)
        Image index of each position of the epoch (M = batches × batch size).
    dy, dx : int arrays (M,)
        Crop offsets in 0..2·pad into the padded image, per position.
    flip : bool array (M,)
        Mirror the crop left-right, per position.

    Returns
    -------
    x : Tensor (M, 3, 32, 32), y : Tensor (M,) int64
        Batch ``b`` is ``x[b·B:(b+1)·B]``.
    """
    dev = data.xpad.device
    order = torch.as_tensor(np.asarray(order, dtype=np.int64)).to(dev)
    dy = torch.as_tensor(np.asarray(dy, dtype=np.int64)).to(dev)
    dx = torch.as_tensor(np.asarray(dx, dtype=np.int64)).to(dev)
    flip = torch.as_tensor(np.asarray(flip, dtype=bool)).to(dev)
    ar = torch.arange(IMAGE, device=dev)
    rows = dy[:, None] + ar  # (M, 32)
    # a flipped crop reads its columns right to left
    cols = dx[:, None] + torch.where(flip[:, None], IMAGE - 1 - ar, ar)  # (M, 32)
    C = data.xpad.shape[1]
    ch = torch.arange(C, device=dev)
    x = data.xpad[order[:, None, None, None], ch[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]  # (M, C, 32, 32)
    return x, data.y[order]
