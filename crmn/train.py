"""The paper's training protocol (section 4, docs/spec.md §5) over any crmn.backend.Backend: a
search run on 90 % of the training set with plateau reloads of best.h5, then a final run from
the same seeded start on all of it, replaying the schedule found. Nothing depends on global
random state, so a resumed run ends with exactly the parameters of an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from crmn import data, registry, runlog
from crmn.errors import ConfigError, DivergedError, StopRequested
from crmn.plan import RunSpec
from crmn.rundir import (CheckpointMeta, LogLine, ResumePoint, RunFolder, Summary,
                         given_schedule, say, warn)
from crmn.schedule import Decision, FixedSchedule, PlateauSchedule

_PHASE_KEY = {"search": 0x5345, "final": 0x4649}  # separates the phases' sampler streams
EVAL_BATCH = 500  # images per forward pass of evaluate (its results do not depend on it)
PROGRESS_UPDATES = 20  # per epoch; each reads the running loss: a host sync on a GPU
_stop_signal: List[Optional[int]] = [None]  # the signal that asked the run to stop, if any


@dataclasses.dataclass
class EpochStats:
    """What one training epoch reports (means over the epoch's images)."""
    loss: float  # mean cross-entropy (without the weight-decay term)
    acc: float  # fraction of correctly classified training images
    images: int
    seconds: float  # wall-clock seconds of the epoch's steps, compilation left out
    compile_seconds: float = 0.0  # of which the backend compiled (or waited to compile)
    compile_cache: Optional[str] = None  # "hit", "miss", "off"; None: the backend says nothing


def sampler_seed(seed: int, phase: str) -> int:
    """Seed of ``phase``'s batch sampler: the two phases draw different batch streams."""
    return int(np.random.SeedSequence([seed, _PHASE_KEY[phase]]).generate_state(1)[0])


def request_stop(signum: int, frame=None) -> None:
    """Signal handler (SIGUSR1 and Ctrl-C, installed by the CLI): finish the epoch in
    progress, checkpoint it, then stop with StopRequested. A second Ctrl-C stops at once."""
    if signum == signal.SIGINT and _stop_signal[0] == signal.SIGINT:
        raise KeyboardInterrupt
    _stop_signal[0] = signum


def check_stop(where) -> None:
    """Raise StopRequested if a stop was asked for (a safe point: all is saved)."""
    signum = _stop_signal[0]
    if signum is not None:
        raise StopRequested(f"{where}: stopped by {signal.Signals(signum).name} after its "
                            f"last checkpoint; the same command with --resume continues it",
                            signum=signum)


def run(run_dir, spec: RunSpec, new_backend: Optional[Callable[[], Any]] = None, *,
        resume: bool = False, progress: bool = True, fresh: bool = False) -> Dict:
    """Train ``spec`` into ``run_dir`` (a finished run is skipped); its summary.json.
    ``new_backend()`` builds the network (default: crmn.registry.build); ``fresh`` empties it."""
    folder = RunFolder(run_dir, spec)
    with folder.held(fresh):
        if resume:  # another run's options or data are refused before anything changes
            folder.check_same_run(data.fingerprint(spec.dataset, spec.data_dir))
        done = folder.finished(resume)
        if done is not None:
            return done
        build = new_backend or (lambda: registry.build(spec.backend_options, spec.model, spec.train))
        return Training(folder, progress).run(build, folder.start(resume))


class Training:
    """One run's training: its folder, and what its phases share."""

    def __init__(self, folder: RunFolder, progress: bool):
        self.folder, self.spec, self.progress = folder, folder.spec, progress
        self.train = self.spec.train
        self.data_source = "official"  # crmn.data.provenance: official | fake | unverified
        self.description: Optional[str] = None  # crmn.data.describe: not the official files
        self.epoch_wall: List[float] = []  # this process's epochs
        self.loaded: Optional[Tuple[str, Any]] = None  # (phase, crmn.data.Split)
        self.schedule_found: Optional[List[int]] = None  # the search's results
        self.search_best: Optional[Dict] = None

    def run(self, new_backend: Callable[[], Any], start: Optional[ResumePoint]) -> Dict:
        """Build the backend, train the phases due from ``start``, write the summary."""
        spec, folder = self.spec, self.folder
        if start is not None:
            self.schedule_found = start.meta.schedule_found
            self.search_best = start.meta.search_best
        searching = self.train.schedule is None and (start is None
                                                     or start.meta.phase == "search")
        self.split("search" if searching else "final")  # no dataset: fail before the build
        self.note_data()
        backend = new_backend()
        say(f"{folder.dir}: backend {backend.name} on {backend.device}, dtype "
            f"{spec.backend_options.dtype}, {backend.param_count():,} trainable parameters")
        if start is None or not folder.path(runlog.CONFIG).exists():
            folder.write_config(backend, self.data_source, self.description,
                                data.fingerprint(spec.dataset, spec.data_dir))
        if searching:  # the search run, on the 90 % split
            initial = {k: np.array(v, copy=True)  # a backend may hand out views of its buffers
                       for k, v in backend.get_state().items()}
            t = self.train
            sched = self.train_phase("search", backend, start,
                                     PlateauSchedule(t.lr_stages, t.patience, t.epochs_cap))
            self.schedule_found, self.search_best, start = sched.found, sched.best, None
            say(f"{folder.dir}: search done, schedule found {sched.found} "
                f"(epochs per lr {list(t.lr_stages)}), best {sched.best}")
            backend.set_state(initial)  # the final run starts where the search started
            backend.reset_velocity()
        used = self.schedule_found if self.train.schedule is None else \
            given_schedule(self.train)
        self.train_phase("final", backend, start, FixedSchedule(self.train.lr_stages, used))
        summary = self.summary(backend, used)
        folder.write_summary(summary)
        say(f"{folder.dir}: done, test accuracy {100 * summary.test_acc:.2f} % after "
            f"{summary.final_epochs} epochs (schedule {used})")
        return dataclasses.asdict(summary)

    def train_phase(self, phase: str, backend, start: Optional[ResumePoint], sched):
        """Train ``phase`` with the new schedule ``sched``, or on from ``start``."""
        if start is not None:
            backend.set_state(start.arrays)
            sched = type(sched).from_state(start.meta.schedule)
            if phase == "search" and sched.best is not None and not sched.done:
                self.folder.best_model(sched.best["epoch"], exact=False)  # a reload needs it
        split = self.split(phase)
        sampler = data.BatchSampler(split.train_x, split.train_y, self.train.batch_size,
                                    sampler_seed(self.train.seed, phase), pad=self.train.pad,
                                    flip=self.train.flip)
        while not sched.done:
            self.epoch(phase, backend, sched, sampler, split)
        return sched

    def epoch(self, phase: str, backend, sched, sampler, split) -> None:
        """Train, evaluate, decide, log, checkpoint: one epoch of either phase."""
        folder = self.folder
        t0 = time.perf_counter()
        lr, stage, epoch = sched.lr, sched.stage, sched.epoch + 1
        label = f"[{phase}] epoch {epoch}" if self.progress and sys.stderr.isatty() else None
        stats = train_epoch(backend, sampler, epoch, lr, progress=label)
        self.check_finite(phase, epoch, "training loss", stats.loss)
        eval_loss, eval_acc = evaluate(backend, split.eval_x, split.eval_y)
        self.check_finite(phase, epoch, f"{split.eval_name} loss", eval_loss)
        before = sched.state_dict()
        decision = sched.step(eval_loss, eval_acc)
        meta = self.meta(phase, sched, sampler.seed)
        if phase == "search" and sched.improved:
            folder.save_best(backend.get_state(), meta)
        folder.note_cut(backend, meta, before, sched, decision, eval_loss, eval_acc)
        line = LogLine(
            phase=phase, epoch=epoch, stage=stage, lr=lr, train_loss=stats.loss,
            train_acc=stats.acc, eval_split=split.eval_name, eval_loss=eval_loss,
            eval_acc=eval_acc, seconds=stats.seconds,
            images_per_s=stats.images / stats.seconds if stats.seconds > 0 else None,
            compile_seconds=stats.compile_seconds, compile_cache=stats.compile_cache,
            decision=decision.value, time=time.time())
        folder.log(line)
        if decision == Decision.RELOAD:
            backend.set_state(folder.best_model(sched.best["epoch"]))
            backend.reset_velocity()  # the next stage starts from rest at its new rate
        folder.save(backend.get_state(), meta)
        self.epoch_wall.append(time.perf_counter() - t0)
        say(self.epoch_line(line, sched, best=sched.improved and phase == "search"))
        check_stop(folder.dir)

    def meta(self, phase: str, sched, seed: int) -> CheckpointMeta:
        spec = self.spec
        return CheckpointMeta(
            model=spec.model.to_dict(), train=self.train.to_dict(),
            backend=spec.backend_options.backend, dtype=spec.backend_options.dtype, dataset=spec.dataset,
            phase=phase, epoch=sched.epoch, schedule=sched.state_dict(), sampler_seed=seed,
            best=sched.best, schedule_found=self.schedule_found, search_best=self.search_best)

    def check_finite(self, phase: str, epoch: int, what: str, value: float) -> None:
        """The one NaN/inf check of a run: stop it, saying what stays."""
        if not math.isfinite(value):
            ckpt = self.folder.path(runlog.CHECKPOINT)
            kept = (f"the last good checkpoint {ckpt} is kept" if ckpt.exists() else
                    "no epoch had finished, so there is no checkpoint to keep")
            raise DivergedError(f"{self.folder.dir}: {what} is {value} in {phase} epoch "
                                f"{epoch} of row {self.spec.row or '(no paper row)'}; {kept}; "
                                "a lower --lr may train (in another --out-dir)")

    def split(self, phase: str):
        """Training and evaluation arrays of ``phase`` (crmn.data), loaded once per phase."""
        if self.loaded is None or self.loaded[0] != phase:
            self.loaded = None  # free the other phase's arrays first
            spec, t = self.spec, self.train
            self.loaded = (phase, data.prepare(
                spec.dataset, spec.data_dir, phase, t.seed, val_fraction=t.val_fraction,
                progress=self.progress, unverified=spec.unverified_data, subset=spec.subset))
        return self.loaded[1]

    def note_data(self) -> None:
        """Record where the data come from; warn unless official (no paper comparison)."""
        spec = self.spec
        self.data_source = data.provenance(spec.dataset, spec.data_dir,
                                           unverified=spec.unverified_data)
        self.description = data.describe(spec.dataset, spec.data_dir, spec.subset)
        if self.data_source == "fake":
            warn(f"{spec.data_dir} holds fake {spec.dataset} data (crmn.data write_fake); "
                 "this run's accuracies say nothing about the paper's")
        elif self.data_source == "unverified":
            why = f"are {self.description}" if self.description else \
                f"were not checked against the official files ({data.UNVERIFIED_FLAG})"
            warn(f"the {spec.dataset} data in {spec.data_dir} {why}; compare lists this run as "
                 "not as published")

    def epoch_line(self, e: LogLine, sched, best: bool) -> str:
        """``[search] epoch 12 stage 0 lr 0.1 | train loss 1.2 acc 45.6% | val ... | 30.2 s``"""
        total = sched.total_epochs
        eta = "" if total is None or not self.epoch_wall else \
            f" | ETA {_fmt_duration((total - sched.epoch) * float(np.mean(self.epoch_wall)))}"
        ips = f"{e.images_per_s:.0f} img/s" if e.images_per_s else "- img/s"
        hit = " (compile cache hit)" if e.compile_cache == "hit" else ""
        compiled = f" | + {e.compile_seconds:.0f} s compiling{hit}" \
            if e.compile_seconds >= 0.5 else ""
        of = f"/{total}" if total is not None else ""
        return (f"[{e.phase}] epoch {e.epoch}{of} stage {e.stage} lr {e.lr:g} | "
                f"train loss {e.train_loss:.4f} acc {100 * e.train_acc:.2f}% | "
                f"{e.eval_split} loss {e.eval_loss:.4f} acc {100 * e.eval_acc:.2f}% | "
                f"{e.seconds:.1f} s {ips}{eta}{compiled}" + (" | best" if best else "")
                + ("" if e.decision == "continue" else f" | {e.decision}"))

    def summary(self, backend, used: List[int]) -> Summary:
        """The run's result from the log: a resumed run counts every logged epoch."""
        spec = self.spec
        final = self.folder.lines("final")
        split = self.split("final")  # loaded already, but where the run resumed here
        if final:
            test_loss, test_acc = final[-1].eval_loss, final[-1].eval_acc
        else:  # a schedule of 0 epochs: the untrained network is the result
            test_loss, test_acc = evaluate(backend, split.eval_x, split.eval_y)
        rates = [e.images_per_s for e in final if e.images_per_s]
        return Summary(
            row=spec.row, experiment=spec.experiment, backend=spec.backend_options.backend,
            device=backend.device, dataset=spec.dataset, params=backend.param_count(),
            schedule_found=self.schedule_found, schedule_used=list(used),
            lr_stages=list(self.train.lr_stages), test_loss=test_loss, test_acc=test_acc,
            final_epochs=len(final),
            # medians: the first epoch of each process also pays the backend's compilation
            sec_per_epoch=float(np.median([e.seconds for e in final])) if final else None,
            images_per_s=float(np.median(rates)) if rates else None,
            search_best=self.search_best, fake_data=self.data_source == "fake",
            data=self.data_source, preprocessing=split.preprocessing.to_dict())


def train_epoch(backend, sampler, epoch: int, lr: float, *, progress: Optional[str] = None,
                fast: Optional[bool] = None) -> EpochStats:
    """One epoch of SGD over ``sampler.epoch(epoch)`` at ``lr`` (``fast``: the backend's
    crmn.backend.FastEpoch path); the sums stay on the device but for the progress bar's reads."""
    use_fast = getattr(backend, "fast_epoch", False) if fast is None else fast
    batches = backend.epoch_batches(sampler, epoch) if use_fast else sampler.epoch(epoch)
    bar = Progress(progress, len(sampler), backend) if progress else None
    loss_sum, correct, images = 0.0, 0, 0  # the sums: device scalars after the first step
    compiled0 = getattr(backend, "compile_seconds", 0.0)
    t0 = time.perf_counter()
    try:
        for done, (xb, yb) in enumerate(batches, 1):
            batch_loss, batch_correct = backend.step(xb, yb, lr)
            loss_sum = loss_sum + batch_loss
            correct = correct + batch_correct
            images += len(yb)
            if bar is not None and bar.due(done):
                bar.show(done, images, float(loss_sum) / images)
        loss = float(loss_sum)  # the epoch's one host sync: the device's work ends here
        seconds = time.perf_counter() - t0
        compiled = getattr(backend, "compile_seconds", 0.0) - compiled0
    finally:
        if bar is not None:
            bar.close()
    if images == 0:
        raise ConfigError("the sampler yielded no batch in this epoch")
    return EpochStats(loss=loss / images, acc=float(correct) / images, images=images,
                      seconds=seconds - compiled, compile_seconds=compiled,
                      compile_cache=getattr(backend, "compile_cache", None))


def evaluate(backend, x: np.ndarray, y: np.ndarray,
             batch_size: int = EVAL_BATCH) -> Tuple[float, float]:
    """(mean cross-entropy, accuracy) in inference mode, in float64 from the backend's logits,
    so that both backends report the same numbers for the same logits."""
    if len(y) == 0:
        raise ConfigError("evaluate() needs at least one image")
    loss_sum, correct = 0.0, 0
    for xb, yb in data.iterate_eval(x, y, batch_size):
        z = np.asarray(backend.logits(xb, training=False), dtype=np.float64)  # (B, classes)
        z = z - z.max(axis=1, keepdims=True)  # a stable log-softmax
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        yb = np.asarray(yb, dtype=np.int64)
        loss_sum += float(-logp[np.arange(len(yb)), yb].sum())
        correct += int((z.argmax(axis=1) == yb).sum())
    return loss_sum / len(y), correct / len(y)


class Progress:
    """A one-line progress bar on a terminal: batches, images/s, ETA, loss; until the first
    step returns (the backends compile there) it counts ``compiling… N s`` each second."""

    def __init__(self, label: str, total: int, backend):
        self.label, self.total, self.backend = label, total, backend
        self.stream = sys.stderr
        self.t0 = time.perf_counter()
        self.every = max(1, total // PROGRESS_UPDATES)
        self.first = None  # (done, images, time) after the first step
        self._stepped = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stepped.wait(1.0):
            hit = getattr(self.backend, "compile_cache", None) == "hit"
            doing = "compile cache hit" if hit else "compiling"
            self._write(f"{self.label} {doing}\u2026 {time.perf_counter() - self.t0:.0f} s")

    def _write(self, text: str) -> None:
        self.stream.write(f"\r  {text}\033[K" if text else "\r\033[K")
        self.stream.flush()

    def due(self, done: int) -> bool:
        return done == 1 or done % self.every == 0 or done == self.total

    def show(self, done: int, images: int, loss: float) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (done, images, now)
            self._stop_ticker()
        d0, i0, t0 = self.first
        elapsed = max(now - t0, 1e-9)
        rate = f"{(images - i0) / elapsed:.0f} img/s" if done > d0 else "- img/s"
        eta = (f"ETA {_fmt_duration(elapsed / (done - d0) * (self.total - done))}"
               if done > d0 else "ETA -")
        width = 20
        bar = "#" * (width * done // self.total) + "." * (width - width * done // self.total)
        self._write(f"{self.label} [{bar}] {done}/{self.total} {rate} {eta} loss {loss:.4f}")

    def _stop_ticker(self) -> None:
        self._stepped.set()
        self._ticker.join()

    def close(self) -> None:
        self._stop_ticker()
        self._write("")


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
