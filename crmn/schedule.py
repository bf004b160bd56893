"""The learning-rate schedules of the training protocol (section 4, docs/spec.md §5): pure
state machines fed each epoch's evaluation metrics, answering what :mod:`crmn.train` does
next. :class:`PlateauSchedule` searches; :class:`FixedSchedule` replays a schedule."""
from __future__ import annotations

import copy
import enum
import itertools
import math
from typing import Dict, List, Optional, Sequence

STATE_VERSION = 1


class Decision(str, enum.Enum):
    """What the driver does after an epoch; a ``str`` so that it serialises as its value."""
    CONTINUE = "continue"  # keep training at the current learning rate
    RELOAD = "reload"  # stage plateaued: reload the best model, go on with the next rate
    STOP = "stop"  # last stage finished: the phase is over


def _check_metric(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


class _Schedule:
    """What both schedules share: the best epoch of the metrics they are fed."""

    kind = ""
    _init: tuple = ()  # the constructor's arguments, first of the state's keys
    _state: tuple = ()  # the rest of the state's keys, in the order they are written
    done: bool
    stage: int

    def __init__(self, lr_stages: Sequence[float]):
        self.lr_stages = stages = [float(lr) for lr in lr_stages]
        if not stages:
            raise ValueError("lr_stages must name at least one learning rate")
        if any(not (lr > 0 and math.isfinite(lr)) for lr in stages):
            raise ValueError(f"learning rates must be positive and finite, got {stages}")
        self.epoch = 0  # epochs finished in this phase
        self.best: Optional[Dict] = None  # the best epoch: epoch, stage, stage_epoch, loss, acc
        self.improved = False  # the last step produced a new best

    @property
    def lr(self) -> float:
        return self.lr_stages[self.stage]

    def _record(self, loss: float, acc: float, stage: int, stage_epoch: int) -> None:
        """Count one epoch; the best model has the highest accuracy, lower loss breaking ties."""
        if self.done:
            raise RuntimeError("step() called on a finished schedule")
        self.epoch += 1
        b = self.best
        self.improved = b is None or acc > b["acc"] or (acc == b["acc"] and loss < b["loss"])
        if self.improved:
            self.best = {"epoch": self.epoch, "stage": stage, "stage_epoch": stage_epoch,
                         "loss": loss, "acc": acc}

    def state_dict(self) -> Dict:
        """Everything needed to continue, as JSON values (an infinity as None)."""
        d: Dict = {"kind": self.kind, "version": STATE_VERSION}
        for key in self._init + self._state:
            value = getattr(self, key)
            d[key] = None if isinstance(value, float) and math.isinf(value) else \
                copy.copy(value)
        return d

    @classmethod
    def from_state(cls, d: Dict):
        """Inverse of :meth:`state_dict`."""
        if d.get("kind") != cls.kind or d.get("version") != STATE_VERSION:
            raise ValueError(f"not a {cls.kind} schedule state of version {STATE_VERSION}: "
                             f"kind={d.get('kind')!r} version={d.get('version')!r}")
        s = cls(*(d[key] for key in cls._init))
        for key in cls._state:
            if d[key] is not None or getattr(s, key) is None:
                setattr(s, key, copy.copy(d[key]))  # None keeps an initial infinity
        return s


class PlateauSchedule(_Schedule):
    """The search over ``lr_stages``: a stage ends when neither validation loss ("error")
    nor accuracy has strictly beaten its record of the whole search for ``patience`` (β)
    epochs in a row, or after ``epochs_cap`` epochs. The schedule found counts, per stage,
    the epochs up to its last new best (0 if none). Reasons: REPRODUCING.md §2."""

    kind = "plateau"
    _init = ("lr_stages", "patience", "epochs_cap")
    _state = ("stage", "epoch", "stage_epoch", "stale", "best_loss", "best_acc", "best",
              "found", "improved", "done")
    total_epochs = None  # a search's length is not known in advance

    def __init__(self, lr_stages: Sequence[float], patience: int,
                 epochs_cap: Optional[int] = None):
        super().__init__(lr_stages)
        if int(patience) < 1:
            raise ValueError(f"patience must be >= 1 epoch, got {patience}")
        if epochs_cap is not None and int(epochs_cap) < 1:
            raise ValueError(f"epochs_cap must be >= 1 or None, got {epochs_cap}")
        self.patience = int(patience)
        self.epochs_cap = None if epochs_cap is None else int(epochs_cap)
        self.stage = 0  # 0-based index of the stage the next epoch trains in
        self.stage_epoch = 0  # epochs finished in the current stage
        self.stale = 0  # consecutive epochs without improvement of loss or accuracy
        self.best_loss, self.best_acc = math.inf, -math.inf  # the plateau records
        self.found: List[int] = [0] * len(self.lr_stages)  # schedule found so far
        self.done = False

    def step(self, val_loss: float, val_acc: float) -> Decision:
        """Record an epoch's validation loss and accuracy (in [0, 1]); RELOAD ends a stage."""
        loss, acc = _check_metric("val_loss", val_loss), _check_metric("val_acc", val_acc)
        self._record(loss, acc, self.stage, self.stage_epoch + 1)
        self.stage_epoch += 1
        # either metric strictly beating its own record resets the plateau count
        self.stale = 0 if loss < self.best_loss or acc > self.best_acc else self.stale + 1
        self.best_loss = min(self.best_loss, loss)
        self.best_acc = max(self.best_acc, acc)
        if self.improved:
            self.found[self.stage] = self.stage_epoch
        capped = self.epochs_cap is not None and self.stage_epoch >= self.epochs_cap
        if self.stale < self.patience and not capped:
            return Decision.CONTINUE
        if self.stage + 1 >= len(self.lr_stages):
            self.done = True
            return Decision.STOP
        self.stage, self.stage_epoch, self.stale = self.stage + 1, 0, 0
        return Decision.RELOAD


class FixedSchedule(_Schedule):
    """``epochs_per_stage[s]`` epochs at ``lr_stages[s]``, in order (stages of 0 epochs
    skipped); never reloads. Its best epoch (of the final run's test metrics) is reported
    only, never used to select anything."""

    kind = "fixed"
    _init = ("lr_stages", "epochs_per_stage")
    _state = ("epoch", "best", "improved")

    def __init__(self, lr_stages: Sequence[float], epochs_per_stage: Sequence[int]):
        super().__init__(lr_stages)
        self.epochs_per_stage = [int(e) for e in epochs_per_stage]
        if len(self.epochs_per_stage) != len(self.lr_stages):
            raise ValueError(f"epochs_per_stage {self.epochs_per_stage} and lr_stages "
                             f"{self.lr_stages} differ in length")
        if any(e < 0 for e in self.epochs_per_stage):
            raise ValueError(f"epochs per stage must be >= 0, got {self.epochs_per_stage}")

    @property
    def total_epochs(self) -> int:
        return sum(self.epochs_per_stage)

    @property
    def found(self) -> List[int]:
        return list(self.epochs_per_stage)

    @property
    def done(self) -> bool:
        return self.epoch >= self.total_epochs

    @property
    def stage(self) -> int:
        """0-based stage of the next epoch (the last stage once done)."""
        ends = itertools.accumulate(self.epochs_per_stage)
        return next((s for s, end in enumerate(ends) if self.epoch < end),
                    len(self.lr_stages) - 1)

    @property
    def stage_epoch(self) -> int:
        return self.epoch - sum(self.epochs_per_stage[:self.stage])

    def step(self, loss: float, acc: float) -> Decision:
        """Record one finished epoch; ``STOP`` after the last epoch, else ``CONTINUE``."""
        loss, acc = _check_metric("loss", loss), _check_metric("acc", acc)
        self._record(loss, acc, self.stage, self.stage_epoch + 1)
        return Decision.STOP if self.done else Decision.CONTINUE
