"""The contract between the training loop and a backend (docs/spec.md §2).

``original/`` (Theano + Lasagne) and ``modern/`` (PyTorch) each implement :class:`Stack`:
build the network of a :class:`crmn.config.ModelConfig` and run one SGD step. Everything
else (epochs, evaluation, the NaN check, progress, the protocol) is :mod:`crmn.train`'s,
written once. :mod:`crmn.registry` finds a backend by name and asks its static
``problem(options)`` (why it cannot run those options here, or None) before any data is read.
State travels as numpy arrays under the canonical names of :mod:`crmn.naming`, velocities
as ``velocity.<name>`` (``v <- mu v - lr g``; ``p <- p + v``).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Protocol, Tuple, runtime_checkable

import numpy as np


@runtime_checkable
class Stack(Protocol):
    """A network built in one framework, initialised from ``train.seed``.

    Images are ``(B, 3, 32, 32)`` arrays, labels ``(B,)`` int64 class indices.
    """

    name: str  # "theano" | "torch" (the registry's name)
    device: str  # where it actually runs, in words, e.g. "cuda:0 (NVIDIA H100)"
    # optional: ``compile_seconds``, the seconds spent compiling (waits for a compile lock
    # included) so far; the loop keeps them out of an epoch's seconds and images/s

    def param_count(self) -> int:
        """Trainable parameters, counted from the framework's own parameter objects."""

    def step(self, x: Any, y: Any, lr: float) -> Tuple[Any, Any]:
        """One SGD step (momentum, weight decay, BN running averages) on one batch; returns
        the batch's summed cross-entropy (no weight decay) and correct count before the
        update, as device scalars (no host sync) that support ``+`` and ``float()`` and stay
        valid until the next ``step``."""

    def logits(self, x: np.ndarray, training: bool) -> np.ndarray:
        """Logits ``(B, classes)`` as numpy, changing no state; ``training`` normalises with
        the batch's statistics, else with the running averages."""

    def get_state(self) -> Dict[str, np.ndarray]:
        """All arrays under canonical names and layouts (params, BN stats, velocities)."""

    def set_state(self, state: Dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`get_state`; a missing or mis-shaped array is a CheckpointError."""

    def reset_velocity(self) -> None:
        """Zero the momentum velocities (done when the schedule reloads the best model)."""


class FastEpoch(Protocol):
    """The one optional fast path a backend may offer: an epoch's batches already on its
    device. ``epoch_batches(sampler, epoch)`` yields exactly ``sampler.epoch(epoch)``'s
    batches, in order; ``fast_epoch`` says whether :func:`crmn.train.train_epoch` takes this
    path by default (``tests/test_train.py`` holds it to the generic one).
    """

    fast_epoch: bool

    def epoch_batches(self, sampler, epoch: int) -> Iterable[Tuple[Any, Any]]:
        ...

    def resident(self, sampler) -> Any:
        """Copy ``sampler``'s training set to the device now (else the first
        :meth:`epoch_batches` does); :mod:`crmn.bench` calls it so that the copy is not
        timed as a step."""
        ...
