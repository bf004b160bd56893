"""A run's folder as a run reads it (crmn/LOGS.md; the bytes are crmn.runlog's): the typed
records of its files, where it resumes, and extending a run ``--epochs-cap`` cut short, each
file replaced in an order that a kill at any moment leaves resumable."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from crmn import checkpoint, provenance, runlog
from crmn.checkpoint import Arrays, show
from crmn.config import TrainConfig
from crmn.errors import CheckpointError, RunError
from crmn.plan import (RECORD_FORMAT, RunSpec, disk_key, legacy_record, recorded,
                       resume_may_change, spec_fields, spec_record)
from crmn.schedule import Decision, FixedSchedule, PlateauSchedule

PHASES = ("search", "final")
PREVIOUS = checkpoint.previous_path(runlog.CHECKPOINT).name  # the last good checkpoint


def _point(phase: str, epoch: int) -> Tuple[int, int]:
    """An epoch's place in the run, ordered: every search epoch before every final one."""
    return PHASES.index(phase), int(epoch)


def _from_dict(cls, d: Dict):
    """The ``cls`` record of a JSON object (a key it lacks: None)."""
    return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class CapCut:
    """Where ``--epochs-cap`` first cut a stage short: what a larger cap needs to go on."""
    cap: int
    schedule_before: Dict  # the schedule's state before that epoch's step
    eval_loss: float
    eval_acc: float


@dataclasses.dataclass
class CheckpointMeta:
    """A checkpoint's ``meta`` (crmn/checkpoint.py): what the arrays are the state of."""
    model: Dict  # ModelConfig.to_dict()
    train: Dict  # TrainConfig.to_dict()
    backend: Optional[str]
    dtype: Optional[str]
    dataset: Optional[str]
    phase: str  # "search" | "final"
    epoch: int  # finished epochs of the phase
    schedule: Dict  # the schedule's state_dict()
    sampler_seed: Optional[int]  # batches and crops follow from it and the epoch
    best: Optional[Dict]  # the best search epoch so far
    schedule_found: Optional[List[int]] = None  # the search's results, once it is done
    search_best: Optional[Dict] = None
    capped: Optional[CapCut] = None  # capped.h5 only

    @property
    def point(self) -> Tuple[int, int]:
        return _point(self.phase, self.epoch)

    def to_dict(self) -> Dict:
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k != "capped" or v is not None}

    @classmethod
    def from_dict(cls, d: Dict) -> "CheckpointMeta":
        meta = _from_dict(cls, d)
        if isinstance(meta.capped, dict):
            meta.capped = CapCut(**meta.capped)
        return meta


@dataclasses.dataclass
class LogLine:
    """One finished epoch: a line of log.jsonl."""
    phase: str
    epoch: int  # 1-based within the phase
    stage: int  # 0-based learning-rate stage
    lr: float
    train_loss: float
    train_acc: float  # fractions, not percent
    eval_split: str  # "val" | "test"
    eval_loss: float
    eval_acc: float
    seconds: float  # training seconds, compilation left out
    images_per_s: Optional[float]
    compile_seconds: float
    cache_outcome: Optional[str]  # "hit" | "miss" | "off" | None: the backend says nothing
    decision: str  # crmn.schedule.Decision's value
    time: float  # unix seconds

    @classmethod
    def from_dict(cls, d: Dict) -> "LogLine":
        """A log line, also one written before its cache outcome had its own name."""
        old = d.get("compile_cache")
        return _from_dict(cls, dict(d, cache_outcome=d.get("cache_outcome", old)))


@dataclasses.dataclass
class Summary:
    """summary.json: the run's result, written when it ends."""
    row: Optional[str]
    experiment: Optional[str]
    backend: str
    device: str
    dataset: str
    params: int
    schedule_found: Optional[List[int]]
    schedule_used: List[int]
    lr_stages: List[float]
    test_loss: float
    test_acc: float
    final_epochs: int
    sec_per_epoch: Optional[float]  # medians of the final run's epochs
    images_per_s: Optional[float]
    search_best: Optional[Dict]
    data: str  # crmn.data.provenance
    status: str = "done"
    preprocessing: Optional[Dict] = None  # the final phase's crmn.weights.Preprocessing


@dataclasses.dataclass
class ResumePoint:
    """Where a resumed run continues: the state after ``meta``'s epoch."""
    arrays: Arrays
    meta: CheckpointMeta


def given_schedule(train: TrainConfig) -> List[int]:
    """``--schedule``, each stage bounded by ``--epochs-cap``."""
    return [e if train.epochs_cap is None else min(e, train.epochs_cap) for e in train.schedule]


def say(text: str) -> None:
    print(text, flush=True)


def warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


class RunFolder:
    """``runs/<experiment>/<row>/seed<k>/`` and the run ``spec`` that trains in it."""

    def __init__(self, path, spec: RunSpec):
        self.dir, self.spec = Path(path), spec

    def path(self, name: str) -> Path:
        return self.dir / name

    @contextlib.contextmanager
    def held(self, fresh: bool = False) -> Iterator[None]:
        """Create the folder and hold its lock; ``fresh`` empties it first, under the lock."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"{self.dir}: cannot create the run directory "
                           f"({e.strerror or e}); choose another --out-dir") from None
        with runlog.hold(self.dir):
            for entry in self.dir.iterdir() if fresh else ():  # all but the lock
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                elif entry.name != runlog.LOCK:
                    entry.unlink()
            yield

    def finished(self, resume: bool) -> Optional[Dict]:
        """summary.json of a finished run to skip; None to train (a larger cap: to extend)."""
        summary = runlog.finished_summary(self.dir)
        if summary is None:
            # config.json alone (e.g. from a failed download) means nothing was trained
            for name in (runlog.CHECKPOINT, runlog.LOG, runlog.BEST, PREVIOUS):
                if not resume and self.path(name).exists():
                    raise RunError(f"{self.path(name)}: an unfinished run is already here; "
                                   f"pass --resume to continue it, or delete {self.dir} to "
                                   "start over")
            return None
        path = self.path(runlog.CONFIG)
        config = runlog.read_json(path) if path.exists() else {}
        try:
            old_cap = self._cap_raised(config, path, runlog.CONFIG)
        except CheckpointError as e:
            raise RunError(f"{e}: {self.dir} holds a finished run of another "
                           "configuration; choose another --out-dir or delete it") from None
        if old_cap is None:
            say(f"{self.dir}: already finished ({runlog.SUMMARY}), skipping")
            return summary
        if not resume:
            new = self.spec.train.epochs_cap
            how = "without a cap" if new is None else f"with --epochs-cap {new}"
            raise RunError(f"{path}: {self.dir} holds a run finished with --epochs-cap "
                           f"{old_cap}; add --resume to continue it {how}, or choose "
                           "another --out-dir")
        return None

    def _cap_raised(self, recorded: Dict, path: Path, source: str) -> Optional[int]:
        """The cap ``recorded`` (checkpoint meta, config.json) had if this run raises it."""
        spec = self.spec
        checkpoint.check_compatible(recorded, spec.model, spec.train, dataset=spec.dataset,
                                    path=path, source=source, may_change=resume_may_change)
        old, new = recorded["train"].get("epochs_cap"), spec.train.epochs_cap
        if new == old:
            return None
        if not isinstance(old, int) or (new is not None and new < old):
            raise CheckpointError(f"{path}: train.epochs_cap is {new} here, {old} in {source}; "
                                  "a run continues with a larger cap only (--epochs-cap "
                                  f"{old} or more, or none)")
        return old

    def start(self, resume: bool) -> Optional[ResumePoint]:
        """None (from the seed) or the last good checkpoint; the log is cut back to it."""
        for tmp in self.dir.glob(".*.tmp"):  # writes a kill interrupted: the real files stay
            tmp.unlink()
        log = self.path(runlog.LOG)
        if not resume or not (self.path(runlog.CHECKPOINT).exists()
                              or self.path(PREVIOUS).exists()):
            if log.exists():
                runlog.rewrite_log(log, [])  # no checkpoint: the run starts over from its seed
            return None
        arrays, recorded, path = self._last_good_checkpoint()
        try:  # the backend and dtype may change: both backends read the canonical format
            old_cap = self._cap_raised(recorded, path, "the checkpoint")
        except CheckpointError as e:
            raise CheckpointError(f"{e}; resume with the settings the run was started with, "
                                  f"or delete {self.dir} to start over") from None
        point = ResumePoint(arrays, CheckpointMeta.from_dict(recorded))
        if old_cap is not None:
            point = self._lift_cap(point, old_cap)
        self._record_resume(point.meta)
        runlog.rewrite_log(log, self._log_until(point.meta.point))
        say(f"{self.dir}: resuming {point.meta.phase} run after epoch {point.meta.epoch}")
        return point

    def _last_good_checkpoint(self) -> Tuple[Arrays, Dict, Path]:
        """checkpoint.h5, or checkpoint.prev.h5 when that does not read back."""
        ckpt, prev = self.path(runlog.CHECKPOINT), self.path(PREVIOUS)
        try:
            return (*checkpoint.load(ckpt), ckpt)
        except CheckpointError as e:
            current = e
        try:
            arrays, meta = checkpoint.load(prev)
        except CheckpointError:
            other = "does not read back either" if prev.exists() else "is missing"
            raise CheckpointError(f"{current}; {PREVIOUS} {other}, so the run cannot "
                                  f"continue: delete {self.dir} and run the command again "
                                  "without --resume") from None
        warn(f"{current}; continuing from {PREVIOUS}, the state after "
             f"{meta['phase']} epoch {meta['epoch']}")
        return arrays, meta, prev

    def _log_until(self, point: Tuple[int, int]) -> List[Dict]:
        return [e for e in runlog.read_log(self.path(runlog.LOG), events=True)
                if _point(e["phase"], e["epoch"]) <= point]

    def _record_resume(self, meta: CheckpointMeta) -> None:
        """config.json's ``resumes``: when, with every field ``--resume`` may change."""
        options = self.spec.backend_options
        if (meta.backend, meta.dtype) != (options.backend, options.dtype):
            say(f"{self.dir}: checkpoint written by {meta.backend} ({meta.dtype}), "
                f"continuing with {options.backend} ({options.dtype})")
        record = spec_record(self.spec)
        changeable = {disk_key(n)[-1]: recorded(record, n) for n, _ in spec_fields()
                      if resume_may_change(n) and len(disk_key(n)) == 1}
        self._add_to_config("resumes", {
            "phase": meta.phase, "after_epoch": meta.epoch, **changeable,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})

    def _add_to_config(self, key: str, item: Dict, **fields) -> None:
        path = self.path(runlog.CONFIG)
        if path.exists():
            config = dict(runlog.read_json(path), **fields)
            config.setdefault(key, []).append(item)
            runlog.write_json(path, config)

    def _lift_cap(self, point: ResumePoint, old: int) -> ResumePoint:
        """Go on from capped.h5 (the first epoch cut short, stepped again), or from ``point``."""
        cut, info = self.path(runlog.CAPPED), None
        if cut.exists():
            try:
                arrays, recorded = checkpoint.load(cut)
            except CheckpointError as e:
                raise CheckpointError(f"{e}: the run cannot be extended; run it with "
                                      f"--epochs-cap {old} as it is, or delete {self.dir} "
                                      "and start over") from None
            held = CheckpointMeta.from_dict(recorded)
            cap = held.capped  # None, or another cap's: left by an earlier extension
            if cap is not None and cap.cap == old and held.point <= point.meta.point:
                info, point = cap, ResumePoint(arrays, dataclasses.replace(held, capped=None))
        train = self.spec.train
        if info is not None:
            sched = _with_cap(info.schedule_before, train)
            decision = sched.step(info.eval_loss, info.eval_acc).value
            where = "where the cap first cut a stage short"
        else:
            sched, decision = _with_cap(point.meta.schedule, train), None
            where = "the cap had cut no stage short"
        meta = dataclasses.replace(point.meta, train=train.to_dict(),
                                   schedule=sched.state_dict(), best=sched.best)
        lifted = f"{old} lifted" if train.epochs_cap is None else \
            f"raised from {old} to {train.epochs_cap}"
        say(f"{self.dir}: --epochs-cap {lifted}: continuing the {meta.phase} run after "
            f"epoch {meta.epoch} ({where})")
        self._rewind(point.arrays, meta, old, decision)
        return ResumePoint(point.arrays, meta)

    def _rewind(self, arrays: Arrays, meta: CheckpointMeta, old: int,
                decision: Optional[str]) -> None:
        """:meth:`_lift_cap`'s files, in an order that keeps every kill resumable; ``decision``:
        the cut epoch's, stepped again (None: the cap had cut no stage short)."""
        kept = self._log_until(meta.point)
        for e in kept:
            if decision is not None and "event" not in e and \
                    _point(e["phase"], e["epoch"]) == meta.point:
                e["decision"] = decision
        lifted = {"phase": meta.phase, "epoch": meta.epoch, "from": old,
                  "to": self.spec.train.epochs_cap}
        runlog.rewrite_log(self.path(runlog.LOG),
                           kept + [dict(event="cap_lifted", **lifted, time=time.time())])
        self.path(runlog.SUMMARY).unlink(missing_ok=True)  # the run is not finished any more
        self._add_to_config("caps_lifted", lifted, train=self.spec.train.to_dict())
        if decision is not None and meta.phase == "search":
            runlog.link_over(self.path(runlog.CAPPED_BEST), self.path(runlog.BEST))
        self.path(PREVIOUS).unlink(missing_ok=True)  # an epoch of the course cut short
        checkpoint.save(self.path(runlog.CHECKPOINT), arrays, meta.to_dict())
        for name in (runlog.CAPPED, runlog.CAPPED_BEST):
            self.path(name).unlink(missing_ok=True)

    def write_config(self, backend, data_source: str, description: Optional[str],
                     fingerprint: Optional[str]) -> None:
        """config.json: the whole spec (crmn.plan.spec_record), and what ran it, on which data."""
        spec = self.spec
        runlog.write_json(self.path(runlog.CONFIG), {
            "config_format": RECORD_FORMAT, **spec_record(spec), "seed": spec.train.seed,
            "params": backend.param_count(), "data": data_source, "data_description": description,
            "data_fingerprint": fingerprint, **provenance.record(backend.device),
            # how the launcher packed it: the same run alone gives the same results
            "runs_per_gpu": int(os.environ.get(runlog.PACKING_ENV, 1)),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")})

    def check_same_run(self, fingerprint: Optional[str]) -> None:
        """Refuse a ``--resume`` whose options (but ``resume=`` ones) or data differ."""
        path = self.path(runlog.CONFIG)
        if not path.exists():
            return
        there = legacy_record(runlog.read_json(path))
        here = dict(spec_record(self.spec), data_fingerprint=fingerprint)
        for name in [n for n, _ in spec_fields()] + ["data_fingerprint"]:
            old, new = recorded(there, name), recorded(here, name)
            if resume_may_change(name) or old is KeyError or None in (old, new) and \
                    name == "data_fingerprint":  # not recorded by an earlier run; no data yet
                continue
            if old != new:
                what = f"the fingerprint of the data in {self.spec.data_dir}" \
                    if name == "data_fingerprint" else name
                raise CheckpointError(
                    f"{path}: {what} is {show(new)} here, {show(old)} in the run's "
                    "config.json; --resume continues the same run only (REPRODUCING.md §1, "
                    "What --resume may change): give the options it was started with, or "
                    "choose another --out-dir")

    def log(self, line: LogLine) -> None:
        runlog.append_entry(self.path(runlog.LOG), dataclasses.asdict(line))

    def lines(self, phase: str) -> List[LogLine]:
        return [LogLine.from_dict(e) for e in runlog.read_log(self.path(runlog.LOG))
                if e["phase"] == phase]

    def save(self, arrays: Arrays, meta: CheckpointMeta) -> None:
        """checkpoint.h5, keeping the one it replaces as checkpoint.prev.h5."""
        checkpoint.save(self.path(runlog.CHECKPOINT), arrays, meta.to_dict(),
                        keep_previous=True)

    def save_best(self, arrays: Arrays, meta: CheckpointMeta) -> None:
        checkpoint.save(self.path(runlog.BEST), arrays, meta.to_dict())

    def best_model(self, epoch: int, exact: bool = True) -> Arrays:
        """best.h5's arrays, of search epoch ``epoch`` (``exact=False``: or a later one's)."""
        path = self.path(runlog.BEST)
        try:
            arrays, meta = checkpoint.load(path)
        except CheckpointError as e:
            problem = str(e)
        else:
            got = meta.get("epoch")
            if got == epoch or (not exact and isinstance(got, int) and got > epoch):
                return arrays
            problem = f"{path}: holds search epoch {got}, not the best model (epoch {epoch})"
        raise CheckpointError(f"{problem}; the search cannot go back to its best model: "
                              f"delete {self.dir} and run the command again without --resume")

    def write_summary(self, summary: Summary) -> None:
        runlog.write_json(self.path(runlog.SUMMARY), dataclasses.asdict(summary))


class CapWatch:
    """``sched``, keeping capped.h5 (and capped.best.h5) where ``--epochs-cap`` first ended a
    stage, for a larger cap to go on from; ``meta(sched)``: the epoch's checkpoint record."""

    def __init__(self, sched, folder: RunFolder, backend, meta):
        self.sched, self.folder, self.backend, self.meta = sched, folder, backend, meta

    def __getattr__(self, name):
        return getattr(self.sched, name)

    def step(self, loss: float, acc: float) -> Decision:
        before = self.sched.state_dict()
        decision = self.sched.step(loss, acc)
        if _cut_short(self.folder.spec.train, before, self.sched, decision, loss, acc):
            self._keep(before, loss, acc)
        return decision

    def _keep(self, before: Dict, loss: float, acc: float) -> None:
        folder, meta, cap = self.folder, self.meta(self.sched), self.folder.spec.train.epochs_cap
        path = folder.path(runlog.CAPPED)
        if path.exists() and checkpoint.readable(path):
            held = CheckpointMeta.from_dict(checkpoint.load(path)[1])
            if held.capped is not None and held.capped.cap == cap and held.point < meta.point:
                return  # an earlier cut of this cap: that is where the other way starts
        state = self.backend.get_state()
        if meta.phase == "search" and self.sched.improved:  # this epoch is the best model
            checkpoint.save(folder.path(runlog.CAPPED_BEST), state, meta.to_dict())
        elif meta.phase == "search":
            runlog.link_over(folder.path(runlog.BEST), folder.path(runlog.CAPPED_BEST))
        checkpoint.save(path, state, dataclasses.replace(
            meta, capped=CapCut(cap, before, loss, acc)).to_dict())


def _cut_short(train: TrainConfig, before: Dict, sched, decision: Decision, loss: float,
               acc: float) -> bool:
    """Whether the cap ended the stage of the epoch just stepped."""
    if isinstance(sched, PlateauSchedule):
        uncapped = PlateauSchedule.from_state(dict(before, epochs_cap=None))
        return decision != Decision.CONTINUE and \
            uncapped.step(loss, acc) == Decision.CONTINUE
    if train.schedule is None:  # replays the search's schedule found, which the search capped
        return False
    stage = FixedSchedule.from_state(before).stage
    return sched.epoch == sum(sched.epochs_per_stage[:stage + 1]) and \
        train.schedule[stage] > train.epochs_cap


def _with_cap(state: Dict, train: TrainConfig):
    """The schedule of ``state`` (a schedule's ``state_dict()``) under ``train``'s cap."""
    if state["kind"] == PlateauSchedule.kind:
        return PlateauSchedule.from_state(dict(state, epochs_cap=train.epochs_cap))
    if train.schedule is not None:  # a search's schedule found is bounded by its own cap
        state = dict(state, epochs_per_stage=given_schedule(train))
    return FixedSchedule.from_state(state)
