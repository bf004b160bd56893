"""The plateau search and the fixed schedule of section 4 (crmn/schedule.py)."""
import json

import pytest

from crmn.schedule import Decision, FixedSchedule, PlateauSchedule

pytestmark = pytest.mark.current  # framework-free: runs in the current environment too


def feed(sched, metrics):
    """Step through (loss, acc) pairs; return the decisions and the per-step 'improved'."""
    decisions, improved, lrs = [], [], []
    for loss, acc in metrics:
        lrs.append(sched.lr)
        decisions.append(sched.step(loss, acc).value)
        improved.append(sched.improved)
    return decisions, improved, lrs


def test_plateau_walks_all_stages_and_records_found():
    s = PlateauSchedule((0.1, 0.01, 0.001), patience=2)
    metrics = [
        (2.0, 0.30), (1.5, 0.40), (1.6, 0.39), (1.7, 0.38),  # stage 0: best at its epoch 2
        (1.4, 0.45), (1.3, 0.50), (1.35, 0.49), (1.4, 0.48),  # stage 1: best at its epoch 2
        (1.5, 0.40), (1.6, 0.30),  # stage 2: never beats the records -> 0 epochs
    ]
    d, imp, lrs = feed(s, metrics)
    assert d == ["continue"] * 3 + ["reload"] + ["continue"] * 3 + ["reload"] + ["continue", "stop"]
    assert lrs == [0.1] * 4 + [0.01] * 4 + [0.001] * 2
    assert imp == [True, True, False, False, True, True, False, False, False, False]
    assert s.found == [2, 2, 0]
    assert s.done and s.epoch == 10
    assert s.best == {"epoch": 6, "stage": 1, "stage_epoch": 2, "loss": 1.3, "acc": 0.5}
    with pytest.raises(RuntimeError):
        s.step(1.0, 0.9)


def test_ties_do_not_count_as_improvement():
    s = PlateauSchedule((0.1, 0.01), patience=2)
    d, imp, _ = feed(s, [(1.0, 0.5), (1.0, 0.5), (1.0, 0.5)])
    assert d == ["continue", "continue", "reload"]
    assert imp == [True, False, False]
    assert s.found == [1, 0]


def test_improvement_by_accuracy_alone_keeps_the_stage_going():
    s = PlateauSchedule((0.1, 0.01), patience=2)
    # the loss only gets worse, the accuracy keeps creeping up: no plateau
    metrics = [(1.0, 0.50), (1.1, 0.51), (1.2, 0.52), (1.3, 0.53), (1.4, 0.54)]
    d, imp, _ = feed(s, metrics)
    assert d == ["continue"] * 5
    assert imp == [True] * 5
    assert s.found == [5, 0]


def test_improvement_by_loss_alone_keeps_the_stage_going_but_is_not_a_new_best():
    s = PlateauSchedule((0.1, 0.01), patience=2)
    # accuracy stuck below its first value, the loss keeps falling: no plateau, but the best
    # model (accuracy first) stays epoch 1
    metrics = [(1.0, 0.50), (0.9, 0.49), (0.8, 0.49), (0.7, 0.48), (0.6, 0.48)]
    d, imp, _ = feed(s, metrics)
    assert d == ["continue"] * 5
    assert imp == [True, False, False, False, False]
    assert s.best["epoch"] == 1 and s.found == [1, 0]
    # equal accuracy with lower loss is a new best
    s.step(0.5, 0.50)
    assert s.improved and s.best["epoch"] == 6 and s.found == [6, 0]


def test_records_carry_over_a_stage_change():
    s = PlateauSchedule((0.1, 0.01), patience=1)
    feed(s, [(1.0, 0.5), (1.1, 0.4)])  # plateau after one stale epoch -> reload
    assert s.stage == 1 and s.stage_epoch == 0 and s.lr == 0.01
    # matching the reloaded model's metrics at the new rate is not an improvement
    assert s.step(1.0, 0.5) == Decision.STOP
    assert s.found == [1, 0]


def test_epochs_cap_ends_each_stage_as_a_plateau():
    s = PlateauSchedule((0.1, 0.01, 0.001), patience=10, epochs_cap=3)
    metrics = [(1.0 - 0.01 * i, 0.1 + 0.01 * i) for i in range(9)]  # always improving
    d, imp, lrs = feed(s, metrics)
    assert d == ["continue", "continue", "reload"] * 2 + ["continue", "continue", "stop"]
    assert lrs == [0.1] * 3 + [0.01] * 3 + [0.001] * 3
    assert s.found == [3, 3, 3]


def test_found_counts_up_to_the_last_best_epoch_of_each_stage():
    s = PlateauSchedule((0.1, 0.01), patience=3)
    metrics = [(1.0, 0.5), (0.9, 0.6), (0.95, 0.55), (0.8, 0.65), (0.9, 0.6), (0.9, 0.6),
               (0.9, 0.6), (0.7, 0.7), (0.8, 0.6), (0.8, 0.6), (0.8, 0.6)]
    d, _, _ = feed(s, metrics)
    assert d.index("reload") == 6 and d[-1] == "stop"
    assert s.found == [4, 1]


def test_plateau_state_round_trip_continues_identically():
    metrics = [(2.0, 0.3), (1.5, 0.4), (1.6, 0.4), (1.7, 0.3), (1.2, 0.6), (1.3, 0.5),
               (1.3, 0.5), (1.1, 0.6), (1.3, 0.5), (1.3, 0.5)]
    whole = PlateauSchedule((0.1, 0.01, 0.001), patience=2, epochs_cap=5)
    d_whole, _, _ = feed(whole, metrics)
    for cut in range(len(metrics) + 1):
        first = PlateauSchedule((0.1, 0.01, 0.001), patience=2, epochs_cap=5)
        d1, _, _ = feed(first, metrics[:cut])
        state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
        resumed = PlateauSchedule.from_state(state)
        assert isinstance(resumed, PlateauSchedule)
        d2, _, _ = feed(resumed, metrics[cut:len(d_whole)] if not first.done else [])
        assert d1 + d2 == d_whole
        assert resumed.state_dict() == whole.state_dict()


def test_fixed_schedule_walks_its_stages_and_skips_empty_ones():
    s = FixedSchedule((0.1, 0.01, 0.001), (2, 0, 1))
    assert s.total_epochs == 3 and s.found == [2, 0, 1]
    d, imp, lrs = feed(s, [(1.0, 0.5), (1.1, 0.4), (0.9, 0.6)])
    assert lrs == [0.1, 0.1, 0.001]
    assert d == ["continue", "continue", "stop"]
    assert imp == [True, False, True]
    assert s.done and s.best["stage"] == 2
    with pytest.raises(RuntimeError):
        s.step(1.0, 0.5)


def test_fixed_schedule_state_round_trip():
    s = FixedSchedule((0.1, 0.01), (2, 2))
    s.step(1.0, 0.5)
    r = FixedSchedule.from_state(json.loads(json.dumps(s.state_dict())))
    assert isinstance(r, FixedSchedule)
    assert (r.epoch, r.stage, r.lr, r.best) == (1, 0, 0.1, s.best)
    r.step(0.9, 0.6)
    assert r.stage == 1 and r.lr == 0.01 and r.stage_epoch == 0


@pytest.mark.parametrize("args, match", [
    (((), 3), "at least one"),
    (((0.1, -0.01), 3), "positive"),
    (((0.1,), 0), "patience"),
])
def test_plateau_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        PlateauSchedule(*args)


def test_bad_metrics_and_states_are_refused():
    with pytest.raises(ValueError, match="finite"):
        PlateauSchedule((0.1,), 2).step(float("nan"), 0.5)
    with pytest.raises(ValueError, match="differ in length"):
        FixedSchedule((0.1, 0.01), (3,))
    with pytest.raises(ValueError, match="plateau"):
        PlateauSchedule.from_state(FixedSchedule((0.1,), (1,)).state_dict())
