"""The training loop: the paper's protocol (section 4, SPEC §5) over any :class:`crmn.stack.Stack`.

Written once for both stacks, which only build the network and take a step. One call of
:func:`run` trains one :class:`RunSpec` into one run directory (crmn/LOGS.md):

1. **Search run** (skipped when ``train.schedule`` is given): train on the seeded 90 % share
   of the training set, validate on the other 10 % after every epoch, and follow
   :class:`crmn.schedule.PlateauSchedule`. Whenever the validation result is the best so far,
   the state is saved to ``best.h5``; when a stage plateaus, ``best.h5`` is loaded back and the
   momentum velocities are zeroed before the next, lower learning rate.
2. **Final run**: the network, back at its seeded initial state, trains on the whole
   training set with :class:`crmn.schedule.FixedSchedule` replaying the schedule found (or the
   given one, each stage bounded by ``train.epochs_cap``), and is evaluated on the test set
   after every epoch. The last epoch's test result is the run's result (``summary.json``).

This module owns what both stacks share: the epoch loop (:func:`train_epoch`), evaluation
(:func:`evaluate`, one numerics for both stacks: float64 cross-entropy from the stack's
logits), the progress bar (:class:`Progress`), the NaN/inf check (:func:`_check_finite`),
and what a finished run is (:func:`crmn.runlog.finished_summary`).

Every finished epoch appends one line to ``log.jsonl`` and then atomically replaces
``checkpoint.h5`` (state, schedule, phase, epoch). ``resume=True`` loads that checkpoint,
drops log lines of epochs it does not cover (a kill between the two writes), and replays
from the next epoch. Nothing depends on process-global random state: weights come from
``train.seed`` in the stack and batches are a function of (sampler seed, epoch) in
:class:`crmn.data.BatchSampler`, so a resumed run ends with exactly the parameters of an
uninterrupted one.

Choices: a run directory that already holds a finished run of the same configuration is
skipped with a message and its summary returned (no stack is built); one holding an
unfinished run is refused unless ``resume=True``. The data are loaded before the stack is
built, so a missing dataset fails in seconds.
"""
from __future__ import annotations

import dataclasses
import math
import platform
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from crmn import checkpoint, data, registry, runlog
from crmn.config import TrainConfig
from crmn.errors import (CheckpointError, ConfigError, DivergedError, RunError,
                         StopRequested)
from crmn.plan import RunSpec
from crmn.schedule import Decision, FixedSchedule, PlateauSchedule

PHASES = ("search", "final")
#: keys that separate the sampler streams of the two phases (batches, crops, flips)
_PHASE_KEY = {"search": 0x5345, "final": 0x4649}
#: images per forward pass of :func:`evaluate` (inference results do not depend on it)
EVAL_BATCH = 500
#: progress updates per epoch (each one reads the running loss: a host sync on a GPU)
PROGRESS_UPDATES = 20
#: the checkpoint before checkpoint.h5, kept by crmn.checkpoint.save (the last good one)
PREVIOUS = checkpoint.previous_path(runlog.CHECKPOINT).name
#: the signal that asked the run to stop at the next epoch's end (None: keep going)
_stop_signal: List[Optional[int]] = [None]


@dataclasses.dataclass
class EpochStats:
    """What one training epoch reports (means over the epoch's images)."""

    loss: float  # mean cross-entropy (without the weight-decay term)
    acc: float  # fraction of correctly classified training images, in [0, 1]
    images: int  # images seen
    seconds: float  # wall-clock seconds of the epoch's steps, compilation left out
    compile_seconds: float = 0.0  # of which the stack compiled (or waited to compile)
    # what the stack's compile cache did: "hit", "miss", "off"; None: the stack says nothing
    compile_cache: Optional[str] = None


def sampler_seed(seed: int, phase: str) -> int:
    """Seed of ``phase``'s batch sampler: a 32-bit number derived from ``(seed, phase)``.

    The two phases draw different batch streams from one ``train.seed``.
    """
    return int(np.random.SeedSequence([seed, _PHASE_KEY[phase]]).generate_state(1)[0])


# --- stopping on a signal -----------------------------------------------------------------

def request_stop(signum: int, frame=None) -> None:
    """Signal handler (SIGUSR1 and Ctrl-C, installed by the CLI): finish the epoch in
    progress, checkpoint it, then stop the run with :class:`crmn.errors.StopRequested`. A
    second Ctrl-C stops at once (KeyboardInterrupt; the last checkpoint stays)."""
    if signum == signal.SIGINT and _stop_signal[0] == signal.SIGINT:
        raise KeyboardInterrupt
    _stop_signal[0] = signum


def check_stop(where) -> None:
    """Raise :class:`StopRequested` if a stop was asked for (a safe point: all saved)."""
    signum = _stop_signal[0]
    if signum is not None:
        raise StopRequested(f"{where}: stopped by {signal.Signals(signum).name} after its "
                            f"last checkpoint; the same command with --resume continues it",
                            signum=signum)


# --- one epoch, evaluation, progress ------------------------------------------------------

class Progress:
    """A one-line progress bar on a terminal: batches, images/s, the epoch's ETA, loss.

    Until the first step returns (Theano and JAX compile there, torch captures its graph)
    the line counts the seconds: ``compiling… N s``, or ``compile cache hit… N s`` once the
    stack found its compiled step in the compile cache (``cache_state()``: the stack's
    ``compile_cache``); rates and the ETA start after it.
    """

    def __init__(self, label: str, total: int, stream=None, cache_state=lambda: None):
        self.label, self.total = label, total
        self.cache_state = cache_state
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.every = max(1, total // PROGRESS_UPDATES)
        self.first = None  # (done, images, time) after the first step
        self._stepped = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stepped.wait(1.0):
            doing = "compile cache hit" if self.cache_state() == "hit" else "compiling"
            self.stream.write(f"\r  {self.label} {doing}\u2026 "
                              f"{time.perf_counter() - self.t0:.0f} s\033[K")
            self.stream.flush()

    def due(self, done: int) -> bool:
        return done == 1 or done % self.every == 0 or done == self.total

    def show(self, done: int, images: int, loss: float) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (done, images, now)
            self._stepped.set()
            self._ticker.join()
        d0, i0, t0 = self.first
        elapsed = max(now - t0, 1e-9)
        rate = f"{(images - i0) / elapsed:.0f} img/s" if done > d0 else "- img/s"
        eta = (f"ETA {_fmt_duration(elapsed / (done - d0) * (self.total - done))}"
               if done > d0 else "ETA -")
        width = 20
        bar = "#" * (width * done // self.total) + "." * (width - width * done // self.total)
        self.stream.write(f"\r  {self.label} [{bar}] {done}/{self.total} {rate} {eta} "
                          f"loss {loss:.4f}\033[K")
        self.stream.flush()

    def close(self) -> None:
        self._stepped.set()
        self._ticker.join()
        self.stream.write("\r\033[K")
        self.stream.flush()


def train_epoch(stack, sampler, epoch: int, lr: float, *, progress: Optional[str] = None,
                fast: Optional[bool] = None) -> EpochStats:
    """One epoch of SGD over ``sampler.epoch(epoch)`` at learning rate ``lr``.

    ``fast`` takes the stack's :class:`crmn.stack.FastEpoch` path (default: the stack's
    ``fast_epoch``, True for the torch stack on a GPU); both paths step through the same
    batches. The step's sums stay on the device until the epoch ends, except for the
    progress bar's updates (``progress``: its label; None draws nothing).
    """
    use_fast = getattr(stack, "fast_epoch", False) if fast is None else fast
    batches = stack.epoch_batches(sampler, epoch) if use_fast else sampler.epoch(epoch)
    bar = (Progress(progress, len(sampler),
                    cache_state=lambda: getattr(stack, "compile_cache", None))
           if progress else None)
    loss_sum: Any = 0.0
    correct: Any = 0
    images = 0
    compiled0 = getattr(stack, "compile_seconds", 0.0)
    t0 = time.perf_counter()
    try:
        for done, (xb, yb) in enumerate(batches, 1):
            batch_loss, batch_correct = stack.step(xb, yb, lr)
            loss_sum = loss_sum + batch_loss
            correct = correct + batch_correct
            images += len(yb)
            if bar is not None and bar.due(done):
                bar.show(done, images, float(loss_sum) / images)
        loss = float(loss_sum)  # the epoch's one host sync: the device's work ends here
        seconds = time.perf_counter() - t0
        compiled = getattr(stack, "compile_seconds", 0.0) - compiled0
    finally:
        if bar is not None:
            bar.close()
    if images == 0:
        raise ConfigError("the sampler yielded no batch in this epoch")
    return EpochStats(loss=loss / images, acc=float(correct) / images, images=images,
                      seconds=seconds - compiled, compile_seconds=compiled,
                      compile_cache=getattr(stack, "compile_cache", None))


def evaluate(stack, x: np.ndarray, y: np.ndarray,
             batch_size: int = EVAL_BATCH) -> Tuple[float, float]:
    """(mean cross-entropy, accuracy in [0, 1]) in inference mode (running BN statistics).

    The cross-entropy is computed here, in float64 from the stack's logits, so both stacks
    report the same numbers for the same logits.
    """
    if len(y) == 0:
        raise ConfigError("evaluate() needs at least one image")
    loss_sum = 0.0
    correct = 0
    for xb, yb in data.iterate_eval(x, y, batch_size):
        z = np.asarray(stack.logits(xb, training=False), dtype=np.float64)  # (B, classes)
        z = z - z.max(axis=1, keepdims=True)  # a stable log-softmax
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        yb = np.asarray(yb, dtype=np.int64)
        loss_sum += float(-logp[np.arange(len(yb)), yb].sum())
        correct += int((z.argmax(axis=1) == yb).sum())
    return loss_sum / len(y), correct / len(y)


# --- one run --------------------------------------------------------------------------------

@dataclasses.dataclass
class _Run:
    """What the phases of one run share; the paths of its files."""

    run_dir: Path
    spec: RunSpec
    progress: bool
    fake_data: bool = False
    data_source: str = "official"  # crmn.data.provenance: official | fake | unverified
    epoch_wall: List[float] = dataclasses.field(default_factory=list)  # this process's epochs
    loaded: Optional[Tuple[str, Any]] = None  # (phase, crmn.data.Split) last loaded

    @property
    def train(self) -> TrainConfig:
        return self.spec.train

    def path(self, name: str) -> Path:
        return self.run_dir / name

    def say(self, text: str) -> None:
        print(text, flush=True)

    def split(self, phase: str):
        """Training and evaluation arrays of ``phase`` (crmn.data), loaded once per phase."""
        if self.loaded is None or self.loaded[0] != phase:
            self.loaded = None  # free the other phase's arrays first
            split = data.prepare(self.spec.dataset, self.spec.data_dir, phase,
                                 self.train.seed, val_fraction=self.train.val_fraction,
                                 progress=self.progress,
                                 unverified=self.spec.unverified_data,
                                 subset=self.spec.subset)
            self.loaded = (phase, split)
        return self.loaded[1]


def run(run_dir, spec: RunSpec, new_stack: Optional[Callable[[], Any]] = None, *,
        resume: bool = False, progress: bool = True, fresh: bool = False) -> Dict:
    """Train ``spec`` through search and final run (SPEC §5) into ``run_dir``.

    Parameters
    ----------
    run_dir : path
        ``runs/<experiment>/<row>/seed<k>/``; created if missing.
    spec : RunSpec
        What runs; recorded in config.json and checked against a checkpoint on resume.
    new_stack : callable () -> Stack, optional
        Builds the network, initialised from ``spec.train.seed``; called at most once (not
        for a finished run). The final run restarts it from its initial state. Default:
        :func:`crmn.registry.build` of ``spec.stack``.
    resume : bool
        Continue from ``checkpoint.h5`` (``--resume``).
    progress : bool
        Draw a progress bar (on a terminal) and download progress.
    fresh : bool
        Start afresh: empty the run directory first, under its lock (``smoke``); a
        directory another process holds is refused with nothing removed.

    Returns
    -------
    dict
        The summary written to ``summary.json`` (crmn/LOGS.md).

    Raises
    ------
    RunError
        An unfinished run exists and ``resume`` is False, or another process holds it.
    CheckpointError
        ``checkpoint.h5`` is unreadable or from another configuration.
    DivergedError
        The loss became NaN or infinite; the last good checkpoint stays.
    StopRequested
        A signal asked the run to stop (:func:`request_stop`); all finished epochs are saved.
    """
    ctx = _Run(Path(run_dir), spec, progress)
    if new_stack is None:
        def new_stack():
            return registry.build(spec.stack, spec.model, spec.train)
    _open_run_dir(ctx)
    with runlog.hold(ctx.run_dir):  # one process per run directory
        if fresh:
            runlog.clear_run_dir(ctx.run_dir)
        return _run_held(ctx, new_stack, resume)


def _run_held(ctx: _Run, new_stack: Callable[[], Any], resume: bool) -> Dict:
    """:func:`run` once the run directory is this process's."""
    spec = ctx.spec
    finished = _finished(ctx, resume)
    if finished is not None:
        return finished
    for tmp in ctx.run_dir.glob(".*.tmp"):  # writes a kill interrupted: the real files stay
        tmp.unlink()
    resumed = _resume_point(ctx, resume)
    searching = spec.train.schedule is None and (resumed is None
                                                 or resumed[1]["phase"] == "search")
    ctx.split("search" if searching else "final")  # a missing dataset fails before the build
    _note_data(ctx)
    stack = new_stack()
    ctx.say(f"{ctx.run_dir}: backend {stack.name} on {stack.device}, dtype {spec.stack.dtype}, "
            f"{stack.param_count():,} trainable parameters")
    if resumed is None or not ctx.path(runlog.CONFIG).exists():
        runlog.write_json(ctx.path(runlog.CONFIG), _config(ctx, stack))
    used, extra = _phases(ctx, stack, resumed, searching)
    summary = _summary(ctx, stack, used, extra)
    runlog.write_json(ctx.path(runlog.SUMMARY), summary)
    ctx.say(f"{ctx.run_dir}: done, test accuracy {100 * summary['test_acc']:.2f} % after "
            f"{summary['final_epochs']} epochs (schedule {used})")
    return summary


# --- run directory ---------------------------------------------------------------------

def _finished(ctx: _Run, resume: bool) -> Optional[Dict]:
    """The summary of a finished run (skipped), None for a new one; refuses an unfinished
    run unless resuming. A finished run resumed with a larger ``--epochs-cap`` is not
    finished: :func:`_resume_point` continues it."""
    summary = runlog.finished_summary(ctx.run_dir)
    if summary is not None:
        if _check_same_run(ctx, resume):
            return None
        ctx.say(f"{ctx.run_dir}: already finished ({runlog.SUMMARY}), skipping")
        return summary
    if resume:
        return None
    # config.json alone (e.g. the data could not be downloaded) means nothing was trained
    for name in (runlog.CHECKPOINT, runlog.LOG, runlog.BEST, PREVIOUS):
        if ctx.path(name).exists():
            raise RunError(f"{ctx.path(name)}: an unfinished run is already here; pass "
                              f"--resume to continue it, or delete {ctx.run_dir} to start over")
    return None


def _check_same_run(ctx: _Run, resume: bool) -> bool:
    """A finished run is only reused for the configuration it was trained with; True when
    it is resumed with a larger ``--epochs-cap`` (it continues)."""
    path = ctx.path(runlog.CONFIG)
    config = runlog.read_json(path) if path.exists() else {}
    try:
        lifted = _check_cap(ctx, config, path, runlog.CONFIG)
    except CheckpointError as e:
        raise RunError(f"{e}: {ctx.run_dir} holds a finished run of another "
                          "configuration; choose another --out-dir or delete it") from None
    if lifted is not None and not resume:
        raise RunError(f"{path}: {ctx.run_dir} holds a run finished with --epochs-cap "
                       f"{lifted}; add --resume to continue it "
                       f"{_cap_text(ctx.train.epochs_cap)}, or choose another --out-dir")
    return lifted is not None


def _cap_text(cap: Optional[int]) -> str:
    """How a message names the cap a run continues under."""
    return "without a cap" if cap is None else f"with --epochs-cap {cap}"


def _check_cap(ctx: _Run, meta: Dict, path: Path, source: str) -> Optional[int]:
    """:func:`crmn.checkpoint.check_compatible` of ``meta`` (a checkpoint's or config.json's)
    in every field but ``train.epochs_cap``, which may grow (or go): returns the recorded cap
    when this run lifts it, None when the caps are equal.

    Raises
    ------
    CheckpointError
        Another configuration, or a smaller cap (the epochs past it are trained already).
    """
    spec = ctx.spec
    train = meta.get("train")
    old = train.get("epochs_cap") if isinstance(train, dict) else spec.train.epochs_cap
    as_then = dataclasses.replace(spec.train, epochs_cap=old) \
        if old is None or isinstance(old, int) else spec.train
    checkpoint.check_compatible(meta, spec.model, as_then, dataset=spec.dataset, path=path,
                                source=source)
    new = spec.train.epochs_cap
    if new == old:
        return None
    if old is None or (new is not None and new < old):
        raise CheckpointError(f"{path}: train.epochs_cap is {new} here, {old} in {source}; "
                              "a run continues with a larger cap only (--epochs-cap "
                              f"{old} or more, or none)")
    return old


def _open_run_dir(ctx: _Run) -> None:
    """Create the run directory (a clear error where it cannot be)."""
    try:
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"{ctx.run_dir}: cannot create the run directory "
                          f"({e.strerror or e}); choose another --out-dir") from None


def _note_data(ctx: _Run) -> None:
    """Record where the data come from (official, fake, unverified) and warn unless
    official: such a run's accuracies say nothing about the paper's."""
    spec = ctx.spec
    ctx.data_source = data.provenance(spec.dataset, spec.data_dir,
                                      unverified=spec.unverified_data)
    ctx.fake_data = ctx.data_source == "fake"
    if ctx.fake_data:
        print(f"warning: {spec.data_dir} holds fake {spec.dataset} data (crmn.data "
              "write_fake); this run's accuracies say nothing about the paper's",
              file=sys.stderr, flush=True)
    elif ctx.data_source == "unverified":
        print(f"warning: the {spec.dataset} data in {spec.data_dir} were not checked against "
              f"the official files ({data.UNVERIFIED_FLAG}); compare lists this run as not "
              "as published", file=sys.stderr, flush=True)


def _resume_point(ctx: _Run, resume: bool) -> Optional[Tuple[Dict, Dict]]:
    """``(arrays, meta)`` of the checkpoint to resume from, else None.

    That is checkpoint.h5, or checkpoint.prev.h5 (the epoch before) when checkpoint.h5 is
    missing or does not read back (:func:`_last_good_checkpoint`). A larger
    ``--epochs-cap`` than the checkpoint's continues from where the old cap first cut a
    stage short (:func:`_lift_cap`). The log keeps only the epochs the checkpoint covers: a
    run killed after writing an epoch's log line but before its checkpoint will redo (and
    re-log) that epoch.
    """
    log = ctx.path(runlog.LOG)
    if not resume or not (ctx.path(runlog.CHECKPOINT).exists() or ctx.path(PREVIOUS).exists()):
        if log.exists():
            runlog.rewrite_log(log, [])  # no checkpoint: the run starts over from its seed
        return None
    arrays, meta, path = _last_good_checkpoint(ctx)
    # The backend and dtype may change on resume: both stacks read the canonical format.
    try:
        lifted = _check_cap(ctx, meta, path, "the checkpoint")
    except CheckpointError as e:
        raise CheckpointError(f"{e}; resume with the settings the run was started with, or "
                              f"delete {ctx.run_dir} to start over") from None
    if lifted is not None:
        arrays, meta = _lift_cap(ctx, arrays, meta, lifted)
    _record_resume(ctx, meta)
    runlog.rewrite_log(log, _log_until(ctx, meta))
    ctx.say(f"{ctx.run_dir}: resuming {meta['phase']} run after epoch {meta['epoch']}")
    return arrays, meta


def _log_until(ctx: _Run, meta: Dict) -> List[Dict]:
    """The lines of log.jsonl (event lines too) up to ``meta``'s phase and epoch."""
    order = PHASES.index(meta["phase"])
    return [e for e in runlog.read_log(ctx.path(runlog.LOG), events=True)
            if PHASES.index(e["phase"]) < order
            or (e["phase"] == meta["phase"] and e["epoch"] <= meta["epoch"])]


def _last_good_checkpoint(ctx: _Run) -> Tuple[Dict, Dict, Path]:
    """checkpoint.h5, or, when it is missing or does not read back, checkpoint.prev.h5 (one
    line on stderr says which epoch the run falls back to).

    Raises
    ------
    CheckpointError
        Neither reads back: one line saying so and what to do.
    """
    ckpt, prev = ctx.path(runlog.CHECKPOINT), ctx.path(PREVIOUS)
    try:
        return (*checkpoint.load(ckpt), ckpt)
    except CheckpointError as e:
        current = e
    try:
        arrays, meta = checkpoint.load(prev)
    except CheckpointError:
        other = "does not read back either" if prev.exists() else "is missing"
        raise CheckpointError(f"{current}; {PREVIOUS} {other}, so the run cannot continue: "
                              f"delete {ctx.run_dir} and run the command again without "
                              "--resume") from None
    print(f"warning: {current}; continuing from {PREVIOUS}, the state after "
          f"{meta['phase']} epoch {meta['epoch']}", file=sys.stderr, flush=True)
    return arrays, meta, prev


def _capped(schedule, cap: Optional[int]) -> List[int]:
    """A given ``--schedule``, each stage bounded by ``--epochs-cap``."""
    return [e if cap is None else min(e, cap) for e in schedule]


def _with_cap(state: Dict, train: TrainConfig):
    """The schedule of ``state`` (a schedule's ``state_dict()``) under ``train``'s cap."""
    if state["kind"] == PlateauSchedule.kind:
        return PlateauSchedule.from_state(dict(state, epochs_cap=train.epochs_cap))
    if train.schedule is not None:  # a search's schedule found is bounded by its own cap
        state = dict(state, epochs_per_stage=_capped(train.schedule, train.epochs_cap))
    return FixedSchedule.from_state(state)


def _point(meta: Dict) -> Tuple[int, int]:
    return PHASES.index(meta["phase"]), int(meta["epoch"])


def _cut_short(ctx: _Run, pre: Dict, sched, decision: Decision, loss: float,
               acc: float) -> bool:
    """Whether ``--epochs-cap`` (not the plateau, not the given schedule) ended the stage of
    the epoch just stepped: from there on a run with a larger cap goes another way.
    ``pre`` is the schedule's state before the step."""
    cap = ctx.train.epochs_cap
    if cap is None:
        return False
    if isinstance(sched, PlateauSchedule):
        uncapped = PlateauSchedule.from_state(dict(pre, epochs_cap=None))
        return decision != Decision.CONTINUE and \
            uncapped.step(loss, acc) == Decision.CONTINUE
    given = ctx.train.schedule
    if given is None:  # replays the search's schedule found, which the search capped
        return False
    stage = FixedSchedule.from_state(pre).stage
    return sched.epoch == sum(sched.epochs_per_stage[:stage + 1]) and given[stage] > cap


def _save_cut(ctx: _Run, stack, meta: Dict, pre: Dict, loss: float, acc: float) -> None:
    """capped.h5 (and capped.best.h5 in the search): the state where the cap first cut a
    stage short, with what a larger cap needs to take the other way (:func:`_lift_cap`)."""
    path, cap = ctx.path(runlog.CAPPED), ctx.train.epochs_cap
    if path.exists() and checkpoint.readable(path):
        _, held = checkpoint.load(path)
        if held.get("capped", {}).get("cap") == cap and _point(held) < _point(meta):
            return  # an earlier cut of this cap: that is where the other way starts
    if meta["phase"] == "search":
        runlog.link_over(ctx.path(runlog.BEST), ctx.path(runlog.CAPPED_BEST))
    checkpoint.save(path, stack.get_state(), dict(meta, capped={
        "cap": cap, "schedule_before": pre, "eval_loss": loss, "eval_acc": acc}))


def _lift_cap(ctx: _Run, arrays: Dict, meta: Dict, old: int) -> Tuple[Dict, Dict]:
    """Continue a run capped at ``old`` under this run's larger cap (or none).

    A run with the larger cap takes the capped run's path up to the first epoch where the
    old cap cut a stage short (capped.h5) and another after it: from there the stage goes
    on instead of reloading (search) or moving to the next rate (a given ``--schedule``).
    So the run goes back to that epoch: the state, best.h5, the schedule stepped again under
    the new cap, the log cut there with a ``cap_lifted`` event line, summary.json removed.
    Without a cut (the cap never bound) it continues from ``meta`` as it is. Each file is
    written before the next is touched, and capped.h5 goes last, so a kill at any point
    leaves a run that the same command continues (:func:`_rewind`).
    """
    spec = ctx.spec
    cut = ctx.path(runlog.CAPPED)
    held = None
    if cut.exists():
        try:
            held = checkpoint.load(cut)
        except CheckpointError as e:
            raise CheckpointError(f"{e}: the run cannot be extended; run it with "
                                  f"--epochs-cap {old} as it is, or delete {ctx.run_dir} "
                                  "and start over") from None
        if held[1].get("capped", {}).get("cap") != old or _point(held[1]) > _point(meta):
            held = None  # left by an earlier extension
    if held is not None:
        arrays, cut_meta = held
        info = cut_meta["capped"]
        sched = _with_cap(info["schedule_before"], spec.train)
        decision = sched.step(info["eval_loss"], info["eval_acc"]).value
        meta = {k: v for k, v in cut_meta.items() if k != "capped"}
        where = "where the cap first cut a stage short"
    else:
        sched, decision = _with_cap(meta["schedule"], spec.train), None
        where = "the cap had cut no stage short"
    meta = dict(meta, train=spec.train.to_dict(), schedule=sched.state_dict(),
                best=sched.best)
    new = spec.train.epochs_cap
    lifted = f"{old} lifted" if new is None else f"raised from {old} to {new}"
    ctx.say(f"{ctx.run_dir}: --epochs-cap {lifted}: continuing the {meta['phase']} run "
            f"after epoch {meta['epoch']} ({where})")
    event = {"event": "cap_lifted", "phase": meta["phase"], "epoch": meta["epoch"],
             "from": old, "to": spec.train.epochs_cap, "time": time.time()}
    _rewind(ctx, arrays, meta, event, decision, from_cut=held is not None)
    return arrays, meta


def _rewind(ctx: _Run, arrays: Dict, meta: Dict, event: Dict, decision: Optional[str],
            from_cut: bool) -> None:
    """The files of :func:`_lift_cap`, in the order that keeps every kill resumable: the
    log cut at ``meta``'s epoch (its line given the new ``decision``) plus ``event``,
    summary.json removed, config.json's cap, best.h5 from capped.best.h5 (``from_cut``),
    the new checkpoint.h5, and capped.h5 last."""
    kept = _log_until(ctx, meta)
    for e in kept:  # the cut epoch's line: what it decided under the new cap
        if decision is not None and "event" not in e and _point(e) == _point(meta):
            e["decision"] = decision
    runlog.rewrite_log(ctx.path(runlog.LOG), kept + [event])
    ctx.path(runlog.SUMMARY).unlink(missing_ok=True)  # the run is not finished any more
    config_path = ctx.path(runlog.CONFIG)
    if config_path.exists():
        config = runlog.read_json(config_path)
        config["train"] = ctx.spec.train.to_dict()
        config.setdefault("caps_lifted", []).append(
            {k: event[k] for k in ("phase", "epoch", "from", "to")})
        runlog.write_json(config_path, config)
    if from_cut and meta["phase"] == "search":
        runlog.link_over(ctx.path(runlog.CAPPED_BEST), ctx.path(runlog.BEST))
    ctx.path(PREVIOUS).unlink(missing_ok=True)  # an epoch of the course cut short
    checkpoint.save(ctx.path(runlog.CHECKPOINT), arrays, meta)
    for name in (runlog.CAPPED, runlog.CAPPED_BEST):
        ctx.path(name).unlink(missing_ok=True)


def _record_resume(ctx: _Run, meta: Dict) -> None:
    """Note in config.json who continued the run; say so when the stack or dtype changes."""
    spec = ctx.spec
    if (meta.get("backend"), meta.get("dtype")) != (spec.stack.backend, spec.stack.dtype):
        ctx.say(f"{ctx.run_dir}: checkpoint written by {meta.get('backend')} "
                f"({meta.get('dtype')}), continuing with {spec.stack.backend} ({spec.stack.dtype})")
    path = ctx.path(runlog.CONFIG)
    if path.exists():
        config = runlog.read_json(path)
        config.setdefault("resumes", []).append(
            {"phase": meta["phase"], "after_epoch": meta["epoch"], "backend": spec.stack.backend,
             "dtype": spec.stack.dtype,
             "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        runlog.write_json(path, config)


def _config(ctx: _Run, stack) -> Dict:
    spec = ctx.spec
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("h5py", "theano", "lasagne", "torch"):
        if mod in sys.modules:
            versions[mod] = getattr(sys.modules[mod], "__version__", "?")
    options = spec.stack
    return {"row": spec.row, "experiment": spec.experiment, "dataset": spec.dataset,
            "backend": options.backend, "device": stack.device,
            "device_requested": options.device, "dtype": options.dtype,
            "compile": options.compile, "theano_mode": options.theano_mode,
            "compile_cache": options.compile_cache,
            "params": stack.param_count(),
            "model": spec.model.to_dict(),
            "train": spec.train.to_dict(), "seed": spec.train.seed,
            "fake_data": ctx.fake_data, "data": ctx.data_source, "versions": versions,
            "data_description": data.describe(spec.dataset, spec.data_dir, spec.subset),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _copy(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    # a stack may hand out views of its live buffers
    return {k: np.array(v, copy=True) for k, v in state.items()}


# --- phases ------------------------------------------------------------------------------

def _phases(ctx: _Run, stack, resumed, searching: bool) -> Tuple[List[int], Dict]:
    """Search run (if due), then the final run; returns the schedule used and the search's
    results (``schedule_found``, ``search_best``)."""
    spec = ctx.spec
    extra = {"schedule_found": None, "search_best": None}
    if resumed is not None:
        extra = {k: resumed[1].get(k) for k in extra}
    if searching:
        initial = _copy(stack.get_state())  # the final run starts again from here
        sched = _search(ctx, stack, resumed)
        extra = {"schedule_found": sched.found, "search_best": sched.best}
        resumed = None
        stack.set_state(initial)
        stack.reset_velocity()
    used = extra["schedule_found"]
    if spec.train.schedule is not None:  # --schedule, bounded by --epochs-cap like every stage
        used = _capped(spec.train.schedule, spec.train.epochs_cap)
    _final(ctx, stack, used, resumed, extra)
    return used, extra


def _search(ctx: _Run, stack, resumed) -> PlateauSchedule:
    """Search run on the 90 % split; returns the finished plateau schedule."""
    if resumed is not None:
        arrays, meta = resumed
        stack.set_state(arrays)
        sched = PlateauSchedule.from_state(meta["schedule"])
        if sched.best is not None and not sched.done:
            _best_model(ctx, sched, exact=False)  # a plateau reloads it: fail now, not later
    else:
        sched = PlateauSchedule(ctx.train.lr_stages, ctx.train.patience, ctx.train.epochs_cap)
    _train_phase(ctx, "search", stack, sched, {"schedule_found": None, "search_best": None})
    ctx.say(f"{ctx.run_dir}: search done, schedule found {sched.found} "
            f"(epochs per lr {list(ctx.train.lr_stages)}), best {sched.best}")
    return sched


def _final(ctx: _Run, stack, used: List[int], resumed, extra: Dict) -> FixedSchedule:
    """Final run on the full training set with the fixed schedule ``used``."""
    if resumed is not None:
        arrays, meta = resumed
        stack.set_state(arrays)
        sched = FixedSchedule.from_state(meta["schedule"])
    else:
        sched = FixedSchedule(ctx.train.lr_stages, used)
    _train_phase(ctx, "final", stack, sched, extra)
    return sched


def _train_phase(ctx: _Run, phase: str, stack, sched, extra: Dict) -> None:
    split = ctx.split(phase)
    sampler = data.BatchSampler(split.train_x, split.train_y, ctx.train.batch_size,
                                sampler_seed(ctx.train.seed, phase), pad=ctx.train.pad,
                                flip=ctx.train.flip)
    while not sched.done:
        _one_epoch(ctx, phase, stack, sched, sampler, split, extra)


def _one_epoch(ctx: _Run, phase: str, stack, sched, sampler, split, extra: Dict) -> None:
    """Train, evaluate, decide, log, checkpoint: one epoch of either phase."""
    t0 = time.perf_counter()
    lr, stage, epoch = sched.lr, sched.stage, sched.epoch + 1
    label = f"[{phase}] epoch {epoch}" if ctx.progress and sys.stderr.isatty() else None
    stats = train_epoch(stack, sampler, epoch, lr, progress=label)
    _check_finite(ctx, phase, epoch, "training loss", stats.loss)
    eval_loss, eval_acc = evaluate(stack, split.eval_x, split.eval_y)
    _check_finite(ctx, phase, epoch, f"{split.eval_name} loss", eval_loss)
    before = sched.state_dict()
    decision = sched.step(eval_loss, eval_acc)
    meta = _meta(ctx, phase, sched, sampler.seed, extra)
    if phase == "search" and sched.improved:
        checkpoint.save(ctx.path(runlog.BEST), stack.get_state(), meta)
    if _cut_short(ctx, before, sched, decision, eval_loss, eval_acc):
        _save_cut(ctx, stack, meta, before, eval_loss, eval_acc)
    entry = {"phase": phase, "epoch": epoch, "stage": stage, "lr": lr,
             "train_loss": stats.loss, "train_acc": stats.acc, "eval_split": split.eval_name,
             "eval_loss": eval_loss, "eval_acc": eval_acc, "seconds": stats.seconds,
             "images_per_s": stats.images / stats.seconds if stats.seconds > 0 else None,
             "compile_seconds": stats.compile_seconds, "compile_cache": stats.compile_cache,
             "decision": decision.value,
             "time": time.time()}
    runlog.append_entry(ctx.path(runlog.LOG), entry)
    if decision == Decision.RELOAD:
        stack.set_state(_best_model(ctx, sched))
        stack.reset_velocity()  # the next stage starts from rest at its new rate
    checkpoint.save(ctx.path(runlog.CHECKPOINT), stack.get_state(), meta, keep_previous=True)
    ctx.epoch_wall.append(time.perf_counter() - t0)
    ctx.say(_epoch_line(ctx, entry, sched, improved=sched.improved and phase == "search"))
    check_stop(ctx.run_dir)


def _best_model(ctx: _Run, sched: PlateauSchedule, exact: bool = True) -> Dict[str, np.ndarray]:
    """best.h5's arrays, checked to be the search's best model (its epoch). On resume
    (``exact=False``) best.h5 may be a later epoch's, saved just before a kill: the epoch
    replayed writes it again.

    Raises
    ------
    CheckpointError
        best.h5 is unreadable or holds another epoch: the search cannot go back to its best
        model, and no other file holds it.
    """
    path = ctx.path(runlog.BEST)
    want = sched.best["epoch"]
    try:
        arrays, meta = checkpoint.load(path)
        if meta.get("epoch") != want and (exact or not meta.get("epoch", -1) > want):
            raise CheckpointError(f"{path}: holds search epoch {meta.get('epoch')}, not the "
                                  f"best model (epoch {want})")
    except CheckpointError as e:
        raise CheckpointError(f"{e}; the search cannot go back to its best model: delete "
                              f"{ctx.run_dir} and run the command again without "
                              "--resume") from None
    return arrays


def _check_finite(ctx: _Run, phase: str, epoch: int, what: str, value: float) -> None:
    """The one NaN/inf check of a run: stops it, naming row, phase, epoch and what stays."""
    if not math.isfinite(value):
        row = ctx.spec.row or "(no paper row)"
        ckpt = ctx.path(runlog.CHECKPOINT)
        kept = (f"the last good checkpoint {ckpt} is kept" if ckpt.exists() else
                "no epoch had finished, so there is no checkpoint to keep")
        raise DivergedError(f"{ctx.run_dir}: {what} is {value} in {phase} epoch {epoch} of "
                            f"row {row}; {kept}; a lower --lr may train (in another "
                            "--out-dir)")


def _meta(ctx: _Run, phase: str, sched, seed: int, extra: Dict) -> Dict:
    spec = ctx.spec
    return {"model": spec.model.to_dict(), "train": spec.train.to_dict(),
            "backend": spec.stack.backend, "dtype": spec.stack.dtype, "dataset": spec.dataset,
            "phase": phase, "epoch": sched.epoch, "schedule": sched.state_dict(),
            "sampler_seed": seed, "best": sched.best, **extra}


# --- printing ----------------------------------------------------------------------------

def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _epoch_line(ctx: _Run, e: Dict, sched, improved: bool) -> str:
    """``[search] epoch 12 lr 0.1 | train 1.234 45.6% | val 1.502 40.1% | 30.2 s ...``"""
    total = sched.total_epochs
    eta = ""
    if total is not None and ctx.epoch_wall:
        left = total - sched.epoch
        eta = f" | ETA {_fmt_duration(left * float(np.mean(ctx.epoch_wall)))}"
    ips = f"{e['images_per_s']:.0f} img/s" if e["images_per_s"] else "- img/s"
    of = f"/{total}" if total is not None else ""
    return (f"[{e['phase']}] epoch {e['epoch']}{of} stage {e['stage']} lr {e['lr']:g} | "
            f"train loss {e['train_loss']:.4f} acc {100 * e['train_acc']:.2f}% | "
            f"{e['eval_split']} loss {e['eval_loss']:.4f} acc {100 * e['eval_acc']:.2f}% | "
            f"{e['seconds']:.1f} s {ips}{eta}"
            + (f" | + {e['compile_seconds']:.0f} s compiling"
               + (" (compile cache hit)" if e["compile_cache"] == "hit" else "")
               if e["compile_seconds"] >= 0.5 else "")
            + (" | best" if improved else "")
            + ("" if e["decision"] == "continue" else f" | {e['decision']}"))


# --- summary -----------------------------------------------------------------------------

def _summary(ctx: _Run, stack, used: List[int], extra: Dict) -> Dict:
    """summary.json from the log (crmn/LOGS.md); resumed runs count every logged epoch."""
    spec = ctx.spec
    final = [e for e in runlog.read_log(ctx.path(runlog.LOG)) if e["phase"] == "final"]
    if final:
        test_loss, test_acc = final[-1]["eval_loss"], final[-1]["eval_acc"]
    else:  # a schedule of 0 epochs: the untrained network is the result
        split = ctx.split("final")
        test_loss, test_acc = evaluate(stack, split.eval_x, split.eval_y)
    rates = [e["images_per_s"] for e in final if e["images_per_s"]]
    return {"row": spec.row, "experiment": spec.experiment, "backend": spec.stack.backend,
            "device": stack.device, "dataset": spec.dataset, "params": stack.param_count(),
            "schedule_found": extra["schedule_found"], "schedule_used": list(used),
            "lr_stages": list(spec.train.lr_stages), "test_loss": test_loss,
            "test_acc": test_acc, "final_epochs": len(final),
            # medians: the first epoch of each process also pays the stack's compilation
            "sec_per_epoch": float(np.median([e["seconds"] for e in final])) if final else None,
            "images_per_s": float(np.median(rates)) if rates else None,
            "search_best": extra["search_best"], "fake_data": ctx.fake_data,
            "data": ctx.data_source, "status": "done"}
