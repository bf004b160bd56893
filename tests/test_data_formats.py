"""crmn/data/formats.py and fake.py: the official on-disk formats, and fake data in them."""
import pickle

import numpy as np
import pytest
import scipy.io
from numpy.testing import assert_array_equal

from crmn import data
from crmn.data import fake
from crmn.errors import DataError
from data_helpers import cifar_pickle, pattern

pytestmark = pytest.mark.current  # framework-free: runs in the current environment too


def test_load_raw_cifar10_reads_the_official_pickle_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    xs = [pattern(7, seed=i) for i in range(6)]
    ys = [np.arange(7) % 10 for _ in range(6)]
    for i in range(5):
        cifar_pickle(folder / f"data_batch_{i + 1}", xs[i], ys[i])
    cifar_pickle(folder / "test_batch", xs[5], ys[5])
    raw = data.load_raw("cifar10", tmp_path)
    assert raw["x_train"].shape == (35, 3, 32, 32) and raw["x_train"].dtype == np.uint8
    assert raw["y_train"].dtype == np.int64
    assert_array_equal(raw["x_train"], np.concatenate(xs[:5]))  # batches 1..5 in order
    assert_array_equal(raw["x_test"], xs[5])
    # the row layout: value k of a row is channel k // 1024, row (k % 1024) // 32, col k % 32
    flat = xs[0].reshape(7, 3072)
    assert raw["x_train"][2, 1, 5, 7] == flat[2, 1024 + 5 * 32 + 7]
    assert raw["x_train"][2, 2, 31, 0] == flat[2, 2048 + 31 * 32]


def test_load_raw_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x = pattern(5)
    for fname in ("train", "test"):
        with open(folder / fname, "wb") as f:
            pickle.dump({b"data": x.reshape(5, 3072), b"fine_labels": [99, 0, 42, 7, 3],
                         b"coarse_labels": [19, 0, 8, 1, 0]}, f, protocol=2)
    raw = data.load_raw("cifar100", tmp_path)
    assert_array_equal(raw["y_train"], [99, 0, 42, 7, 3])
    assert_array_equal(raw["x_test"], x)


def test_load_raw_svhn_maps_label_10_to_digit_0_and_transposes(tmp_path):
    folder = tmp_path / "svhn"
    folder.mkdir()
    rng = np.random.default_rng(1)
    mats = {}
    for part, n in (("train", 6), ("extra", 4), ("test", 3)):
        X = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)  # official layout
        y = np.array([10, 1, 2, 9, 10, 5][:n], dtype=np.uint8).reshape(-1, 1)
        scipy.io.savemat(str(folder / f"{part}_32x32.mat"), {"X": X, "y": y})
        mats[part] = (X, y)
    raw = data.load_raw("svhn", tmp_path)
    assert_array_equal(raw["y_train"], [0, 1, 2, 9, 0, 5])
    assert_array_equal(raw["y_extra"], [0, 1, 2, 9])
    X = mats["extra"][0]
    assert raw["x_extra"].shape == (4, 3, 32, 32) and raw["x_extra"].flags.c_contiguous
    # X[row, col, channel, image] is image's pixel (row, col) in that channel
    assert raw["x_extra"][3, 2, 10, 20] == X[10, 20, 2, 3]
    assert_array_equal(raw["x_test"], mats["test"][0].transpose(3, 2, 0, 1))


def test_load_raw_names_missing_and_corrupt_files(tmp_path):
    folder = data.write_fake("cifar10", tmp_path, 20, 10)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing dataset file .*data_batch_3"):
        data.load_raw("cifar10", tmp_path)
    (folder / "data_batch_3").write_bytes(b"\x80\x02not a pickle")
    with pytest.raises(DataError, match="corrupt CIFAR batch .*data_batch_3"):
        data.load_raw("cifar10", tmp_path)
    svhn = data.write_fake("svhn", tmp_path, 10, 4)
    (svhn / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 20)
    with pytest.raises(DataError, match="test_32x32.mat"):
        data.load_raw("svhn", tmp_path)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_write_fake_is_readable_and_marked(tmp_path, name):
    folder = data.write_fake(name, tmp_path, 30, 12, seed=3)
    assert data.is_fake(name, tmp_path)
    raw = data.load_raw(name, tmp_path)
    n_train = len(raw["y_train"]) + len(raw.get("y_extra", []))
    assert (n_train, len(raw["y_test"])) == (30, 12)
    assert raw["y_test"].max() < data.DATASETS[name].classes
    assert folder == tmp_path / data.DATASETS[name].folder


def test_fake_data_is_learnable_by_a_nearest_class_mean():
    """Same templates in train and test: a trivial classifier must beat chance widely."""
    (x, y), (xt, yt) = fake._fake_images(10, [500, 200], seed=0)
    means = np.stack([x[y == c].mean(axis=0) for c in range(10)]).reshape(10, -1)
    d = ((xt.reshape(200, 1, -1).astype(np.float64) - means[None]) ** 2).sum(-1)
    assert (d.argmin(1) == yt).mean() > 0.9

