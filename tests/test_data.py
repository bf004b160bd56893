"""crmn/data.py: official formats, download with checksums, preprocessing, the batch sampler.

The files are written here in the official on-disk formats (Python-2-style CIFAR pickles,
MATLAB v5 SVHN files) with known pixel values, so the readers are checked against the
published layouts rather than against :func:`write_fake`. Downloads go to a loopback HTTP
server in a thread.
"""
import dataclasses
import hashlib
import http.server
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from numpy.testing import assert_allclose, assert_array_equal

from crmn import data
from crmn.errors import ConfigError, DataError


# ------------------------------------------------------------------------------------------
# helpers

def _md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def _cifar_pickle(path, x, y, label_key=b"labels"):
    """One batch as the official files hold it: byte keys, rows of 1024 R, G, B values."""
    with open(path, "wb") as f:
        pickle.dump({b"data": x.reshape(len(x), 3072), label_key: [int(v) for v in y],
                     b"batch_label": b"test"}, f, protocol=2)


def _pattern(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def _use_archive(monkeypatch, name, archives):
    """Point DATASETS[name] at the MD5s of the fake archives (file name -> path)."""
    info = data.DATASETS[name]
    new = tuple((f, _md5(archives[f])) for f, _ in info.archives)
    monkeypatch.setitem(data.DATASETS, name, dataclasses.replace(info, archives=new))


def _set_md5(monkeypatch, name, md5):
    info = data.DATASETS[name]
    new = tuple((f, md5) for f, _ in info.archives)
    monkeypatch.setitem(data.DATASETS, name, dataclasses.replace(info, archives=new))


class _Server:
    """A loopback HTTP server: ``files[name] = bytes``; ``short[name]`` bytes cut off."""

    def __init__(self):
        self.files, self.short, self.requests = {}, {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append(name)
                body = server.files.get(name)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = server.short.get(name, 0)
                self.wfile.write(body[:len(body) - cut])
                if cut:
                    self.close_connection = True

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def serve(self, archives):
        for fname, path in archives.items():
            self.files[fname] = Path(path).read_bytes()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def data_server(monkeypatch):
    monkeypatch.setattr(data, "_RETRY_WAIT_S", 0.0)
    monkeypatch.delenv(data.MIRROR_ENV, raising=False)
    s = _Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def data_cifar10_archive(tmp_path_factory):
    return data.write_fake_archive("cifar10", tmp_path_factory.mktemp("arch10"), 60, 20)


# ------------------------------------------------------------------------------------------
# the registry

def test_datasets_name_official_sources_and_md5s():
    assert set(data.DATASETS) == {"cifar10", "cifar100", "svhn"}
    for name, info in data.DATASETS.items():
        assert info.name == name
        assert info.base_url.startswith(("https://www.cs.toronto.edu/~kriz/",
                                         "http://ufldl.stanford.edu/housenumbers/"))
        for fname, md5 in info.archives:
            assert len(md5) == 32 and int(md5, 16) >= 0
    assert data.DATASETS["cifar100"].archives[0] == (
        "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")
    assert (data.DATASETS["cifar10"].classes, data.DATASETS["cifar100"].classes,
            data.DATASETS["svhn"].classes) == (10, 100, 10)


def test_unknown_dataset_name_is_a_config_error(tmp_path):
    for call in (lambda: data.ensure_downloaded("mnist", tmp_path),
                 lambda: data.load_raw("mnist", tmp_path),
                 lambda: data.prepare("mnist", tmp_path, "final", 0)):
        with pytest.raises(ConfigError, match="unknown dataset 'mnist'"):
            call()


# ------------------------------------------------------------------------------------------
# reading the official formats

def test_load_raw_cifar10_reads_the_official_pickle_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    xs = [_pattern(7, seed=i) for i in range(6)]
    ys = [np.arange(7) % 10 for _ in range(6)]
    for i in range(5):
        _cifar_pickle(folder / f"data_batch_{i + 1}", xs[i], ys[i])
    _cifar_pickle(folder / "test_batch", xs[5], ys[5])
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
    x = _pattern(5)
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
    (x, y), (xt, yt) = data._fake_images(10, [500, 200], seed=0)
    means = np.stack([x[y == c].mean(axis=0) for c in range(10)]).reshape(10, -1)
    d = ((xt.reshape(200, 1, -1).astype(np.float64) - means[None]) ** 2).sum(-1)
    assert (d.argmin(1) == yt).mean() > 0.9


# ------------------------------------------------------------------------------------------
# preprocessing

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
    monkeypatch.setattr(data, "SVHN_VAL_IMAGES", 7)
    s = data.prepare("svhn", tmp_path, "search", seed=1, download=False)
    tr, va = data.split_indices(100, 7, 1)
    assert (len(s.train_x), len(s.eval_x), s.eval_name) == (93, 7, "val")
    assert_allclose(s.eval_x.reshape(7, -1), ref[va], atol=1e-5)
    assert_array_equal(s.train_y, labels[tr])


def test_prepare_is_the_same_in_small_chunks(tmp_path, monkeypatch):
    """Chunks that straddle the train/extra boundary give the same arrays as one chunk."""
    data.write_fake("svhn", tmp_path, 60, 10, seed=8)
    whole = data.prepare("svhn", tmp_path, "search", seed=2, download=False)
    monkeypatch.setattr(data, "_CHUNK", 7)
    chunked = data.prepare("svhn", tmp_path, "search", seed=2, download=False)
    for a, b in zip(whole[:4], chunked[:4]):
        assert_array_equal(a, b)
    data.write_fake("cifar10", tmp_path, 60, 10, seed=8)
    c = data.prepare("cifar10", tmp_path, "final", seed=2, download=False)
    monkeypatch.setattr(data, "_CHUNK", 4096)
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


# ------------------------------------------------------------------------------------------
# download, checksum, extraction

def test_download_verifies_extracts_and_never_fetches_twice(tmp_path, data_server, monkeypatch,
                                                           data_cifar10_archive):
    _use_archive(monkeypatch, "cifar10", data_cifar10_archive)
    data_server.serve(data_cifar10_archive)
    monkeypatch.setenv(data.MIRROR_ENV, data_server.url)
    folder = data.ensure_downloaded("cifar10", tmp_path / "d", progress=False)
    assert folder == tmp_path / "d" / "cifar-10-batches-py"
    assert data_server.requests == ["cifar-10-python.tar.gz"]
    archive = tmp_path / "d" / "cifar-10-python.tar.gz"
    assert _md5(archive) == _md5(data_cifar10_archive["cifar-10-python.tar.gz"])
    assert not list((tmp_path / "d").glob("*.part")) and not list((tmp_path / "d").glob(".ex*"))
    assert len(data.load_raw("cifar10", tmp_path / "d")["y_train"]) == 60
    # complete folder: nothing fetched; folder gone: re-extracted from the verified archive
    data.ensure_downloaded("cifar10", tmp_path / "d", progress=False)
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    data.ensure_downloaded("cifar10", tmp_path / "d", progress=False)
    assert data_server.requests == ["cifar-10-python.tar.gz"]
    assert len(data.load_raw("cifar10", tmp_path / "d")["y_test"]) == 20


def test_checksum_failure_removes_the_part_file_and_a_retry_succeeds(
        tmp_path, data_server, monkeypatch, data_cifar10_archive):
    data_server.serve(data_cifar10_archive)
    _set_md5(monkeypatch, "cifar10", "0" * 32)
    with pytest.raises(DataError, match=r"checksum mismatch for .*cifar-10-python\.tar\.gz"):
        data.ensure_downloaded("cifar10", tmp_path, progress=False, mirror=data_server.url)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cifar10.lock"]
    _use_archive(monkeypatch, "cifar10", data_cifar10_archive)
    data.ensure_downloaded("cifar10", tmp_path, progress=False, mirror=data_server.url)
    assert (tmp_path / "cifar-10-batches-py" / "test_batch").is_file()


def test_a_second_download_waits_for_the_first_and_fetches_nothing(
        tmp_path, data_server, monkeypatch, data_cifar10_archive, capfd):
    # two runs started side by side share one data dir: the second waits on the lock, then
    # finds the folder complete instead of writing the same .part file
    _use_archive(monkeypatch, "cifar10", data_cifar10_archive)
    data_server.serve(data_cifar10_archive)
    info = data.DATASETS["cifar10"]
    results = []
    with data._download_lock(tmp_path, info, progress=False):
        t = threading.Thread(target=lambda: results.append(data.ensure_downloaded(
            "cifar10", tmp_path, progress=True, mirror=data_server.url)))
        t.start()
        t.join(timeout=2.0)
        assert t.is_alive() and results == []  # blocked while the lock is held
        assert "waiting for another process to finish downloading cifar10" in \
            capfd.readouterr().err
        # the "first" run completes the dataset while holding the lock
        data._download_and_extract(info, tmp_path, tmp_path / info.folder, data_server.url,
                                   False, 10.0)
    t.join(timeout=30.0)
    assert results == [tmp_path / "cifar-10-batches-py"]
    assert data_server.requests == ["cifar-10-python.tar.gz"]  # fetched once, by the first


def test_a_verified_archive_on_disk_is_never_deleted(tmp_path, data_server, monkeypatch,
                                                     data_cifar10_archive):
    data_server.serve(data_cifar10_archive)
    _use_archive(monkeypatch, "cifar10", data_cifar10_archive)
    data.ensure_downloaded("cifar10", tmp_path, progress=False, mirror=data_server.url)
    archive = tmp_path / "cifar-10-python.tar.gz"
    before = archive.read_bytes()
    for f in (tmp_path / "cifar-10-batches-py").iterdir():
        f.unlink()
    _set_md5(monkeypatch, "cifar10", "0" * 32)  # e.g. a wrong published checksum
    with pytest.raises(DataError, match="fails its MD5 check"):
        data.ensure_downloaded("cifar10", tmp_path, progress=False, mirror=data_server.url)
    assert archive.read_bytes() == before
    assert data_server.requests == ["cifar-10-python.tar.gz"]


def test_truncated_download_is_retried_then_reported(tmp_path, data_server, monkeypatch,
                                                     data_cifar10_archive):
    data_server.serve(data_cifar10_archive)
    data_server.short["cifar-10-python.tar.gz"] = 1000
    _use_archive(monkeypatch, "cifar10", data_cifar10_archive)
    with pytest.raises(DataError, match="cannot download .*cifar-10-python.tar.gz"):
        data.ensure_downloaded("cifar10", tmp_path, progress=False, mirror=data_server.url)
    assert len(data_server.requests) == data._ATTEMPTS
    assert not list(tmp_path.glob("*.part")) and not (tmp_path / "cifar-10-python.tar.gz").exists()


def test_http_error_names_url_and_file(tmp_path, data_server):
    with pytest.raises(DataError, match=r"cannot download http://127\.0\.0\.1:\d+/cifar-100"):
        data.ensure_downloaded("cifar100", tmp_path, progress=False, mirror=data_server.url)
    assert data_server.requests == ["cifar-100-python.tar.gz"]  # a 404 is not retried


def test_corrupt_archive_is_reported_and_kept(tmp_path, data_server, monkeypatch,
                                              data_cifar10_archive):
    good = data_cifar10_archive["cifar-10-python.tar.gz"].read_bytes()
    data_server.files["cifar-10-python.tar.gz"] = good[:len(good) // 2]
    _set_md5(monkeypatch, "cifar10", hashlib.md5(good[:len(good) // 2]).hexdigest())
    with pytest.raises(DataError, match="corrupt or truncated archive .*cifar-10-python"):
        data.ensure_downloaded("cifar10", tmp_path, progress=False, mirror=data_server.url)
    assert (tmp_path / "cifar-10-python.tar.gz").is_file()
    assert not (tmp_path / "cifar-10-batches-py").exists()
    assert not list(tmp_path.glob(".extract-*"))


def test_archive_missing_files_after_extraction(tmp_path, data_server, monkeypatch):
    folder = data.write_fake("cifar10", tmp_path / "src", 20, 5)
    (folder / "test_batch").unlink()
    bad = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    data_server.serve({"cifar-10-python.tar.gz": bad})
    _use_archive(monkeypatch, "cifar10", {"cifar-10-python.tar.gz": bad})
    with pytest.raises(DataError, match="lacks test_batch"):
        data.ensure_downloaded("cifar10", tmp_path / "d", progress=False,
                               mirror=data_server.url)


def test_archive_with_a_member_outside_its_folder_is_refused(tmp_path, data_server,
                                                             monkeypatch):
    evil = tmp_path / "cifar-10-python.tar.gz"
    (tmp_path / "payload").write_text("x")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(tmp_path / "payload", arcname="../escaped")
    data_server.serve({"cifar-10-python.tar.gz": evil})
    _use_archive(monkeypatch, "cifar10", {"cifar-10-python.tar.gz": evil})
    with pytest.raises(DataError, match="archive .*cifar-10-python.tar.gz"):
        data.ensure_downloaded("cifar10", tmp_path / "d", progress=False,
                               mirror=data_server.url)
    assert not (tmp_path / "escaped").exists()


def test_svhn_downloads_three_mat_files(tmp_path, data_server, monkeypatch):
    archives = data.write_fake_archive("svhn", tmp_path / "src", 30, 8)
    assert sorted(archives) == ["extra_32x32.mat", "test_32x32.mat", "train_32x32.mat"]
    data_server.serve(archives)
    _use_archive(monkeypatch, "svhn", archives)
    folder = data.ensure_downloaded("svhn", tmp_path / "d", progress=False,
                                    mirror=data_server.url)
    assert folder == tmp_path / "d" / "svhn"
    assert sorted(data_server.requests) == sorted(archives)
    s = data.prepare("svhn", tmp_path / "d", "final", 0, download=True, progress=False)
    assert (len(s.train_x), len(s.eval_x)) == (30, 8)
    assert len(data_server.requests) == 3


def test_unwritable_data_dir_is_a_data_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="data directory .*a_file/sub is not writable"):
        data.ensure_downloaded("cifar10", blocker / "sub", progress=False,
                               mirror="http://127.0.0.1:9/")
    with pytest.raises(DataError, match="data directory .*a_file is a file, not a directory"):
        data.ensure_downloaded("cifar10", blocker, progress=False, mirror="http://127.0.0.1:9/")
    assert blocker.read_text() == "not a folder"


# ------------------------------------------------------------------------------------------
# the batch sampler

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


def test_bench_command_prints_images_per_second(capsys):
    assert data.main(["bench", "--n", "300", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("images/s") == 2 and "flip=True" in out
