"""The training driver (crmn/train.py) on the numpy toy backend (tests/toy_backend.py)."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from crmn import checkpoint, runlog, train as trainer
from crmn.errors import CheckpointError, CRMNError, DivergedError, RunError
from toy_backend import (TOY_MODEL, TOY_TRAIN, SimulatedCrash, ToyBackend, epoch_hook,
                         run_toy)

REPO = Path(__file__).resolve().parents[1]
# wall-clock fields
VOLATILE = ("time", "seconds", "images_per_s", "compile_seconds", "cache_outcome")


def stable_log(run_dir):
    return [{k: v for k, v in e.items() if k not in VOLATILE}
            for e in runlog.read_log(Path(run_dir) / "log.jsonl")]


def stable_summary(summary):
    return {k: v for k, v in summary.items() if k not in ("sec_per_epoch", "images_per_s")}


def assert_same_run(a, b):
    """Two run directories hold the same training: arrays, log and summary."""
    arrays_a, meta_a = checkpoint.load(Path(a) / "checkpoint.h5")
    arrays_b, meta_b = checkpoint.load(Path(b) / "checkpoint.h5")
    assert sorted(arrays_a) == sorted(arrays_b)
    for name in arrays_a:
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)
    assert meta_a == meta_b
    assert stable_log(a) == stable_log(b)
    assert stable_summary(runlog.read_json(Path(a) / "summary.json")) == \
        stable_summary(runlog.read_json(Path(b) / "summary.json"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted toy run: (run_dir, summary)."""
    run_dir = tmp_path_factory.mktemp("reference") / "seed3"
    return run_dir, run_toy(run_dir)


def test_full_run_writes_every_file(reference):
    run_dir, summary = reference
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "best.h5", "checkpoint.h5", "checkpoint.prev.h5", "config.json", "log.jsonl",
        "summary.json"]
    # the last good checkpoint but one: the epoch before the last
    _, last = checkpoint.load(run_dir / "checkpoint.h5")
    _, prev = checkpoint.load(run_dir / "checkpoint.prev.h5")
    assert (prev["phase"], prev["epoch"]) == (last["phase"], last["epoch"] - 1)
    config = runlog.read_json(run_dir / "config.json")
    assert config["model"] == TOY_MODEL.to_dict() and config["seed"] == 3
    assert config["backend"] == "toy" and "numpy" in config["versions"]

    log = runlog.read_log(run_dir / "log.jsonl")
    search = [e for e in log if e["phase"] == "search"]
    final = [e for e in log if e["phase"] == "final"]
    assert log == search + final  # search first, then final
    assert [e["epoch"] for e in search] == list(range(1, len(search) + 1))
    assert all(e["eval_split"] == "val" for e in search)
    assert all(e["eval_split"] == "test" for e in final)
    assert search[-1]["decision"] == "stop" and final[-1]["decision"] == "stop"
    assert [e["decision"] for e in search].count("reload") == len(TOY_TRAIN.lr_stages) - 1
    for e in log:
        assert e["lr"] == TOY_TRAIN.lr_stages[e["stage"]]

    # the schedule found is replayed by the final run
    found = summary["schedule_found"]
    assert found is not None and summary["schedule_used"] == found
    assert summary["final_epochs"] == len(final) == sum(found)
    assert [sum(1 for e in final if e["stage"] == s) for s in range(len(found))] == found
    assert summary["test_acc"] == final[-1]["eval_acc"]
    assert summary["test_acc"] > 0.6  # learnable class templates: far above chance (1/10)
    assert summary["params"] == 3 * 32 * 32 * 10 + 10 and summary["status"] == "done"

    _, meta = checkpoint.load(run_dir / "checkpoint.h5")
    assert (meta["phase"], meta["epoch"]) == ("final", sum(found))
    _, best_meta = checkpoint.load(run_dir / "best.h5")
    assert best_meta["phase"] == "search"
    best_epoch = max(search, key=lambda e: (e["eval_acc"], -e["eval_loss"]))["epoch"]
    assert best_meta["best"]["epoch"] == best_epoch == summary["search_best"]["epoch"]


class SpyBackend(ToyBackend):
    """Records every set_state/reset_velocity (and, through :func:`epoch_hook`, the state
    after each epoch's training)."""

    def __init__(self, *a, **kw):
        self.after_epoch, self.events = [], []
        super().__init__(*a, **kw)

    def set_state(self, state):
        self.events.append(("set_state", {k: v.copy() for k, v in state.items()}))
        super().set_state(state)

    def reset_velocity(self):
        super().reset_velocity()
        self.events.append(("reset_velocity", self.get_state()))


def test_plateau_reloads_the_best_model_and_zeroes_velocities(tmp_path):
    spy = SpyBackend(TOY_MODEL, TOY_TRAIN)
    initial = spy.get_state()
    spy.events.clear()
    with epoch_hook(lambda backend, epoch, stats: backend.after_epoch.append(backend.get_state())):
        run_toy(tmp_path / "r", backend=spy)
    search = [e for e in runlog.read_log(tmp_path / "r" / "log.jsonl") if e["phase"] == "search"]
    reload_at = [e["epoch"] for e in search if e["decision"] == "reload"]
    assert len(reload_at) == 1
    stage0 = [e for e in search if e["stage"] == 0]
    best = max(stage0, key=lambda e: (e["eval_acc"], -e["eval_loss"]))["epoch"]
    # the reload, then the final run's restart from the seeded initial state
    assert [name for name, _ in spy.events] == ["set_state", "reset_velocity"] * 2
    reloaded = spy.events[0][1]
    for name, a in spy.after_epoch[best - 1].items():
        np.testing.assert_array_equal(reloaded[name], a, err_msg=name)
    # the toy data make the best stage-0 epoch an earlier one than the plateau's last
    assert best < reload_at[0]
    assert not np.array_equal(reloaded["fc.W"], spy.after_epoch[reload_at[0] - 1]["fc.W"])
    # then the velocities were zeroed, the weights left at the best model's
    after_reset = spy.events[1][1]
    for name, a in after_reset.items():
        if name.startswith("velocity."):
            assert not a.any(), name
        else:
            np.testing.assert_array_equal(a, reloaded[name], err_msg=name)
    assert reloaded["velocity.fc.W"].any()  # best.h5 did hold a non-zero velocity
    for name, a in initial.items():  # the final run started where a fresh backend starts
        np.testing.assert_array_equal(spy.events[2][1][name], a, err_msg=name)
    assert all(not a.any() for n, a in spy.events[3][1].items() if n.startswith("velocity."))


def test_epochs_cap_bounds_a_given_schedule(tmp_path):
    train = dataclasses.replace(TOY_TRAIN, schedule=(3, 2), epochs_cap=1)
    summary = run_toy(tmp_path / "r", train=train)
    assert summary["schedule_used"] == [1, 1] and summary["final_epochs"] == 2


def test_non_finite_epoch_loss_from_a_backend_is_caught(tmp_path):
    """A backend's infinite loss in epoch 3, without raising itself: the loop stops the run."""

    def inf_in_epoch_3(backend, epoch, stats):
        return dataclasses.replace(stats, loss=float("inf")) if epoch == 3 else None

    with epoch_hook(inf_in_epoch_3), \
            pytest.raises(DivergedError, match=r"/r: training loss is inf in search epoch 3 "
                                               r"of row \(no paper row\); the last good "
                                               r"checkpoint .*checkpoint\.h5 is kept"):
        run_toy(tmp_path / "r")
    assert checkpoint.load(tmp_path / "r" / "checkpoint.h5")[1]["epoch"] == 2


def test_given_schedule_skips_the_search(tmp_path):
    train = dataclasses.replace(TOY_TRAIN, schedule=(2, 1))
    summary = run_toy(tmp_path / "r", train=train)
    log = runlog.read_log(tmp_path / "r" / "log.jsonl")
    assert [(e["phase"], e["epoch"], e["lr"]) for e in log] == [
        ("final", 1, 0.1), ("final", 2, 0.1), ("final", 3, 0.01)]
    assert summary["schedule_found"] is None and summary["schedule_used"] == [2, 1]
    assert not (tmp_path / "r" / "best.h5").exists()


def search_epochs(reference):
    return sum(1 for e in runlog.read_log(reference[0] / "log.jsonl") if e["phase"] == "search")


@pytest.mark.parametrize("where", ["first", "mid_search", "end_of_search", "mid_final"])
def test_resume_after_a_kill_matches_the_uninterrupted_run(tmp_path, reference, where):
    n_search = search_epochs(reference)
    k = {"first": 0, "mid_search": n_search // 2 + 1, "end_of_search": n_search,
         "mid_final": n_search + 2}[where]
    run_dir = tmp_path / "r"
    with pytest.raises(SimulatedCrash):
        run_toy(run_dir, crash_after=k)
    assert len(runlog.read_log(run_dir / "log.jsonl")) == k
    run_toy(run_dir, resume=True)
    assert_same_run(run_dir, reference[0])


def test_kill_between_log_line_and_checkpoint_is_replayed_once(tmp_path, reference,
                                                               monkeypatch):
    run_dir = tmp_path / "r"
    real_save = checkpoint.save
    calls = {"n": 0}

    def dies_on_fourth_checkpoint(path, arrays, meta, **kw):
        if Path(path).name == "checkpoint.h5":
            calls["n"] += 1
            if calls["n"] == 4:
                raise SimulatedCrash("killed before the checkpoint of epoch 4")
        return real_save(path, arrays, meta, **kw)

    monkeypatch.setattr(checkpoint, "save", dies_on_fourth_checkpoint)
    with pytest.raises(SimulatedCrash):
        run_toy(run_dir)
    monkeypatch.undo()
    assert len(runlog.read_log(run_dir / "log.jsonl")) == 4  # one line past the checkpoint
    assert checkpoint.load(run_dir / "checkpoint.h5")[1]["epoch"] == 3
    run_toy(run_dir, resume=True)
    assert_same_run(run_dir, reference[0])


def test_sigkill_mid_run_then_resume_matches(tmp_path, reference):
    run_dir = tmp_path / "r"
    cmd = [sys.executable, str(REPO / "tests" / "toy_backend.py"), str(run_dir),
           "--sleep", "0.05"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    try:
        while len(runlog.read_log(run_dir / "log.jsonl")) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the toy run did not get going"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()
    # the dead run's lock file stays, naming it; the kernel released its lock
    assert (run_dir / runlog.LOCK).read_text().strip() == str(proc.pid)
    run_toy(run_dir, resume=True)
    assert not (run_dir / runlog.LOCK).exists()
    assert_same_run(run_dir, reference[0])


def test_incompatible_checkpoint_is_refused(tmp_path):
    run_dir = tmp_path / "r"
    with pytest.raises(SimulatedCrash):
        run_toy(run_dir, crash_after=2)
    before = (run_dir / "checkpoint.h5").read_bytes()
    other = dataclasses.replace(TOY_TRAIN, patience=3)
    with pytest.raises(CheckpointError, match=r"config\.json: train\.patience is 3 here, "
                                              r"2 in the run's config\.json"):
        run_toy(run_dir, resume=True, train=other)
    model = dataclasses.replace(TOY_MODEL, lstm_units=50)
    with pytest.raises(CheckpointError, match=r"model\.lstm_units is 50 here, 100 in the"):
        run_toy(run_dir, resume=True, model=model)
    assert (run_dir / "checkpoint.h5").read_bytes() == before


def test_unfinished_run_without_resume_is_refused(tmp_path):
    run_dir = tmp_path / "r"
    with pytest.raises(SimulatedCrash):
        run_toy(run_dir, crash_after=2)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(RunError, match="pass --resume to continue"):
        run_toy(run_dir)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_finished_run_is_skipped(tmp_path, capsys):
    run_dir = tmp_path / "r"
    train = dataclasses.replace(TOY_TRAIN, schedule=(1, 1))
    first = run_toy(run_dir, train=train)
    log_before = (run_dir / "log.jsonl").read_bytes()
    again = run_toy(run_dir, train=train, progress=True)
    assert again == json.loads(json.dumps(first))
    assert (run_dir / "log.jsonl").read_bytes() == log_before
    assert "already finished" in capsys.readouterr().out


def test_finished_run_of_another_configuration_is_refused(tmp_path):
    # e.g. a --epochs-cap quick look, then the full run into the same --out-dir: the quick
    # look must not be reported as the full run
    run_dir = tmp_path / "r"
    quick = dataclasses.replace(TOY_TRAIN, schedule=(1, 1))
    run_toy(run_dir, train=quick)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    full = dataclasses.replace(quick, schedule=(2, 1))
    with pytest.raises(RunError, match=r"config\.json: train\.schedule is \[2, 1\] here, "
                                          r"\[1, 1\] in config\.json: .* holds a finished run "
                                          r"of another configuration"):
        run_toy(run_dir, train=full)
    other_model = dataclasses.replace(TOY_MODEL, forget_bias=-1.0)
    with pytest.raises(RunError, match=r"model\.forget_bias is -1 here, -3 in config\.json"):
        run_toy(run_dir, train=quick, model=other_model)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "r"
    train = dataclasses.replace(TOY_TRAIN, lr_stages=(0.1, 1e300), schedule=(2, 2))
    with pytest.raises(DivergedError, match=r"/r: training loss is nan in final epoch 3 .*"
                                            r"checkpoint\.h5 is kept"):
        run_toy(run_dir, train=train)
    arrays, meta = checkpoint.load(run_dir / "checkpoint.h5")
    assert (meta["phase"], meta["epoch"]) == ("final", 2)
    assert all(np.isfinite(a).all() for a in arrays.values())
    assert len(runlog.read_log(run_dir / "log.jsonl")) == 2
    assert not (run_dir / "summary.json").exists()


def test_progress_lines(tmp_path, capsys):
    train = dataclasses.replace(TOY_TRAIN, epochs_cap=2)
    run_toy(tmp_path / "r", train=train, progress=True)
    out = capsys.readouterr().out
    assert "backend toy on cpu (numpy" in out and "trainable parameters" in out
    assert "[search] epoch 1 stage 0 lr 0.1 | train loss" in out
    assert "val loss" in out and "img/s" in out
    final_lines = [ln for ln in out.splitlines() if ln.startswith("[final]")]
    assert final_lines and "ETA" in final_lines[0] and "test loss" in final_lines[0]
    assert "done, test accuracy" in out
    # progress=False drops only the batch counter: the epoch lines stay (verbose=False: none)
    run_toy(tmp_path / "q", train=train, progress=False)
    assert "[search] epoch 1 stage 0" in capsys.readouterr().out


def test_sampler_seeds_are_per_phase_and_deterministic():
    s = trainer.sampler_seed(0, "search")
    assert s == trainer.sampler_seed(0, "search")
    assert len({s, trainer.sampler_seed(0, "final"), trainer.sampler_seed(1, "search")}) == 3


def test_unwritable_out_dir_is_one_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(RunError, match="cannot create the run directory"):
        run_toy(blocker / "runs" / "seed0")
    assert blocker.read_text() == "not a folder"


def test_a_run_that_never_trained_can_be_started_again(tmp_path):
    """A failure before the first epoch (say, a failed download) leaves config.json only."""
    run_dir = tmp_path / "seed0"
    run_dir.mkdir()
    runlog.write_json(run_dir / "config.json", {"row": "earlier attempt"})
    summary = run_toy(run_dir)
    assert summary["status"] == "done"
    assert runlog.read_json(run_dir / "config.json")["row"] != "earlier attempt"


def test_a_held_run_directory_is_refused_in_one_line(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    with runlog.hold(run_dir):
        with pytest.raises(CRMNError, match=rf"^{run_dir}: in use by another run \(process "
                                            rf"{os.getpid()}, lock \.lock\);"):
            run_toy(run_dir)
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing touched
    assert not (run_dir / runlog.LOCK).exists()
    assert run_toy(run_dir)["status"] == "done"  # free again


def test_nan_in_the_first_epoch_says_there_is_no_checkpoint(tmp_path):
    train = dataclasses.replace(TOY_TRAIN, lr_stages=(1e300, 0.1), schedule=(2, 2))
    with pytest.raises(DivergedError, match=r"training loss is nan in final epoch 1 .*; no "
                                            r"epoch had finished, so there is no checkpoint"):
        run_toy(tmp_path / "r", train=train)
    assert not (tmp_path / "r" / "checkpoint.h5").exists()


class _SlowFirstStep:
    """A backend whose first step takes as long as a compile (the bar must say so)."""

    def __init__(self, first_s):
        self.first_s, self.steps = first_s, 0

    def step(self, x, y, lr):
        self.steps += 1
        if self.steps == 1:
            time.sleep(self.first_s)
        return 0.5 * len(y), 1


class _Batches:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def epoch(self, epoch):
        for _ in range(self.n):
            yield np.zeros((2, 3, 32, 32), np.float32), np.zeros(2, np.int64)


def test_progress_says_compile_cache_hit_while_a_cached_step_loads(monkeypatch):
    import io

    stream = io.StringIO()
    monkeypatch.setattr(trainer.sys, "stderr", stream)
    backend = _SlowFirstStep(1.3)
    backend.cache_outcome = "hit"  # what TheanoBackend reports once its step came from the cache
    trainer.train_epoch(backend, _Batches(2), 1, 0.1, progress="[final] epoch 1")
    text = stream.getvalue()
    assert "[final] epoch 1 compile cache hit\u2026 1 s" in text
    assert "compiling" not in text


def test_progress_counts_compile_seconds_before_the_first_step(monkeypatch):
    import io

    stream = io.StringIO()
    monkeypatch.setattr(trainer.sys, "stderr", stream)
    trainer.train_epoch(_SlowFirstStep(2.3), _Batches(4), 1, 0.1, progress="[search] epoch 1")
    text = stream.getvalue()
    assert "[search] epoch 1 compiling\u2026 1 s" in text
    assert "[search] epoch 1 compiling\u2026 2 s" in text
    # the rate and the ETA leave the compile out: never "0 img/s" and a long ETA
    first = text.index("1/4")
    assert "- img/s ETA -" in text[first:first + 40]
    assert " 0 img/s" not in text
