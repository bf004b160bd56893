"""crmn/data/prepare.py: preprocessing (section 4.2) and the seeded validation split."""
import importlib

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from crmn import data
from crmn.errors import ConfigError, DataError

pytestmark = pytest.mark.current  # framework-free: runs in the current environment too

prep = importlib.import_module("crmn.data.prepare")  # the module, not the function


def test_prepare_cifar_search_split_and_mean_of_the_training_split(tmp_path):
    data.write_fake("cifar100", tmp_path, 200, 40, seed=1)
    raw = data.load_raw("cifar100", tmp_path)
    s = data.prepare("cifar100", tmp_path, "search", seed=5, download=False)
    assert s.eval_name == "val"
    assert (len(s.train_x), len(s.eval_x)) == (180, 20)
    assert s.train_x.dtype == np.float32 and s.train_y.dtype == np.int64
    tr, va = data.split_indices(200, 20, 5)
    assert len(np.intersect1d(tr, va)) == 0 and len(np.union1d(tr, va)) == 200
    u = raw["x_train"].astype(np.float64) / 255
    mean = u[tr].mean(axis=(0, 2, 3), keepdims=True)  # the 90 % only, not the held-out 10 %
    assert not np.allclose(mean, u.mean(axis=(0, 2, 3), keepdims=True), atol=1e-5)
    assert_allclose(s.train_x, u[tr] - mean, atol=2e-6)
    assert_allclose(s.eval_x, u[va] - mean, atol=2e-6)
    assert_array_equal(s.train_y, raw["y_train"][tr])
    assert_array_equal(s.eval_y, raw["y_train"][va])
    assert_allclose(s.train_x.mean(axis=(0, 2, 3)), 0, atol=1e-6)
    # the split is a function of the seed
    assert_array_equal(data.prepare("cifar100", tmp_path, "search", 5, download=False).eval_y,
                       s.eval_y)
    other = data.split_indices(200, 20, 6)[1]
    assert not np.array_equal(other, va)


def test_prepare_cifar_final_uses_everything_and_the_test_set(tmp_path):
    data.write_fake("cifar10", tmp_path, 50, 30, seed=2)
    raw = data.load_raw("cifar10", tmp_path)
    s = data.prepare("cifar10", tmp_path, "final", seed=0, download=False)
    assert s.eval_name == "test"
    u = raw["x_train"].astype(np.float64) / 255
    mean = u.mean(axis=(0, 2, 3), keepdims=True)
    assert_allclose(s.train_x, u - mean, atol=2e-6)
    assert_allclose(s.eval_x, raw["x_test"] / 255.0 - mean, atol=2e-6)
    assert_array_equal(s.eval_y, raw["y_test"])


def test_split_does_not_share_the_samplers_random_stream():
    # default_rng(seed) == default_rng([seed, 0]): the split must be keyed differently
    order0 = np.random.default_rng([3, 0]).permutation(100)
    tr, va = data.split_indices(100, 10, 3)
    assert not np.array_equal(np.sort(order0[:10]), va)


def test_prepare_svhn_joins_train_and_extra_and_applies_gcn(tmp_path, monkeypatch):
    data.write_fake("svhn", tmp_path, 100, 20, seed=4)
    raw = data.load_raw("svhn", tmp_path)
    joined = np.concatenate([raw["x_train"], raw["x_extra"]]).astype(np.float64) / 255
    labels = np.concatenate([raw["y_train"], raw["y_extra"]])
    flat = joined.reshape(100, -1)
    ref = (flat - flat.mean(1, keepdims=True)) / flat.std(1, keepdims=True)
    s = data.prepare("svhn", tmp_path, "final", seed=0, download=False)
    assert_allclose(s.train_x.reshape(100, -1), ref, atol=1e-5)
    assert_array_equal(s.train_y, labels)
    assert_allclose(s.train_x.mean(axis=(1, 2, 3)), 0, atol=1e-5)
    assert_allclose(s.train_x.std(axis=(1, 2, 3)), 1, atol=1e-4)
    assert len(s.eval_x) == 20 and s.eval_name == "test"
    # search: the validation images come from train + extra; 5,000 on the real data
    monkeypatch.setattr(prep, "SVHN_VAL_IMAGES", 7)
    s = data.prepare("svhn", tmp_path, "search", seed=1, download=False)
    tr, va = data.split_indices(100, 7, 1)
    assert (len(s.train_x), len(s.eval_x), s.eval_name) == (93, 7, "val")
    assert_allclose(s.eval_x.reshape(7, -1), ref[va], atol=1e-5)
    assert_array_equal(s.train_y, labels[tr])


def test_prepare_is_the_same_in_small_chunks(tmp_path, monkeypatch):
    """Chunks that straddle the train/extra boundary give the same arrays as one chunk."""
    data.write_fake("svhn", tmp_path, 60, 10, seed=8)
    whole = data.prepare("svhn", tmp_path, "search", seed=2, download=False)
    monkeypatch.setattr(prep, "_CHUNK", 7)
    chunked = data.prepare("svhn", tmp_path, "search", seed=2, download=False)
    for a, b in zip(whole[:4], chunked[:4]):
        assert_array_equal(a, b)
    data.write_fake("cifar10", tmp_path, 60, 10, seed=8)
    c = data.prepare("cifar10", tmp_path, "final", seed=2, download=False)
    monkeypatch.setattr(prep, "_CHUNK", 4096)
    assert_allclose(data.prepare("cifar10", tmp_path, "final", 2, download=False).train_x,
                    c.train_x, atol=1e-7)


def test_gcn_floors_flat_images():
    x = np.full((2, 3, 32, 32), 0.5, dtype=np.float32)
    x[1, 0, 0, 0] = 0.51  # nearly flat: std ~ 1.8e-4, below the floor
    out = data.global_contrast_normalize(x)
    assert np.all(np.isfinite(out)) and np.abs(out).max() <= 1.0
    assert_array_equal(out[0], 0)


def test_prepare_rejects_bad_phase_fraction_and_missing_data(tmp_path):
    with pytest.raises(ConfigError, match="phase"):
        data.prepare("cifar10", tmp_path, "train", 0, download=False)
    with pytest.raises(ConfigError, match="val_fraction"):
        data.prepare("cifar10", tmp_path, "search", 0, val_fraction=1.0, download=False)
    with pytest.raises(DataError, match="missing dataset file"):
        data.prepare("cifar10", tmp_path, "final", 0, download=False)


def test_prepare_downloads_nothing_when_fake_data_is_in_place(tmp_path, monkeypatch):
    data.write_fake("cifar10", tmp_path, 40, 10)
    monkeypatch.setenv(data.MIRROR_ENV, "http://127.0.0.1:9/")  # nothing listens there
    s = data.prepare("cifar10", tmp_path, "search", 0, progress=False)
    assert (len(s.train_x), len(s.eval_x)) == (36, 4)

