"""The contract between the training loop and a stack (STYLE.md rule 3).

``original/`` (Theano + Lasagne) and ``modern/`` (PyTorch) each implement :class:`Stack`:
they build the network of a :class:`crmn.config.ModelConfig` and run one SGD step. Every
other job (the epoch loop, evaluation, the NaN check, progress, the protocol of section 4)
is :mod:`crmn.train`'s, written once for both. This module imports neither stack; the
stacks import it, and :mod:`crmn.registry` (above them) finds them by name and checks the
options they are built with (:class:`crmn.registry.StackOptions`). Each stack class also
answers ``problem(options)`` (a staticmethod: why it cannot run those options here, or None),
which :func:`crmn.registry.probe` asks before any data is read.

State travels between stacks as a ``dict`` of numpy arrays under canonical names
(:mod:`crmn.naming`): every entry of ``param_specs(model)`` plus ``velocity.<name>`` for each
trainable parameter (Lasagne's momentum form, ``v <- mu v - lr g``; ``p <- p + v``).
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
        """One SGD step (momentum, weight decay, BN running averages) on one batch.

        Returns ``(loss_sum, correct)``: the batch's summed cross-entropy (without the
        weight-decay term) and its number of correctly classified images, both computed
        before the update, as the framework's own scalars (on the device: no host sync).
        They support ``+`` and ``float()`` and stay valid until the next ``step``.
        """

    def logits(self, x: np.ndarray, training: bool) -> np.ndarray:
        """Logits ``(B, classes)`` as numpy; changes no state.

        ``training=True`` normalises with the batch's statistics (without touching the
        running averages), ``False`` with the running averages.
        """

    def get_state(self) -> Dict[str, np.ndarray]:
        """All arrays under canonical names and layouts (params, BN stats, velocities)."""

    def set_state(self, state: Dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`get_state`; a missing or mis-shaped array is a CheckpointError."""

    def reset_velocity(self) -> None:
        """Zero the momentum velocities (done when the schedule reloads the best model)."""


class FastEpoch(Protocol):
    """The one optional fast path a stack may offer: an epoch's batches already on its
    device (the torch stack gathers a GPU-resident training set in a few kernels).

    ``epoch_batches(sampler, epoch)`` must yield exactly the batches of
    ``sampler.epoch(epoch)``, in order, as arguments :meth:`Stack.step` accepts;
    ``fast_epoch`` says whether :func:`crmn.train.train_epoch` takes this path by default.
    ``tests/test_train.py`` holds the path to the generic one on the CPU.
    """

    fast_epoch: bool

    def epoch_batches(self, sampler, epoch: int) -> Iterable[Tuple[Any, Any]]:
        ...

    def resident(self, sampler) -> Any:
        """Copy ``sampler``'s training set to the device now (else the first
        :meth:`epoch_batches` does); :mod:`crmn.bench` calls it so that the copy is not
        timed as a step."""
        ...
