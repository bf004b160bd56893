"""The paper's training protocol (section 4, docs/spec.md §5) over any crmn.backend.Backend:
search -> reset -> final. The search trains on 90 % of the training set and finds, stage by
stage, when the validation accuracy stops improving; the final run starts again from the same
seeded weights on the whole training set and replays the epochs per stage the search found.
Nothing depends on global random state, so a resumed run ends with exactly the parameters of
an uninterrupted one."""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from crmn import data, display, registry, runlog
from crmn.errors import ConfigError, DivergedError
from crmn.plan import RunSpec
from crmn.runstate import (CapWatch, CheckpointMeta, LogLine, ResumePoint, RunFolder, Summary,
                         given_schedule, say, warn)
from crmn.schedule import Decision, FixedSchedule, PlateauSchedule

_PHASE_KEY = {"search": 0x5345, "final": 0x4649}  # separates the phases' sampler streams
EVAL_BATCH = 500  # images per forward pass of evaluate (its results do not depend on it)


@dataclasses.dataclass
class EpochStats:
    """What one training epoch reports (means over the epoch's images)."""
    loss: float  # mean cross-entropy (without the weight-decay term)
    acc: float  # fraction of correctly classified training images
    images: int
    seconds: float  # wall-clock seconds of the epoch's steps, compilation left out
    compile_seconds: float = 0.0  # of which the backend compiled (or waited to compile)
    cache_outcome: Optional[str] = None  # "hit", "miss", "off"; None: the backend says nothing


def sampler_seed(seed: int, phase: str) -> int:
    """Seed of ``phase``'s batch sampler: the two phases draw different batch streams."""
    return int(np.random.SeedSequence([seed, _PHASE_KEY[phase]]).generate_state(1)[0])


def run(run_dir, spec: RunSpec, new_backend: Optional[Callable[[], Any]] = None, *,
        resume: bool = False, progress: bool = True, fresh: bool = False,
        stop: Optional[Callable[[Any], None]] = None) -> Dict:
    """Train ``spec`` into ``run_dir`` (a finished run is skipped); its summary.json.
    ``new_backend()`` builds the network (default: crmn.registry.build); ``fresh`` empties it;
    ``stop(folder)``, after each epoch's checkpoint, may end the run (StopRequested)."""
    folder = RunFolder(run_dir, spec)
    with folder.held(fresh):
        if resume:  # another run's options or data are refused before anything changes
            folder.check_same_run(data.fingerprint(spec.dataset, spec.data_dir))
        done = folder.finished(resume)
        if done is not None:
            return done
        build = new_backend or (lambda: registry.build(spec.backend_options, spec.model,
                                                       spec.train))
        return Training(folder, progress, stop).run(build, folder.start(resume))


class Training:
    """One run's training: its folder, and what its phases share."""

    def __init__(self, folder: RunFolder, progress: bool, stop=None):
        self.folder, self.spec, self.progress = folder, folder.spec, progress
        self.stop = stop or (lambda where: None)
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
        if searching:
            # Search: the paper gives no epoch counts, only "until the validation error
            # plateaus"; 10 % of the training set is held out to find them (spec §5).
            initial = {k: np.array(v, copy=True)  # a backend may hand out views of its buffers
                       for k, v in backend.get_state().items()}
            t = self.train
            sched = self.train_phase("search", backend, start,
                                     PlateauSchedule(t.lr_stages, t.patience, t.epochs_cap))
            self.schedule_found, self.search_best, start = sched.found, sched.best, None
            say(f"{folder.dir}: search done, schedule found {sched.found} "
                f"(epochs per lr {list(t.lr_stages)}), best {sched.best}")
            # Reset: the final run starts from the very weights the search started from, at
            # rest, so that its result depends on the schedule found and not on the search.
            backend.set_state(initial)
            backend.reset_velocity()
        # Final: all of the training set, the schedule found (or --schedule) replayed as
        # fixed epochs per stage; its last epoch's test figures are the run's result.
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
        # each phase its own batch stream, a function of the seed and the epoch only, so a
        # resumed epoch draws the batches an uninterrupted one would have drawn
        sampler = data.BatchSampler(split.train_x, split.train_y, self.train.batch_size,
                                    sampler_seed(self.train.seed, phase), pad=self.train.pad,
                                    flip=self.train.flip)
        if self.train.epochs_cap is not None:  # where the cap cuts a stage: capped.h5
            sched = CapWatch(sched, self.folder, backend,
                             lambda s: self.meta(phase, s, sampler.seed))
        while not sched.done:
            self.epoch(phase, backend, sched, sampler, split)
        return sched

    def epoch(self, phase: str, backend, sched, sampler, split) -> None:
        """Train, evaluate, decide, log, checkpoint: one epoch of either phase."""
        folder = self.folder
        t0 = time.perf_counter()
        lr, stage, epoch = sched.lr, sched.stage, sched.epoch + 1
        label = f"[{phase}] epoch {epoch}" if self.progress and sys.stderr.isatty() else None
        # one pass of SGD over this epoch's batches, at the stage's learning rate
        stats = train_epoch(backend, sampler, epoch, lr, progress=label)
        self.check_finite(phase, epoch, "training loss", stats.loss)
        # the search is judged on the held-out 10 %; the final run reports the test set
        eval_loss, eval_acc = evaluate(backend, split.eval_x, split.eval_y)
        self.check_finite(phase, epoch, f"{split.eval_name} loss", eval_loss)
        # the schedule decides: go on, next stage (search: after `patience` epochs without a
        # better validation accuracy), or stop
        decision = sched.step(eval_loss, eval_acc)
        meta = self.meta(phase, sched, sampler.seed)
        if phase == "search" and sched.improved:  # the model a plateau goes back to
            folder.save_best(backend.get_state(), meta)
        line = LogLine(
            phase=phase, epoch=epoch, stage=stage, lr=lr, train_loss=stats.loss,
            train_acc=stats.acc, eval_split=split.eval_name, eval_loss=eval_loss,
            eval_acc=eval_acc, seconds=stats.seconds,
            images_per_s=stats.images / stats.seconds if stats.seconds > 0 else None,
            compile_seconds=stats.compile_seconds, cache_outcome=stats.cache_outcome,
            decision=decision.value, time=time.time())
        folder.log(line)
        if decision == Decision.RELOAD:
            # a plateau: the next stage starts from the best model so far, not the last one,
            # and from rest at its lower rate (the search's reload, spec §5)
            backend.set_state(folder.best_model(sched.best["epoch"]))
            backend.reset_velocity()
        folder.save(backend.get_state(), meta)  # after the reload: a resume starts right here
        self.epoch_wall.append(time.perf_counter() - t0)
        say(display.epoch_line(line, sched.total_epochs, sched.epoch, self.epoch_wall,
                               best=sched.improved and phase == "search"))
        self.stop(folder.dir)

    def meta(self, phase: str, sched, seed: int) -> CheckpointMeta:
        spec = self.spec
        return CheckpointMeta(
            model=spec.model.to_dict(), train=self.train.to_dict(),
            backend=spec.backend_options.backend, dtype=spec.backend_options.dtype,
            dataset=spec.dataset,
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
            search_best=self.search_best, data=self.data_source,
            preprocessing=split.preprocessing.to_dict())


def train_epoch(backend, sampler, epoch: int, lr: float, *, progress: Optional[str] = None,
                fast: Optional[bool] = None) -> EpochStats:
    """One epoch of SGD over ``sampler.epoch(epoch)`` at ``lr`` (``fast``: the backend's
    crmn.backend.FastEpoch path); the sums stay on the device but for the progress bar's reads."""
    use_fast = getattr(backend, "fast_epoch", False) if fast is None else fast
    batches = backend.epoch_batches(sampler, epoch) if use_fast else sampler.epoch(epoch)
    bar = display.Progress(progress, len(sampler), backend) if progress else None
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
                      cache_outcome=getattr(backend, "cache_outcome", None))


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
