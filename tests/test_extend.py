"""Extending a run: ``--resume`` with a larger ``--epochs-cap`` (or none) continues a
capped run and ends where one uninterrupted run with that cap ends; and the last good
checkpoint (checkpoint.prev.h5) carries a run past a checkpoint corrupted on disk. The numpy
toy backend (tests/toy_backend.py) runs the real loop, schedule and checkpoint code."""
import dataclasses
import json

import numpy as np
import pytest

from crmn import checkpoint, runlog
from crmn.errors import CheckpointError, RunError
from test_train import assert_same_run, stable_log
from toy_backend import TOY_TRAIN, SimulatedCrash, run_toy

# the search: patience 2, so a cap of 1 cuts the first stage short at once
SEARCH_CAPPED = dataclasses.replace(TOY_TRAIN, epochs_cap=1)
# a given schedule: a cap of 1 truncates both stages
GIVEN = dataclasses.replace(TOY_TRAIN, schedule=(3, 2), epochs_cap=None)


def events(run_dir):
    return [e for e in runlog.read_log(run_dir / runlog.LOG, events=True) if "event" in e]


@pytest.fixture(scope="module")
def uncapped_given(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("given") / "seed3"
    run_toy(run_dir, train=GIVEN)
    return run_dir


def test_a_finished_capped_search_extended_equals_the_uninterrupted_run(tmp_path, capsys):
    ref = tmp_path / "ref"
    run_toy(ref)  # TOY_TRAIN: cap 4
    run_dir = tmp_path / "r"
    first = run_toy(run_dir, train=SEARCH_CAPPED)
    assert first["status"] == "done" and (run_dir / runlog.CAPPED).exists()
    assert (run_dir / runlog.CAPPED_BEST).exists()
    capsys.readouterr()
    run_toy(run_dir, resume=True)  # the cap 4 of TOY_TRAIN
    out = capsys.readouterr().out
    assert "--epochs-cap raised from 1 to 4: continuing the search run after epoch 1 " \
           "(where the cap first cut a stage short)" in out
    assert_same_run(run_dir, ref)
    [event] = events(run_dir)
    assert {k: event[k] for k in ("event", "phase", "epoch", "from", "to")} == \
        {"event": "cap_lifted", "phase": "search", "epoch": 1, "from": 1, "to": 4}
    config = runlog.read_json(run_dir / runlog.CONFIG)
    assert config["train"]["epochs_cap"] == 4
    assert config["caps_lifted"] == [{"phase": "search", "epoch": 1, "from": 1, "to": 4}]
    assert not (run_dir / runlog.CAPPED).exists()  # consumed
    # finished now under cap 4: the same command skips it
    run_toy(run_dir, resume=True)
    assert "already finished" in capsys.readouterr().out


@pytest.mark.parametrize("caps", [(1, None), (1, 2), (2, None)])
def test_a_capped_given_schedule_extended_equals_the_uninterrupted_run(tmp_path, caps,
                                                                       uncapped_given):
    small, large = caps
    run_dir = tmp_path / "r"
    run_toy(run_dir, train=dataclasses.replace(GIVEN, epochs_cap=small))
    run_toy(run_dir, resume=True, train=dataclasses.replace(GIVEN, epochs_cap=large))
    if large is None:
        assert_same_run(run_dir, uncapped_given)
    else:
        ref = tmp_path / "ref"
        run_toy(ref, train=dataclasses.replace(GIVEN, epochs_cap=large))
        assert_same_run(run_dir, ref)
    assert [e["from"] for e in events(run_dir)] == [small]


def test_an_unfinished_capped_run_extended_on_resume(tmp_path):
    ref = tmp_path / "ref"
    run_toy(ref)
    run_dir = tmp_path / "r"
    with pytest.raises(SimulatedCrash):
        run_toy(run_dir, train=SEARCH_CAPPED, crash_after=3)
    run_toy(run_dir, resume=True)
    assert_same_run(run_dir, ref)


def test_a_cap_that_never_cut_changes_nothing(tmp_path, capsys):
    # a cap of 5 on the search never binds (its stages plateau first): lifting it keeps
    # every epoch, and says so
    train5 = dataclasses.replace(TOY_TRAIN, epochs_cap=5)
    run_dir = tmp_path / "r"
    run_toy(run_dir, train=train5)
    assert not (run_dir / runlog.CAPPED).exists()
    log = stable_log(run_dir)
    capsys.readouterr()
    run_toy(run_dir, resume=True, train=dataclasses.replace(TOY_TRAIN, epochs_cap=None))
    assert "(the cap had cut no stage short)" in capsys.readouterr().out
    assert stable_log(run_dir) == log


def test_other_changes_and_a_smaller_cap_are_still_refused(tmp_path):
    run_dir = tmp_path / "r"
    run_toy(run_dir, train=SEARCH_CAPPED)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(RunError, match=r"add --resume to continue it with --epochs-cap 4, or"):
        run_toy(run_dir)  # a larger cap without --resume
    with pytest.raises(CheckpointError, match=r"train\.patience is 3 here, 2 in the run's "
                                              r"config\.json"):
        run_toy(run_dir, resume=True, train=dataclasses.replace(TOY_TRAIN, patience=3))
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    run_toy(run_dir, resume=True, train=dataclasses.replace(SEARCH_CAPPED, epochs_cap=2))
    with pytest.raises(RunError, match=r"train\.epochs_cap is 1 here, 2 in config\.json; a "
                                       r"run continues with a larger cap only"):
        run_toy(run_dir, resume=True, train=SEARCH_CAPPED)


def crashed_after_epoch_4(tmp_path):
    """A whole reference run, and a run killed after its fourth epoch: (ref, run, checkpoint)."""
    ref = tmp_path / "ref"
    run_toy(ref)
    run_dir = tmp_path / "r"
    with pytest.raises(SimulatedCrash):
        run_toy(run_dir, crash_after=4)
    return ref, run_dir, run_dir / runlog.CHECKPOINT


def test_a_corrupt_checkpoint_falls_back_to_the_previous_epoch(tmp_path, capsys):
    ref, run_dir, ckpt = crashed_after_epoch_4(tmp_path)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[:len(data) // 2])  # the disk, not the archive, cut it
    capsys.readouterr()
    run_toy(run_dir, resume=True)
    err = capsys.readouterr().err
    line = [t for t in err.splitlines() if "checkpoint.prev.h5" in t]
    assert line == [f"warning: {ckpt}: truncated or corrupt checkpoint (it does not open as "
                    "a complete HDF5 file); continuing from checkpoint.prev.h5, the state "
                    "after search epoch 3"]
    assert_same_run(run_dir, ref)


def test_an_edited_checkpoint_fails_its_digest_and_falls_back_too(tmp_path, capsys):
    """h5py recomputes Fletcher-32 when it writes an array, so an edit in place passes the
    checksums; the digest of the arrays and meta refuses it."""
    import h5py

    ref, run_dir, ckpt = crashed_after_epoch_4(tmp_path)
    with h5py.File(ckpt, "r+") as f:
        name = next(n for n in f if f[n].ndim > 0 and f[n].dtype.kind == "f")
        f[name][...] = f[name][()] + 1
    capsys.readouterr()
    run_toy(run_dir, resume=True)
    line = [t for t in capsys.readouterr().err.splitlines() if "checkpoint.prev.h5" in t]
    assert line == [f"warning: {ckpt}: corrupt checkpoint (its arrays or meta do not match "
                    "the digest written with them); continuing from checkpoint.prev.h5, the "
                    "state after search epoch 3"]
    assert_same_run(run_dir, ref)


def test_both_checkpoints_corrupt_is_one_line_with_the_way_on(tmp_path):
    run_dir = tmp_path / "r"
    with pytest.raises(SimulatedCrash):
        run_toy(run_dir, crash_after=3)
    for name in (runlog.CHECKPOINT, "checkpoint.prev.h5"):
        path = run_dir / name
        path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as e:
        run_toy(run_dir, resume=True)
    assert "\n" not in str(e.value)
    assert str(e.value) == (
        f"{run_dir / runlog.CHECKPOINT}: truncated or corrupt checkpoint (it does not open as a "
        "complete HDF5 file); checkpoint.prev.h5 does not read back either, so the run cannot "
        f"continue: delete {run_dir} and run the command again without --resume")


def test_a_corrupt_current_checkpoint_is_never_rotated_over_the_last_good_one(tmp_path):
    path = tmp_path / "checkpoint.h5"
    arrays = {"w": np.arange(6.0)}
    checkpoint.save(path, arrays, {"epoch": 1}, keep_previous=True)
    checkpoint.save(path, arrays, {"epoch": 2}, keep_previous=True)
    path.write_bytes(path.read_bytes()[:200])
    checkpoint.save(path, arrays, {"epoch": 3}, keep_previous=True)
    assert checkpoint.load(path)[1]["epoch"] == 3
    assert checkpoint.load(checkpoint.previous_path(path))[1]["epoch"] == 1
    assert json.loads(json.dumps(sorted(p.name for p in tmp_path.iterdir()))) == \
        ["checkpoint.h5", "checkpoint.prev.h5"]
