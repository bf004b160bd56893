"""The learning-rate schedules of the training protocol (section 4, docs/spec.md §5).

Two pure state machines fed the evaluation metrics after each epoch, answering what the
driver (:mod:`crmn.train`) does next: :class:`PlateauSchedule` for the search run, which
records the schedule it finds, and :class:`FixedSchedule` for the final run (and
``--schedule 80,40,40``), which replays one and never reloads.

Readings where the paper is silent (each with its reason in REPRODUCING.md §2): "error" is
the validation cross-entropy; an improvement is strict, against the best of the whole search;
the best model has the highest accuracy, lower loss breaking ties; the schedule found counts,
per stage, the epochs up to its last new best (0 if none); ``epochs_cap`` ends a stage as if
it had plateaued. ::

    sched = PlateauSchedule((0.1, 0.01, 0.001), patience=10)
    while not sched.done:
        ... train one epoch at sched.lr, evaluate ...
        decision = sched.step(val_loss, val_acc)
        if sched.improved: save best.h5
        if decision == Decision.RELOAD: load best.h5, zero the velocities
    sched.found  # e.g. [83, 21, 12]
"""
from __future__ import annotations

import enum
import math
from typing import Dict, List, Optional, Sequence

STATE_VERSION = 1


class Decision(str, enum.Enum):
    """What the driver does after an epoch; a ``str`` so that it serialises as its value."""

    CONTINUE = "continue"  # keep training at the current learning rate
    RELOAD = "reload"  # stage plateaued: reload the best model, go on with the next rate
    STOP = "stop"  # last stage finished: the phase is over


def _check_stages(lr_stages: Sequence[float]) -> List[float]:
    stages = [float(lr) for lr in lr_stages]
    if not stages:
        raise ValueError("lr_stages must name at least one learning rate")
    if any(not (lr > 0 and math.isfinite(lr)) for lr in stages):
        raise ValueError(f"learning rates must be positive and finite, got {stages}")
    return stages


def _check_metric(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


class PlateauSchedule:
    """Plateau search over ``lr_stages`` (section 4, docs/spec.md §5): a stage ends when
    neither validation loss nor accuracy has strictly improved on its record for ``patience``
    (β) epochs in a row, or after ``epochs_cap`` epochs (``--epochs-cap``) if given."""

    kind = "plateau"

    def __init__(self, lr_stages: Sequence[float], patience: int,
                 epochs_cap: Optional[int] = None):
        self.lr_stages = _check_stages(lr_stages)
        if int(patience) < 1:
            raise ValueError(f"patience must be >= 1 epoch, got {patience}")
        if epochs_cap is not None and int(epochs_cap) < 1:
            raise ValueError(f"epochs_cap must be >= 1 or None, got {epochs_cap}")
        self.patience = int(patience)
        self.epochs_cap = None if epochs_cap is None else int(epochs_cap)
        self.stage = 0  # 0-based index of the stage the next epoch trains in
        self.epoch = 0  # epochs finished in this phase
        self.stage_epoch = 0  # epochs finished in the current stage
        self.stale = 0  # consecutive epochs without improvement of loss or accuracy
        self.best_loss = math.inf  # lowest validation loss so far (plateau record)
        self.best_acc = -math.inf  # highest validation accuracy so far (plateau record)
        self.best: Optional[Dict] = None  # the best model: epoch, stage, stage_epoch, loss, acc
        self.found: List[int] = [0] * len(self.lr_stages)  # schedule found so far
        self.improved = False  # the last step produced a new best model
        self.done = False

    @property
    def lr(self) -> float:
        """Learning rate of the next epoch."""
        return self.lr_stages[min(self.stage, len(self.lr_stages) - 1)]

    @property
    def total_epochs(self) -> Optional[int]:
        """Epochs of the whole phase if known in advance (never, for a search)."""
        return None

    def step(self, val_loss: float, val_acc: float) -> Decision:
        """Record one epoch's mean validation cross-entropy and accuracy (in [0, 1]) and
        decide: ``CONTINUE``, ``RELOAD`` (this stage plateaued: go on at the next rate from
        the best model) or ``STOP`` (the last stage plateaued). :attr:`improved` then says
        whether this epoch is the new best model."""
        if self.done:
            raise RuntimeError("step() called on a finished schedule")
        loss = _check_metric("val_loss", val_loss)
        acc = _check_metric("val_acc", val_acc)
        self.epoch += 1
        self.stage_epoch += 1
        # plateau criterion: either metric strictly beating its own record resets the count
        if loss < self.best_loss or acc > self.best_acc:
            self.stale = 0
        else:
            self.stale += 1
        self.best_loss = min(self.best_loss, loss)
        self.best_acc = max(self.best_acc, acc)
        # best model: accuracy first, then loss
        b = self.best
        self.improved = b is None or acc > b["acc"] or (acc == b["acc"] and loss < b["loss"])
        if self.improved:
            self.best = {"epoch": self.epoch, "stage": self.stage,
                         "stage_epoch": self.stage_epoch, "loss": loss, "acc": acc}
            self.found[self.stage] = self.stage_epoch
        capped = self.epochs_cap is not None and self.stage_epoch >= self.epochs_cap
        if self.stale < self.patience and not capped:
            return Decision.CONTINUE
        return self._next_stage()

    def _next_stage(self) -> Decision:
        if self.stage + 1 >= len(self.lr_stages):
            self.done = True
            return Decision.STOP
        self.stage += 1
        self.stage_epoch = 0
        self.stale = 0
        return Decision.RELOAD

    def state_dict(self) -> Dict:
        """Everything needed to continue, as JSON-serialisable values."""
        return {
            "kind": self.kind, "version": STATE_VERSION, "lr_stages": list(self.lr_stages),
            "patience": self.patience, "epochs_cap": self.epochs_cap, "stage": self.stage,
            "epoch": self.epoch, "stage_epoch": self.stage_epoch, "stale": self.stale,
            # JSON has no infinity: the records are None before the first epoch
            "best_loss": None if math.isinf(self.best_loss) else self.best_loss,
            "best_acc": None if math.isinf(self.best_acc) else self.best_acc,
            "best": None if self.best is None else dict(self.best),
            "found": list(self.found), "improved": self.improved, "done": self.done,
        }

    @classmethod
    def from_state(cls, d: Dict) -> "PlateauSchedule":
        """Inverse of :meth:`state_dict`."""
        _check_kind(d, cls.kind)
        s = cls(d["lr_stages"], d["patience"], d["epochs_cap"])
        s.stage, s.epoch = d["stage"], d["epoch"]
        s.stage_epoch, s.stale = d["stage_epoch"], d["stale"]
        s.best_loss = math.inf if d["best_loss"] is None else float(d["best_loss"])
        s.best_acc = -math.inf if d["best_acc"] is None else float(d["best_acc"])
        s.best = None if d["best"] is None else dict(d["best"])
        s.found = [int(e) for e in d["found"]]
        s.improved, s.done = bool(d["improved"]), bool(d["done"])
        return s


class FixedSchedule:
    """``epochs_per_stage[s]`` epochs at ``lr_stages[s]``, in order; never reloads.

    Stages of 0 epochs are skipped. It still tracks the best epoch of the metrics it is fed
    (the final run's test metrics: reported, never used to select anything).
    """

    kind = "fixed"

    def __init__(self, lr_stages: Sequence[float], epochs_per_stage: Sequence[int]):
        self.lr_stages = _check_stages(lr_stages)
        self.epochs_per_stage = [int(e) for e in epochs_per_stage]
        if len(self.epochs_per_stage) != len(self.lr_stages):
            raise ValueError(f"epochs_per_stage {self.epochs_per_stage} and lr_stages "
                             f"{self.lr_stages} differ in length")
        if any(e < 0 for e in self.epochs_per_stage):
            raise ValueError(f"epochs per stage must be >= 0, got {self.epochs_per_stage}")
        self.epoch = 0
        self.best: Optional[Dict] = None
        self.improved = False

    @property
    def total_epochs(self) -> int:
        return sum(self.epochs_per_stage)

    @property
    def found(self) -> List[int]:
        """The schedule itself (the interface of :class:`PlateauSchedule`)."""
        return list(self.epochs_per_stage)

    @property
    def done(self) -> bool:
        return self.epoch >= self.total_epochs

    @property
    def stage(self) -> int:
        """0-based stage of the next epoch (the last stage once done)."""
        end = 0
        for s, e in enumerate(self.epochs_per_stage):
            end += e
            if self.epoch < end:
                return s
        return len(self.lr_stages) - 1

    @property
    def stage_epoch(self) -> int:
        """Epochs finished in the current stage."""
        return self.epoch - sum(self.epochs_per_stage[:self.stage])

    @property
    def lr(self) -> float:
        return self.lr_stages[self.stage]

    def step(self, loss: float, acc: float) -> Decision:
        """Record one finished epoch; ``STOP`` after the last epoch, else ``CONTINUE``."""
        if self.done:
            raise RuntimeError("step() called on a finished schedule")
        loss, acc = _check_metric("loss", loss), _check_metric("acc", acc)
        stage, stage_epoch = self.stage, self.stage_epoch + 1
        self.epoch += 1
        b = self.best
        self.improved = b is None or acc > b["acc"] or (acc == b["acc"] and loss < b["loss"])
        if self.improved:
            self.best = {"epoch": self.epoch, "stage": stage, "stage_epoch": stage_epoch,
                         "loss": loss, "acc": acc}
        return Decision.STOP if self.done else Decision.CONTINUE

    def state_dict(self) -> Dict:
        return {"kind": self.kind, "version": STATE_VERSION, "lr_stages": list(self.lr_stages),
                "epochs_per_stage": list(self.epochs_per_stage), "epoch": self.epoch,
                "best": None if self.best is None else dict(self.best),
                "improved": self.improved}

    @classmethod
    def from_state(cls, d: Dict) -> "FixedSchedule":
        _check_kind(d, cls.kind)
        s = cls(d["lr_stages"], d["epochs_per_stage"])
        s.epoch = int(d["epoch"])
        s.best = None if d["best"] is None else dict(d["best"])
        s.improved = bool(d["improved"])
        return s


def _check_kind(d: Dict, kind: str) -> None:
    if d.get("kind") != kind or d.get("version") != STATE_VERSION:
        raise ValueError(f"not a {kind} schedule state of version {STATE_VERSION}: "
                         f"kind={d.get('kind')!r} version={d.get('version')!r}")
