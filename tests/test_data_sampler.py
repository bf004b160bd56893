"""crmn/data/sampler.py: the seeded batch sampler, and its timing in crmn/tools/."""
import subprocess
import sys

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from crmn import data
from crmn.errors import ConfigError
from crmn.tools.sampler_bench import time_sampler

pytestmark = pytest.mark.current  # framework-free: runs in the current environment too


def _reference_batch(x, plan, i, b, pad):
    """Per-image padding, cropping and mirroring: the definition the sampler vectorises."""
    out = []
    for j in range(i * b, (i + 1) * b):
        img = np.pad(x[plan.order[j]], ((0, 0), (pad, pad), (pad, pad)))
        img = img[:, plan.dy[j]:plan.dy[j] + 32, plan.dx[j]:plan.dx[j] + 32]
        out.append(img[:, :, ::-1] if plan.flip[j] else img)
    return np.stack(out)


@pytest.fixture(scope="module")
def data_xy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((105, 3, 32, 32), dtype=np.float32)
    return x, np.arange(105, dtype=np.int64)


@pytest.mark.parametrize("flip, pad", [(False, 4), (True, 4), (True, 2)])
def test_sampler_batches_equal_the_per_image_reference(data_xy, flip, pad):
    x, y = data_xy
    s = data.BatchSampler(x, y, 10, seed=7, pad=pad, flip=flip)
    plan = s.plan(3)
    for i, (xb, yb) in enumerate(s.epoch(3)):
        assert xb.dtype == np.float32 and xb.shape == (10, 3, 32, 32)
        assert_array_equal(xb, _reference_batch(x, plan, i, 10, pad))
        assert_array_equal(yb, y[plan.order[i * 10:(i + 1) * 10]])
    assert i == len(s) - 1


def test_sampler_drops_the_last_partial_batch_and_covers_each_image_once(data_xy):
    x, y = data_xy
    s = data.BatchSampler(x, y, 10, seed=0)
    assert len(s) == 10
    labels = np.concatenate([yb for _, yb in s.epoch(0)])
    assert len(labels) == 100 and len(np.unique(labels)) == 100


def test_sampler_is_deterministic_in_seed_and_epoch(data_xy):
    x, y = data_xy
    a = data.BatchSampler(x, y, 25, seed=1, flip=True)
    b = data.BatchSampler(x, y, 25, seed=1, flip=True)  # e.g. after a resume
    for f in data.EpochPlan._fields[1:]:
        assert_array_equal(getattr(a.plan(4), f), getattr(b.plan(4), f))
    assert_array_equal(next(iter(a.epoch(4)))[0], next(iter(b.epoch(4)))[0])
    assert not np.array_equal(a.plan(4).order, a.plan(5).order)
    assert not np.array_equal(a.plan(4).order, data.BatchSampler(x, y, 25, 2).plan(4).order)
    # plan is fully seeded by (seed, epoch): the global RNG plays no part
    np.random.seed(123)
    assert_array_equal(a.plan(4).dx, b.plan(4).dx)


def test_sampler_plan_ranges_and_flip_switch(data_xy):
    x, y = data_xy
    on = data.BatchSampler(x, y, 5, seed=2, pad=4, flip=True).plan(0)
    off = data.BatchSampler(x, y, 5, seed=2, pad=4, flip=False).plan(0)
    assert sorted(on.order.tolist()) == list(range(105)) and on.order.dtype == np.int64
    assert set(on.dy.tolist()) == set(range(9)) and set(on.dx.tolist()) == set(range(9))
    assert not off.flip.any() and 30 < on.flip.sum() < 75
    # flips on or off: the same order and crops
    assert_array_equal(on.order, off.order)
    assert_array_equal(on.dy, off.dy)


def test_sampler_pads_with_zeros_after_normalisation():
    x = np.ones((4, 3, 32, 32), dtype=np.float32)
    s = data.BatchSampler(x, np.zeros(4, dtype=np.int64), 4, seed=0, pad=4)
    plan = s.plan(0)
    xb, _ = s.batch(plan, 0)
    for j in range(4):
        dy, dx = plan.dy[j], plan.dx[j]
        rows = (np.arange(32) + dy - 4 >= 0) & (np.arange(32) + dy - 4 < 32)
        cols = (np.arange(32) + dx - 4 >= 0) & (np.arange(32) + dx - 4 < 32)
        assert_array_equal(xb[j, 0], np.outer(rows, cols).astype(np.float32))


def test_sampler_rejects_bad_arguments(data_xy):
    x, y = data_xy
    with pytest.raises(ConfigError, match="batch size 200"):
        data.BatchSampler(x, y, 200, seed=0)
    with pytest.raises(ValueError, match="float32"):
        data.BatchSampler(x.astype(np.float64), y, 10, seed=0)
    with pytest.raises(IndexError):
        s = data.BatchSampler(x, y, 10, seed=0)
        s.batch(s.plan(0), 10)


def test_iterate_eval_keeps_order_and_the_last_partial_batch(data_xy):
    x, y = data_xy
    batches = list(data.iterate_eval(x, y, 50))
    assert [len(b[1]) for b in batches] == [50, 50, 5]
    assert_array_equal(np.concatenate([b[0] for b in batches]), x)
    assert_array_equal(np.concatenate([b[1] for b in batches]), y)



# ------------------------------------------------------------------------------------------
# the timing tool and the import rule

def test_time_sampler_returns_its_figures_and_prints_nothing(capsys):
    r = time_sampler(n=300, batch_size=100, epochs=2, seed=1)
    assert capsys.readouterr() == ("", "")
    assert (r["n"], r["batch_size"], r["epochs"], r["pad"]) == (300, 100, 2, 4)
    assert r["numpy"] == np.__version__
    for key in ("flip_off", "flip_on"):
        f = r[key]
        assert f["images"] == 600 and f["seconds"] > 0
        assert f["images_per_s"] == pytest.approx(600 / f["seconds"])
        assert f["ms_per_batch"] == pytest.approx(1e3 * f["seconds"] / 6)
    with pytest.raises(ValueError, match="batch_size"):
        time_sampler(n=50, batch_size=100)


def test_the_data_package_and_tools_import_no_framework():
    # a fresh interpreter: the test session itself may have imported torch already
    code = ("import sys, crmn.data, crmn.tools.sampler_bench; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'theano', "
            "'lasagne'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
    assert not hasattr(data, "main") and not hasattr(data, "bench")
