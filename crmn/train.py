"""The training driver: the paper's protocol (section 4, SPEC §5) over any :class:`Backend`.

Written once for both stacks. One call of :func:`run` trains one configuration and seed into
one run directory (crmn/LOGS.md):

1. **Search run** (skipped when ``train.schedule`` is given): train on the seeded 90 % share
   of the training set, validate on the other 10 % after every epoch, and follow
   :class:`crmn.schedule.PlateauSchedule`. Whenever the validation result is the best so far,
   the state is saved to ``best.h5``; when a stage plateaus, ``best.h5`` is loaded back and the
   momentum velocities are zeroed before the next, lower learning rate.
2. **Final run**: a network initialised afresh from ``train.seed`` trains on the whole
   training set with :class:`crmn.schedule.FixedSchedule` replaying the schedule found (or the
   given one, each stage bounded by ``train.max_epochs``), and is evaluated on the test set
   after every epoch. The last epoch's test
   result is the run's result (``summary.json``).

Every finished epoch appends one line to ``log.jsonl`` and then atomically replaces
``checkpoint.h5`` (state, schedule, phase, epoch). ``resume=True`` loads that checkpoint,
drops log lines of epochs it does not cover (a kill between the two writes), and replays
from the next epoch. Nothing depends on process-global random state: weights come from
``train.seed`` in the backend and batches are a function of (sampler seed, epoch) in
:class:`crmn.data.BatchSampler`, so a resumed run ends with exactly the parameters of an
uninterrupted one.

Choices: a run directory that already holds ``summary.json`` (status "done") is skipped
with a message and its summary returned; one holding an unfinished run is refused unless
``resume=True``. Evaluation uses ``train.batch_size`` images per batch.
"""
from __future__ import annotations

import dataclasses
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from crmn import checkpoint, runlog
from crmn.config import ModelConfig, TrainConfig
from crmn.errors import CheckpointError, ConfigError, DivergedError, StopRequested
from crmn.schedule import Decision, FixedSchedule, PlateauSchedule

PHASES = ("search", "final")
#: the signal that asked the run to stop at the next epoch's end (None: keep going)
_stop_signal: List[Optional[int]] = [None]


def request_stop(signum: int, frame=None) -> None:
    """Signal handler: finish the epoch in progress, checkpoint it, then stop the run with
    :class:`crmn.errors.StopRequested` (installed by the CLI for SIGUSR1)."""
    _stop_signal[0] = signum


def check_stop(where) -> None:
    """Raise :class:`StopRequested` if a stop was asked for (a safe point: all saved)."""
    if _stop_signal[0] is not None:
        raise StopRequested(f"{where}: stopped by signal {_stop_signal[0]} after its last "
                            f"checkpoint; --resume continues it")
#: keys that separate the sampler streams of the two phases (batches, crops, flips)
_PHASE_KEY = {"search": 0x5345, "final": 0x4649}


def sampler_seed(seed: int, phase: str) -> int:
    """Seed of ``phase``'s batch sampler: a 32-bit number derived from ``(seed, phase)``.

    The two phases draw different batch streams from one ``train.seed``.
    """
    return int(np.random.SeedSequence([seed, _PHASE_KEY[phase]]).generate_state(1)[0])


@dataclasses.dataclass
class _Run:
    """What the phases of one run share; the paths of its files."""

    run_dir: Path
    model: ModelConfig
    train: TrainConfig
    dataset: str
    data_dir: object
    backend: str
    dtype: str
    progress: bool
    splits: Optional[dict]
    verbose: bool = True
    fake_data: bool = False
    epoch_wall: List[float] = dataclasses.field(default_factory=list)  # this process's epochs

    def path(self, name: str) -> Path:
        return self.run_dir / name

    def say(self, text: str) -> None:
        if self.verbose:
            print(text, flush=True)

    def split(self, phase: str):
        """Training and evaluation arrays of ``phase`` (injected or from crmn.data)."""
        if self.splits is not None:
            return self.splits[phase]
        from crmn import data

        return data.prepare(self.dataset, self.data_dir, phase, self.train.seed,
                            val_fraction=self.train.val_fraction, progress=self.progress)


def run(run_dir, *, model: ModelConfig, train: TrainConfig, dataset: str, data_dir,
        backend: str, device: str = "cpu", dtype: str = "float32", row: Optional[str] = None,
        experiment: Optional[str] = None, resume: bool = False, progress: bool = True,
        verbose: bool = True, backend_obj=None, splits: Optional[dict] = None,
        backend_factory: Optional[Callable[[], object]] = None) -> Dict:
    """Train one configuration and seed through search and final run (SPEC §5).

    Parameters
    ----------
    run_dir : path
        ``runs/<experiment>/<row>/seed<k>/``; created if missing.
    model, train : ModelConfig, TrainConfig
        The network and the protocol; ``train.seed`` seeds the data split, the weights and
        the batches.
    dataset, data_dir : str, path
        Passed to :func:`crmn.data.prepare` (unused when ``splits`` is given).
    backend, device, dtype : str
        Passed to :func:`crmn.backend.make_backend`; ``backend`` and ``dtype`` are also
        recorded and checked on resume.
    row, experiment : str or None
        Recorded in config.json and summary.json.
    resume : bool
        Continue from ``checkpoint.h5`` (``--resume``).
    progress : bool
        Draw a batch counter (on a terminal) and download progress bars.
    verbose : bool
        Print the backend, a line per epoch and the result.
    backend_obj : Backend or None
        A backend freshly initialised from ``train.seed``, used for the first phase trained.
        Without ``backend_factory``, the final run resets it to a copy of its initial state
        taken before any training, which equals a fresh backend from the same seed.
    splits : {"search": Split, "final": Split} or None
        Injected data instead of :func:`crmn.data.prepare`.
    backend_factory : callable () -> Backend, or None
        Builds a fresh backend (first phase when ``backend_obj`` is None, and the final run);
        default ``make_backend(backend, model, train, device, dtype)``.

    Returns
    -------
    dict
        The summary written to ``summary.json`` (crmn/LOGS.md).

    Raises
    ------
    ConfigError
        An unfinished run exists and ``resume`` is False.
    CheckpointError
        ``checkpoint.h5`` is unreadable or from another configuration.
    DivergedError
        The loss became NaN or infinite; the last good checkpoint stays.
    """
    ctx = _Run(Path(run_dir), model, train, dataset, data_dir, backend, dtype, progress, splits,
               verbose=verbose)
    if splits is None:
        from crmn import data

        ctx.fake_data = data.is_fake(dataset, data_dir)
    finished = _finished_summary(ctx, resume)
    if finished is not None:
        return finished
    try:
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{ctx.run_dir}: cannot create the run directory "
                          f"({e.strerror or e}); choose another --out-dir") from None
    _remove_stale_temporaries(ctx.run_dir)
    if backend_factory is None and backend_obj is None:
        from crmn.backend import make_backend

        def backend_factory():
            return make_backend(backend, model, train, device=device, dtype=dtype)

    net = backend_obj if backend_obj is not None else backend_factory()
    # the final run restarts an injected backend from this copy of its seeded state
    searching = train.schedule is None
    initial = _copy(net.get_state()) if backend_factory is None and searching else None
    ctx.say(f"{ctx.run_dir}: backend {net.name} on {net.device}, dtype {dtype}, "
            f"{net.param_count():,} trainable parameters")
    if ctx.fake_data:
        print(f"warning: {data_dir} holds fake {dataset} data (crmn.data write_fake); this "
              "run's accuracies say nothing about the paper's", file=sys.stderr, flush=True)
    resumed = _resume_point(ctx, resume)
    if resumed is None or not ctx.path(runlog.CONFIG).exists():
        runlog.write_json(ctx.path(runlog.CONFIG),
                          _config(ctx, net, row, experiment, device))

    extra = {"schedule_found": None, "search_best": None}
    if resumed is not None:
        extra = {k: resumed[1].get(k) for k in extra}
    if train.schedule is None and (resumed is None or resumed[1]["phase"] == "search"):
        sched = _search(ctx, net, resumed)
        extra = {"schedule_found": sched.found, "search_best": sched.best}
        resumed = None
        net = backend_factory() if backend_factory is not None else _reset(net, initial)
    used = extra["schedule_found"]
    if train.schedule is not None:  # --schedule, bounded by --epochs-cap like every stage
        used = [e if train.max_epochs is None else min(e, train.max_epochs)
                for e in train.schedule]
    _final(ctx, net, used, resumed, extra)
    summary = _summary(ctx, net, row, experiment, used, extra)
    runlog.write_json(ctx.path(runlog.SUMMARY), summary)
    ctx.say(f"{ctx.run_dir}: done, test accuracy {100 * summary['test_acc']:.2f} % after "
            f"{summary['final_epochs']} epochs (schedule {used})")
    return summary


# --- run directory ---------------------------------------------------------------------

def _finished_summary(ctx: _Run, resume: bool) -> Optional[Dict]:
    """The summary of a finished run (skipped), None for a new one; refuses an unfinished
    run unless resuming."""
    summary_path = ctx.path(runlog.SUMMARY)
    if summary_path.exists():
        summary = runlog.read_json(summary_path)
        if summary.get("status") == "done":
            _check_same_run(ctx)
            ctx.say(f"{ctx.run_dir}: already finished ({runlog.SUMMARY}), skipping")
            return summary
    if resume:
        return None
    # config.json alone (e.g. the data could not be downloaded) means nothing was trained
    for name in (runlog.CHECKPOINT, runlog.LOG, runlog.BEST):
        if ctx.path(name).exists():
            raise ConfigError(f"{ctx.path(name)}: an unfinished run is already here; pass "
                              f"--resume to continue it, or delete {ctx.run_dir} to start over")
    return None


def _check_same_run(ctx: _Run) -> None:
    """A finished run is only reused for the configuration it was trained with."""
    path = ctx.path(runlog.CONFIG)
    config = runlog.read_json(path) if path.exists() else {}
    try:
        checkpoint.check_compatible(config, ctx.model, ctx.train, dataset=ctx.dataset,
                                    path=path, source=runlog.CONFIG)
    except CheckpointError as e:
        raise ConfigError(f"{e}: {ctx.run_dir} holds a finished run of another "
                          "configuration; choose another --out-dir or delete it") from None


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files of writes that a kill interrupted (the real files are intact)."""
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink()


def _resume_point(ctx: _Run, resume: bool) -> Optional[Tuple[Dict, Dict]]:
    """``(arrays, meta)`` of checkpoint.h5 when resuming from one, else None.

    The log keeps only the epochs the checkpoint covers: a run killed after writing an
    epoch's log line but before its checkpoint will redo (and re-log) that epoch.
    """
    ckpt = ctx.path(runlog.CHECKPOINT)
    log = ctx.path(runlog.LOG)
    if not resume or not ckpt.exists():
        if log.exists():
            runlog.rewrite_log(log, [])  # no checkpoint: the run starts over from its seed
        return None
    arrays, meta = checkpoint.load(ckpt)
    # The backend and dtype may change on resume: both stacks read the canonical format.
    checkpoint.check_compatible(meta, ctx.model, ctx.train, dataset=ctx.dataset, path=ckpt)
    _record_resume(ctx, meta)
    order = PHASES.index(meta["phase"])
    kept = [e for e in runlog.read_log(log)
            if PHASES.index(e["phase"]) < order
            or (e["phase"] == meta["phase"] and e["epoch"] <= meta["epoch"])]
    runlog.rewrite_log(log, kept)
    ctx.say(f"{ctx.run_dir}: resuming {meta['phase']} run after epoch {meta['epoch']}")
    return arrays, meta


def _record_resume(ctx: _Run, meta: Dict) -> None:
    """Note in config.json who continued the run; say so when the stack or dtype changes."""
    if (meta.get("backend"), meta.get("dtype")) != (ctx.backend, ctx.dtype):
        ctx.say(f"{ctx.run_dir}: checkpoint written by {meta.get('backend')} "
                f"({meta.get('dtype')}), continuing with {ctx.backend} ({ctx.dtype})")
    path = ctx.path(runlog.CONFIG)
    if path.exists():
        config = runlog.read_json(path)
        config.setdefault("resumes", []).append(
            {"phase": meta["phase"], "after_epoch": meta["epoch"], "backend": ctx.backend,
             "dtype": ctx.dtype,
             "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        runlog.write_json(path, config)


def _config(ctx: _Run, net, row, experiment, device: str) -> Dict:
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("h5py", "theano", "lasagne", "torch"):
        if mod in sys.modules:
            versions[mod] = getattr(sys.modules[mod], "__version__", "?")
    return {"row": row, "experiment": experiment, "dataset": ctx.dataset,
            "backend": ctx.backend, "device": net.device, "device_requested": device,
            "dtype": ctx.dtype, "model": ctx.model.to_dict(), "train": ctx.train.to_dict(),
            "seed": ctx.train.seed, "fake_data": ctx.fake_data, "versions": versions,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _copy(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    # a backend may hand out views of its live buffers
    return {k: np.array(v, copy=True) for k, v in state.items()}


def _reset(net, initial: Dict[str, np.ndarray]):
    """The injected backend, back at its seeded initial state (velocities included)."""
    net.set_state(initial)
    net.reset_velocity()
    return net


# --- phases ------------------------------------------------------------------------------

def _search(ctx: _Run, net, resumed) -> PlateauSchedule:
    """Search run on the 90 % split; returns the finished plateau schedule."""
    if resumed is not None:
        arrays, meta = resumed
        net.set_state(arrays)
        sched = PlateauSchedule.from_state(meta["schedule"])
    else:
        sched = PlateauSchedule(ctx.train.lr_stages, ctx.train.patience, ctx.train.max_epochs)
    _train_phase(ctx, "search", net, sched, {"schedule_found": None, "search_best": None})
    ctx.say(f"{ctx.run_dir}: search done, schedule found {sched.found} "
            f"(epochs per lr {list(ctx.train.lr_stages)}), best {sched.best}")
    return sched


def _final(ctx: _Run, net, used: List[int], resumed, extra: Dict) -> FixedSchedule:
    """Final run on the full training set with the fixed schedule ``used``."""
    if resumed is not None:
        arrays, meta = resumed
        net.set_state(arrays)
        sched = FixedSchedule.from_state(meta["schedule"])
    else:
        sched = FixedSchedule(ctx.train.lr_stages, used)
    _train_phase(ctx, "final", net, sched, extra)
    return sched


def _train_phase(ctx: _Run, phase: str, net, sched, extra: Dict) -> None:
    split = ctx.split(phase)
    from crmn.data import BatchSampler

    seed = sampler_seed(ctx.train.seed, phase)
    sampler = BatchSampler(split.train_x, split.train_y, ctx.train.batch_size, seed,
                           pad=ctx.train.pad, flip=ctx.train.flip)
    while not sched.done:
        _one_epoch(ctx, phase, net, sched, sampler, split, extra)


def _one_epoch(ctx: _Run, phase: str, net, sched, sampler, split, extra: Dict) -> None:
    """Train, evaluate, decide, log, checkpoint: one epoch of either phase."""
    t0 = time.perf_counter()
    lr, stage, epoch = sched.lr, sched.stage, sched.epoch + 1
    stats = _train_epoch(ctx, phase, net, sampler, epoch, lr)
    eval_loss, eval_acc = net.evaluate(split.eval_x, split.eval_y, ctx.train.batch_size)
    _check_finite(ctx, phase, epoch, f"{split.eval_name} loss", eval_loss)
    decision = sched.step(eval_loss, eval_acc)
    meta = _meta(ctx, phase, sched, sampler.seed, extra)
    if phase == "search" and sched.improved:
        checkpoint.save(ctx.path(runlog.BEST), net.get_state(), meta)
    entry = {"phase": phase, "epoch": epoch, "stage": stage, "lr": lr,
             "train_loss": stats.loss, "train_acc": stats.acc, "eval_split": split.eval_name,
             "eval_loss": eval_loss, "eval_acc": eval_acc, "seconds": stats.seconds,
             "images_per_s": stats.images / stats.seconds if stats.seconds > 0 else None,
             "decision": decision.value, "time": time.time()}
    runlog.append_entry(ctx.path(runlog.LOG), entry)
    if decision == Decision.RELOAD:
        best, _ = checkpoint.load(ctx.path(runlog.BEST))
        net.set_state(best)
        net.reset_velocity()  # the next stage starts from rest at its new rate
    checkpoint.save(ctx.path(runlog.CHECKPOINT), net.get_state(), meta)
    ctx.epoch_wall.append(time.perf_counter() - t0)
    ctx.say(_epoch_line(ctx, entry, sched, improved=sched.improved and phase == "search"))
    check_stop(ctx.run_dir)


def _train_epoch(ctx: _Run, phase: str, net, sampler, epoch: int, lr: float):
    try:
        stats = net.train_epoch(sampler, epoch, lr, progress=_batch_counter(ctx, phase, epoch))
    except DivergedError as e:
        raise DivergedError(f"{ctx.run_dir}: {phase} epoch {epoch} diverged ({e}); the last "
                            f"good checkpoint {runlog.CHECKPOINT} is kept") from e
    finally:
        if ctx.progress and sys.stderr.isatty():
            sys.stderr.write("\r\033[K")
    _check_finite(ctx, phase, epoch, "training loss", stats.loss)
    return stats


def _check_finite(ctx: _Run, phase: str, epoch: int, what: str, value: float) -> None:
    if not math.isfinite(value):
        raise DivergedError(f"{ctx.run_dir}: {what} is {value} in {phase} epoch {epoch}; the "
                            f"last good checkpoint {runlog.CHECKPOINT} is kept")


def _meta(ctx: _Run, phase: str, sched, seed: int, extra: Dict) -> Dict:
    return {"model": ctx.model.to_dict(), "train": ctx.train.to_dict(), "backend": ctx.backend,
            "dtype": ctx.dtype, "dataset": ctx.dataset, "phase": phase, "epoch": sched.epoch,
            "schedule": sched.state_dict(), "sampler_seed": seed, "best": sched.best,
            **extra}


# --- progress ----------------------------------------------------------------------------

def _batch_counter(ctx: _Run, phase: str, epoch: int):
    """A ``progress(done, total, loss)`` callback drawing a counter on a terminal."""
    if not (ctx.progress and sys.stderr.isatty()):
        return None
    t0 = time.perf_counter()

    def show(done: int, total: int, loss: float) -> None:
        rate = done / max(time.perf_counter() - t0, 1e-9)
        sys.stderr.write(f"\r  {phase} epoch {epoch}: batch {done}/{total} loss {loss:.4f} "
                         f"({rate:.1f} batches/s)")
        sys.stderr.flush()

    return show


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
            + (" | best" if improved else "")
            + ("" if e["decision"] == "continue" else f" | {e['decision']}"))


# --- summary -----------------------------------------------------------------------------

def _summary(ctx: _Run, net, row, experiment, used: List[int], extra: Dict) -> Dict:
    """summary.json from the log (crmn/LOGS.md); resumed runs count every logged epoch."""
    final = [e for e in runlog.read_log(ctx.path(runlog.LOG)) if e["phase"] == "final"]
    if final:
        test_loss, test_acc = final[-1]["eval_loss"], final[-1]["eval_acc"]
    else:  # a schedule of 0 epochs: the untrained network is the result
        split = ctx.split("final")
        test_loss, test_acc = net.evaluate(split.eval_x, split.eval_y, ctx.train.batch_size)
    rates = [e["images_per_s"] for e in final if e["images_per_s"]]
    return {"row": row, "experiment": experiment, "backend": ctx.backend, "device": net.device,
            "dataset": ctx.dataset, "params": net.param_count(),
            "schedule_found": extra["schedule_found"], "schedule_used": list(used),
            "lr_stages": list(ctx.train.lr_stages), "test_loss": test_loss,
            "test_acc": test_acc, "final_epochs": len(final),
            # medians: the first epoch of each process also pays the stack's compilation
            "sec_per_epoch": float(np.median([e["seconds"] for e in final])) if final else None,
            "images_per_s": float(np.median(rates)) if rates else None,
            "search_best": extra["search_best"], "fake_data": ctx.fake_data,
            "status": "done"}
