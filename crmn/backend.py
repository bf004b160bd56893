"""The contract between the training loop and a backend (docs/spec.md §2): each builds the
network and takes one SGD step (``v <- mu v - lr g``; ``p <- p + v``); state travels as numpy
arrays under :mod:`crmn.naming`'s names, velocities as ``velocity.<name>``."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Protocol, Tuple, runtime_checkable

import numpy as np


@runtime_checkable
class Backend(Protocol):
    """A network built in one framework from ``train.seed``; images ``(B, 3, 32, 32)``, labels
    ``(B,)`` int64. Optional ``compile_seconds`` (kept out of an epoch's seconds); the static
    ``problem(options)`` says why it cannot run them here (None: it can)."""
    name: str  # "theano" | "torch" (the registry's name)
    device: str  # where it actually runs, in words, e.g. "cuda:0 (NVIDIA H100)"

    def param_count(self) -> int:
        """Trainable parameters, counted from the framework's own parameter objects."""

    def step(self, x: Any, y: Any, lr: float) -> Tuple[Any, Any]:
        """One SGD step on one batch: its summed cross-entropy (no weight decay) and correct
        count before the update, as device scalars supporting ``+`` and ``float()``."""

    def logits(self, x: np.ndarray, training: bool) -> np.ndarray:
        """Logits ``(B, classes)``, changing no state; ``training``: batch statistics."""

    def get_state(self) -> Dict[str, np.ndarray]:
        """All arrays under canonical names and layouts (params, BN stats, velocities)."""

    def set_state(self, state: Dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`get_state`; a missing or mis-shaped array is a CheckpointError."""

    def reset_velocity(self) -> None:
        """Zero the momentum velocities (when the schedule reloads the best model)."""


class FastEpoch(Protocol):
    """The optional fast path: ``sampler.epoch(epoch)``'s batches, in order, on the device."""
    fast_epoch: bool  # True: crmn.train.train_epoch takes this path by default

    def epoch_batches(self, sampler, epoch: int) -> Iterable[Tuple[Any, Any]]:
        ...

    def resident(self, sampler) -> Any:
        """Copy the training set to the device now, so that a benchmark does not time it."""
