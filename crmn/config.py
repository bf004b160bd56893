"""Frozen configurations shared by both stacks: the network (SPEC §4) and the protocol (§5).

Every field carries its unit and its source. The defaults are the interpretations that
SPEC §4 chooses where the paper is silent; each has a command-line flag and a paragraph in
REPRODUCING.md.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

from crmn import paper
from crmn.errors import ConfigError


def json_view(value):
    """``value`` as JSON gives it back (tuples become lists): how a dataclass's ``to_dict``
    compares with a config.json or checkpoint record of it."""
    return json.loads(json.dumps(value))


def _check_finite(config) -> None:
    """Refuse NaN and infinity in any number field (or tuple of numbers) of ``config``: they
    would train nothing, and JSON (config.json, checkpoint meta) cannot hold them."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        for x in value if isinstance(value, tuple) else (value,):
            if isinstance(x, numbers.Real) and not math.isfinite(x):
                shown = list(value) if isinstance(value, tuple) else value
                raise ConfigError(f"{f.name} must be a finite number, got {shown}")


@dataclass(frozen=True)
class ModelConfig:
    """The network: a 6n+2 post-activation CIFAR ResNet, optionally with the CRMN memory."""

    n: int  # basic blocks per stage; depth 6n+2 (He et al. 2015, section 4.2)
    k: float  # width factor: stage widths 16k, 32k, 64k feature maps (paper section 4)
    classes: int  # softmax outputs: 100 CIFAR-100, 10 CIFAR-10 / SVHN
    memory: bool  # True: CRMN (LSTM over every block's output, section 3.2); False: ResNet
    lstm_units: int = 100  # hidden and cell size of the LSTM (section 4: "constant value of 100")
    forget_bias: float = -3.0  # initial forget-gate bias ("high negative biases", SPEC §4)
    gate_bias: float = 0.0  # initial bias of the input and output gates and the cell input
    outgate: str = "logistic"  # output-gate nonlinearity: "logistic" (eq. 4) or "tanh" (text)
    peepholes: bool = True  # peephole terms w_c ⊙ c of eqs. 2-4 (section 2.1: "we use them")
    dense_init: str = "he"  # softmax layer weights: "he" (He normal, gain 1) or "glorot"

    def __post_init__(self):
        _check_finite(self)
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if self.k <= 0 or abs(16 * self.k - round(16 * self.k)) > 1e-9:
            raise ConfigError(f"width factor k must make 16k a whole number, got {self.k}")
        if self.outgate not in ("logistic", "tanh"):
            raise ConfigError(f"outgate must be 'logistic' or 'tanh', got {self.outgate!r}")
        if self.dense_init not in ("he", "glorot"):
            raise ConfigError(f"dense_init must be 'he' or 'glorot', got {self.dense_init!r}")
        if self.lstm_units < 1:
            raise ConfigError(f"lstm_units must be >= 1, got {self.lstm_units}")

    @property
    def depth(self) -> int:
        return 6 * self.n + 2

    @property
    def widths(self) -> Tuple[int, int, int]:
        """Feature maps of the three stages (16k, 32k, 64k)."""
        base = int(round(16 * self.k))
        return (base, 2 * base, 4 * base)

    @property
    def taps(self) -> int:
        """LSTM steps: one per residual block, 3n (section 3.2)."""
        return 3 * self.n

    @property
    def lstm_input(self) -> int:
        """LSTM input size: the largest pooled tap, stage 1's 16k x 16 x 16 (SPEC §4)."""
        return self.widths[0] * 16 * 16

    @classmethod
    def for_row(cls, row: "paper.Row", **overrides) -> "ModelConfig":
        return cls(n=row.n, k=row.k, classes=row.classes, memory=row.memory, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    """The training protocol of section 4 (SPEC §5)."""

    batch_size: int = 100  # images per SGD step (section 4.2: 50 for the wide 28-layer runs)
    lr_stages: Tuple[float, ...] = paper.LR_TABLE1  # learning rates, one plateau stage each
    momentum: float = 0.9  # section 4: "momentum of 0.9"
    nesterov: bool = False  # classical momentum by default (SPEC §4)
    weight_decay: float = 1e-4  # gradient coefficient: penalty (wd/2)·Σw² on decayed weights
    patience: int = 10  # β: epochs without improvement before the lr drops (SPEC §4)
    val_fraction: float = 0.1  # held-out share of the training set in the search run
    flip: bool = False  # random horizontal flips (off: the paper names only pad+crop)
    pad: int = 4  # zero padding before the random 32x32 crop, pixels per side
    epochs_cap: Optional[int] = None  # --epochs-cap: at most this many epochs per stage
    schedule: Optional[Tuple[int, ...]] = None  # --schedule: fixed epochs per stage, no search
    seed: int = 0  # data split, batch order, crops and weight init

    def __post_init__(self):
        _check_finite(self)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr_stages:
            raise ConfigError("lr_stages must name at least one learning rate")
        if any(lr <= 0 for lr in self.lr_stages):
            raise ConfigError(f"learning rates must be > 0, got {list(self.lr_stages)}")
        if self.schedule is not None and len(self.schedule) != len(self.lr_stages):
            raise ConfigError(
                f"--schedule gives {len(self.schedule)} stages but the row has "
                f"{len(self.lr_stages)} learning rates {list(self.lr_stages)}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")

    @classmethod
    def for_row(cls, row: "paper.Row", **overrides) -> "TrainConfig":
        return cls(batch_size=row.batch_size, lr_stages=row.lr_stages, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

