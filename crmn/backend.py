"""What a stack must provide to be driven by the framework-free training loop.

``original/`` (Theano + Lasagne) and ``modern/`` (PyTorch) each implement :class:`Backend`;
:mod:`crmn.train` runs the paper's protocol (search run, plateau schedule, final run, logs,
checkpoints, resume) over either of them, and :func:`make_backend` is the one place that
maps ``--backend`` to an implementation. A stack only builds the network and runs the step.

State travels between stacks as a ``dict`` of numpy arrays under canonical names
(:mod:`crmn.naming`): every entry of ``param_specs(model)`` plus ``velocity.<name>`` for each
trainable parameter (Lasagne's momentum form, ``v <- mu v - lr g``; ``p <- p + v``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Protocol, Tuple

import numpy as np

from crmn.config import ModelConfig, TrainConfig
from crmn.errors import ConfigError

BACKENDS = ("theano", "torch")
#: device types the stacks run on (``--device cpu``, ``cuda``, ``cuda:N``)
DEVICE_TYPES = ("cpu", "cuda")


def check_device(name: str) -> str:
    """Return ``name`` if it is a device string the stacks accept, else raise
    :class:`ConfigError` in one line (checked before any network is built).

    Whether a CUDA GPU is actually there is the torch backend's check, not this one.
    """
    import torch  # the parser of record for device strings

    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise ConfigError(f"unknown device {name!r}: choose cpu, cuda or cuda:N")
    return name


@dataclass
class EpochStats:
    """What one training epoch reports (means over the epoch's batches)."""

    loss: float  # mean cross-entropy of the batches (without the weight-decay term)
    acc: float  # fraction of correctly classified training images, in [0, 1]
    images: int  # images seen
    seconds: float  # wall-clock seconds of the epoch's steps


class Backend(Protocol):
    name: str  # "theano" | "torch"
    device: str  # where it actually runs, in words, e.g. "cpu" or "cuda:0 (NVIDIA H100)"

    def param_count(self) -> int:
        """Trainable parameters, counted from the framework's own parameter objects."""

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        """Logits ``(B, classes)`` for images ``x`` ``(B, 3, 32, 32)``; changes no state.

        ``training=True`` normalises with the batch's statistics (and does not touch the
        running averages), ``False`` with the running averages.
        """

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> Tuple[float, float]:
        """One SGD step (momentum, weight decay, BN running averages) on one batch.

        Returns the batch's (mean cross-entropy, accuracy) computed before the update.
        """

    def train_epoch(self, sampler, epoch: int, lr: float,
                    progress: Optional[Callable[[int, int, float], None]] = None) -> EpochStats:
        """One epoch of SGD over ``sampler.epoch(epoch)`` at learning rate ``lr``.

        ``progress(done_batches, total_batches, running_loss)`` is called now and then.
        Raises :class:`crmn.errors.DivergedError` when the loss is not finite.
        """

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int) -> Tuple[float, float]:
        """(mean cross-entropy, accuracy in [0, 1]) in inference mode (running BN stats)."""

    def get_state(self) -> Dict[str, np.ndarray]:
        """All arrays under canonical names and layouts (params, BN stats, velocities)."""

    def set_state(self, state: Dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`get_state`; a missing or mis-shaped array is a CheckpointError."""

    def reset_velocity(self) -> None:
        """Zero the momentum velocities (done when the schedule reloads the best model)."""


def make_backend(name: str, model: ModelConfig, train: TrainConfig, device: str = "cpu",
                 dtype: str = "float32", compile: bool = False) -> Backend:
    """Build the network of ``model`` in stack ``name``, initialised from ``train.seed``.

    ``compile`` (torch only) puts ``torch.compile`` behind the captured CUDA graph; the
    Theano stack always compiles its graphs.
    """
    if name == "theano":
        if compile:
            raise ConfigError("--compile is an option of the torch backend; the theano "
                              "backend always compiles its graphs")
        from original.backend import TheanoBackend

        return TheanoBackend(model, train, device=device, dtype=dtype)
    if name == "torch":
        from modern.backend import TorchBackend

        return TorchBackend(model, train, device=device, dtype=dtype, compile=compile)
    raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
