"""Frozen configurations shared by both backends: the network and the protocol. Every field
carries its unit and its source (docs/spec.md §4-5); defaults are REPRODUCING.md's readings."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

from crmn import paper
from crmn.errors import ConfigError
from crmn.schema import above_zero, epochs_list, finite, option, positive, width


def json_view(value):
    """``value`` as JSON gives it back (tuples become lists), to compare with config.json."""
    return json.loads(json.dumps(value))


def _check_finite(config) -> None:
    """Refuse NaN and infinity in any number field: JSON (config.json) cannot hold them."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        for x in value if isinstance(value, tuple) else (value,):
            if isinstance(x, numbers.Real) and not math.isfinite(x):
                shown = list(value) if isinstance(value, tuple) else value
                raise ConfigError(f"{f.name} must be a finite number, got {shown}")


@dataclass(frozen=True)
class ModelConfig:
    """The network: a 6n+2 post-activation CIFAR ResNet, optionally with the CRMN memory."""
    # depth 6n+2 (He et al. 2015, section 4.2); stage widths 16k, 32k, 64k (paper section 4)
    n: int = option(flag="--n", type=positive, group="expert", help="blocks per stage")
    k: float = option(flag="--k", type=width, group="expert", help="width factor")
    classes: int  # softmax outputs: 100 CIFAR-100, 10 CIFAR-10 / SVHN
    memory: bool  # True: CRMN (LSTM over every block's output, section 3.2)
    lstm_units: int = 100  # hidden and cell size of the LSTM (section 4: "constant value of 100")
    forget_bias: float = option(-3.0, flag="--forget-bias", type=finite, metavar="B",
                                group="model", interpretation=True, show=repr,
                                help="initial forget-gate bias")  # "high negative biases"
    gate_bias: float = 0.0  # initial bias of the input and output gates and the cell input
    outgate: str = option("logistic", flag="--outgate", choices=("logistic", "tanh"),
                          group="model", interpretation=True, default_help="%(default)s, eq. 4",
                          help="LSTM output-gate nonlinearity")  # eq. 4, or tanh (the text)
    peepholes: bool = True  # peephole terms w_c ⊙ c of eqs. 2-4 (section 2.1: "we use them")
    dense_init: str = option("he", flag="--dense-init", choices=("he", "glorot"), group="model",
                             interpretation=True, help="softmax-layer weight init")  # gain 1

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
        """LSTM input size: the largest pooled tap, stage 1's 16k x 16 x 16."""
        return self.widths[0] * 16 * 16

    @classmethod
    def for_row(cls, row: "paper.Row", **overrides) -> "ModelConfig":
        return cls(**{**dict(n=row.n, k=row.k, classes=row.classes, memory=row.memory),
                      **overrides})

    to_dict = dataclasses.asdict  # the fields as config.json's "model" holds them


@dataclass(frozen=True)
class TrainConfig:
    """The training protocol of section 4 (docs/spec.md §5)."""
    batch_size: int = option(100, flag="--batch-size", type=positive, metavar="B",
                             group="expert", help="images per batch")  # 4.2: 50 if wide
    lr_stages: Tuple[float, ...] = option(
        paper.LR_TABLE1, flag="--lr", dest="lr", type=above_zero, metavar="LR", group="protocol",
        interpretation=True, show=lambda stages: repr(stages[0]),
        from_cli=lambda lr, stages: tuple(lr * (r / stages[0]) for r in stages),
        default_help="the row's, 0.1", help="learning rate of the first stage; the later "
        "stages keep the row's ratios")  # learning rates, one plateau stage each
    momentum: float = 0.9  # section 4: "momentum of 0.9"
    nesterov: bool = option(False, flag="--nesterov", kind="true", group="protocol",
                            interpretation=True, help="Nesterov momentum instead of classical")
    weight_decay: float = 1e-4  # gradient coefficient: penalty (wd/2)·Σw² on decayed weights
    patience: int = option(10, flag="--patience", type=positive, metavar="EPOCHS",
                           group="protocol", interpretation=True,
                           help="plateau patience beta in epochs")
    val_fraction: float = 0.1  # held-out share of the training set in the search run
    flip: bool = option(False, flag="--flip", kind="true", group="protocol", interpretation=True,
                        help="random horizontal flips in augmentation")  # the paper: pad+crop
    pad: int = 4  # zero padding before the random 32x32 crop, pixels per side
    epochs_cap: Optional[int] = option(
        None, flag="--epochs-cap", type=positive, metavar="N", resume=True,
        departure="epochs capped at {} per stage", default_help="%(default)s = no cap",
        help="at most N epochs per learning-rate stage")
    schedule: Optional[Tuple[int, ...]] = option(
        None, flag="--schedule", type=epochs_list, metavar="E1,E2,...", group="protocol",
        departure="fixed schedule {}", show=lambda s: ",".join(str(e) for e in s),
        default_help="%(default)s = search",
        help="fixed epochs per lr stage, skips the search run")
    seed: int = option(0, per_run=True)  # data split, batch order, crops and weight init

    def __post_init__(self):
        _check_finite(self)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr_stages:
            raise ConfigError("lr_stages must name at least one learning rate")
        if any(lr <= 0 for lr in self.lr_stages):
            raise ConfigError(f"learning rates must be > 0, got {list(self.lr_stages)}")
        if self.schedule is not None and len(self.schedule) != len(self.lr_stages):
            raise ConfigError(f"--schedule gives {len(self.schedule)} stages but the row has "
                              f"{len(self.lr_stages)} learning rates {list(self.lr_stages)}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")

    @classmethod
    def for_row(cls, row: "paper.Row", **overrides) -> "TrainConfig":
        return cls(**{**dict(batch_size=row.batch_size, lr_stages=row.lr_stages), **overrides})

    to_dict = dataclasses.asdict  # the fields as a dict

