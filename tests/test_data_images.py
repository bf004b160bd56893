"""Image-folder datasets (crmn/data/images.py), hand-made CIFAR pickles and --subset.

Every source is written here: a few PNGs per class (lossless, so the arrays can be compared
with the pixels written), packed as the archives a user would make.
"""
import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from crmn import data
from crmn.data import images
from crmn.errors import DataError

PIL = pytest.importorskip("PIL.Image")
pytestmark = pytest.mark.current  # framework-free but the one run: the current environment too


def _png(pixels, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    PIL.fromarray(pixels).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _pixels(i, size=32):
    return np.random.default_rng(i).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def image_folder(root, name="cifar10", n_train=2, n_test=1, prefix="imgs"):
    """``root/prefix/{train,test}/<class>/<k>.png``; returns (source folder, arrays)."""
    src = root / prefix if prefix else root
    want = {}
    for split, n in (("train", n_train), ("test", n_test)):
        xs, ys = [], []
        for label, cls in enumerate(images.CLASSES[name]):
            (src / split / cls).mkdir(parents=True)
            for k in range(n):
                px = _pixels(hash((split, label, k)) % 2**32)
                (src / split / cls / f"{k:04d}.png").write_bytes(_png(px))
                xs.append(px.transpose(2, 0, 1))
                ys.append(label)
        want[f"x_{split}"], want[f"y_{split}"] = np.stack(xs), np.array(ys)
    (src / "README.md").write_text("not an image, outside train/ and test/\n")
    return src, want


def _pack(folder: Path, archive: Path) -> Path:
    """``archive`` (.tar, .tar.gz, .tar.xz, .zip) of ``folder`` under its own name."""
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as z:
            for p in sorted(folder.rglob("*")):
                z.write(p, p.relative_to(folder.parent).as_posix())
    else:
        mode = {".tar": "w", ".gz": "w:gz", ".xz": "w:xz"}[archive.suffix]
        with tarfile.open(archive, mode) as tar:
            tar.add(folder, arcname=folder.name)
    return archive


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("CRMN_CACHE", str(folder))
    return folder / "data"


def test_a_folder_and_its_archives_give_the_official_arrays(tmp_path, cache, capsys):
    src, want = image_folder(tmp_path / "d")
    got = [images.load("cifar10", images.source(tmp_path / "d"), exact=False)]
    for suffix in (".tar", ".tar.gz", ".tar.xz", ".zip"):
        archive = _pack(src, tmp_path / f"imgs{suffix}")
        assert images.source(archive) == archive
        got.append(images.load("cifar10", archive, exact=False))
    for arrays in got:
        assert sorted(arrays) == sorted(want)
        for k, v in want.items():
            assert arrays[k].dtype == (np.uint8 if k[0] == "x" else np.int64)
            np.testing.assert_array_equal(arrays[k], v)
    assert images.source(src) == src and images.source(tmp_path) is None


def test_the_cache_is_hit_and_a_damaged_one_is_rebuilt(tmp_path, cache, capsys):
    src, want = image_folder(tmp_path / "d")
    first = images.load("cifar10", src, exact=False)
    assert "(decoded, now cached)" in capsys.readouterr().out
    [entry] = cache.glob("*.npz")
    images.load("cifar10", src, exact=False)
    assert "(cache hit)" in capsys.readouterr().out
    entry.write_bytes(entry.read_bytes()[:1000])  # cut short
    again = images.load("cifar10", src, exact=False)
    out, err = capsys.readouterr()
    assert "(decoded, now cached)" in out and f"{entry}: unreadable" in err
    np.testing.assert_array_equal(again["x_train"], first["x_train"])
    images.load("cifar10", src, exact=False)
    assert "(cache hit)" in capsys.readouterr().out
    (src / "train" / "cat" / "0000.png").write_bytes(_png(_pixels(99)))  # new bytes, new key
    images.load("cifar10", src, exact=False)
    assert "(decoded, now cached)" in capsys.readouterr().out and len(list(cache.glob("*"))) == 2


def test_cifar100_folders_map_to_the_fine_labels(tmp_path, cache):
    src, want = image_folder(tmp_path, "cifar100", n_train=1, n_test=1, prefix=None)
    arrays = images.load("cifar100", src, exact=False)
    names = images.CLASSES["cifar100"]
    assert len(set(names)) == 100 and names == sorted(names)  # the official order
    assert (names.index("keyboard"), names.index("worm")) == (39, 99)
    np.testing.assert_array_equal(arrays["y_train"], np.arange(100))
    np.testing.assert_array_equal(arrays["x_test"], want["x_test"])


def _bad_class(src):
    (src / "train" / "airplane").rename(src / "train" / "aeroplane")
    return "unknown class folder train/aeroplane/ for cifar10"


def _big_image(src):
    (src / "test" / "dog" / "0000.png").write_bytes(_png(_pixels(3, size=64)))
    return "member 'test/dog/0000.png' is not a whole 32x32 RGB PNG or JPEG image"


def _truncated_jpeg(src):
    blob = _png(_pixels(1), "JPEG", quality=90)
    (src / "train" / "ship" / "0001.jpg").write_bytes(blob[:len(blob) // 2])
    return "member 'train/ship/0001.jpg' is not a whole 32x32 RGB PNG or JPEG image"


def _grey(src):
    (src / "train" / "cat" / "0000.png").write_bytes(_png(_pixels(1)[:, :, 0]))
    return "(32x32 L)"


def _missing_class(src):
    for p in (src / "test" / "truck").iterdir():
        p.unlink()
    return "no images in test/truck/"


BAD = {"unknown class": _bad_class, "64x64 image": _big_image,
       "truncated jpeg": _truncated_jpeg, "grey image": _grey, "missing class": _missing_class}


def _tree(root):
    """Every path under ``root`` but the cache's."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.relative_to(root).parts[0] != "cache")


@pytest.mark.parametrize("case", sorted(BAD) + ["member ../x", "link member"])
def test_the_cli_refuses_a_bad_image_source_in_one_line_creating_nothing(tmp_path, cache,
                                                                          run_main, case):
    src, _ = image_folder(tmp_path / "d")
    if case in BAD:
        expected, where = BAD[case](src), src
    else:
        where = tmp_path / "d.tar.gz"
        with tarfile.open(where, "w:gz") as tar:
            tar.add(src, arcname="imgs")
            info = tarfile.TarInfo("../x" if case == "member ../x" else "imgs/train/cat/l.png")
            if case == "link member":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            else:
                info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
        expected = "leaves the folder" if case == "member ../x" else "is a link"
    before = _tree(tmp_path)
    rc, out, err = run_main(["table3", "--rows", "t3-crmn56x3", "--backend", "theano",
                             "--theano-mode", "jax", "--n", "1", "--k", "0.5", "--dataset",
                             "cifar10", "--subset", "10", "--schedule", "1,0,0", "--no-progress",
                             "--batch-size", "5", "--data-dir", str(where), "--out-dir",
                             str(tmp_path / "out")])
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert str(where) in err and expected in err, err
    assert _tree(tmp_path) == before  # nothing created but the cache
    assert not list(cache.glob("*.npz"))


def test_counts_other_than_the_datasets_need_subset(tmp_path, cache):
    src, _ = image_folder(tmp_path / "d")
    with pytest.raises(DataError, match=r"train/ holds 20 images, CIFAR-10 has 50,000; "
                                        r"complete it, or pass --subset N"):
        data.prepare("cifar10", src, "final", 0)
    split = data.prepare("cifar10", src, "final", 0, subset=10)
    assert len(split.train_y) == 10 and sorted(split.train_y) == list(range(10))
    assert sorted(split.eval_y) == list(range(10))  # at least one test image per class
    with pytest.raises(DataError, match="--subset asks for 21 training images, the data "
                                        "hold 20; choose a smaller N"):
        data.prepare("cifar10", src, "final", 0, subset=21)
    with pytest.raises(DataError, match="no such file or folder .*none.tar.gz; give an image"):
        data.prepare("cifar10", tmp_path / "none.tar.gz", "final", 0)
    assert data.provenance("cifar10", src) == "unverified"  # without --unverified-data
    assert data.describe("cifar10", src, 10) == ("CIFAR-10 from image folders, re-encoded; "
                                                "a quick look on 10 training images (--subset)")


def test_subset_is_class_balanced_fixed_and_proportional(tmp_path, cache):
    from crmn.data.prepare import _balanced

    labels = np.repeat(np.arange(10), 50)[np.random.default_rng(0).permutation(500)]
    picked = _balanced(labels, 30, tmp_path, "training")
    assert np.bincount(labels[picked], minlength=10).tolist() == [3] * 10
    np.testing.assert_array_equal(picked, _balanced(labels, 30, tmp_path, "training"))
    assert len(set(picked)) == 30 and list(picked) == sorted(picked)
    src, _ = image_folder(tmp_path / "d", n_train=10, n_test=2)
    a = data.prepare("cifar10", src, "final", 0, subset=50)
    b = data.prepare("cifar10", src, "final", 1, subset=50)
    assert len(a.eval_y) == 10 and np.array_equal(a.train_x, b.train_x)  # 50/100 of 20 test
    search = data.prepare("cifar10", src, "search", 0, subset=50)
    assert (len(search.train_y), len(search.eval_y)) == (45, 5)


@pytest.mark.slow
def test_a_subset_run_from_an_archive_names_its_data_in_config_and_report(tmp_path, cache,
                                                                         run_main):
    pytest.importorskip("modern.backend")
    src, _ = image_folder(tmp_path / "d", n_train=3)
    archive = _pack(src, tmp_path / "imgs.tar.gz")
    rc, out, err = run_main(["table3", "--rows", "t3-crmn56x3", "--backend", "torch", "--n",
                             "1", "--k", "0.5", "--dataset", "cifar10", "--subset", "20",
                             "--schedule", "1,0,0", "--batch-size", "10", "--no-progress",
                             "--data-dir", str(archive), "--out-dir", str(tmp_path / "out")])
    assert rc == 0, err
    assert "data: CIFAR-10 from image folders (decoded, now cached)" in out
    config = json.loads((tmp_path / "out/table3/t3-crmn56x3/seed0/config.json").read_text())
    assert config["data"] == "unverified"
    described = ("CIFAR-10 from image folders, re-encoded; a quick look on 20 training "
                 "images (--subset)")
    assert config["data_description"] == described
    assert f"UNVERIFIED DATA ({described})" in (tmp_path / "out/table3/REPORT.md").read_text()


# --- hand-made CIFAR pickles, as a new user writes them -----------------------------------

def _own_batches(folder, labels_of):
    folder.mkdir()
    x = np.random.default_rng(0).integers(0, 256, size=(20, 3072), dtype=np.uint8)
    for fname in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / fname, "wb") as f:
            # str keys and the newest protocol (arrays as _frombuffer), as Python 3 writes
            pickle.dump({"data": x, "labels": labels_of(np.arange(20) % 10)}, f,
                        protocol=pickle.HIGHEST_PROTOCOL)
    return folder


@pytest.mark.parametrize("labels_of", [lambda y: y.reshape(-1, 1), lambda y: list(y),
                                       lambda y: list(y.astype(np.uint8))],
                         ids=["(N, 1) array", "numpy int64 items", "numpy uint8 items"])
def test_own_pickles_with_common_label_forms_are_read(tmp_path, labels_of):
    folder = _own_batches(tmp_path / "cifar-10-batches-py", labels_of)
    raw = data.load_raw("cifar10", folder)
    assert raw["y_train"].shape == (100,) and raw["y_train"].dtype == np.int64
    np.testing.assert_array_equal(raw["y_test"], np.arange(20) % 10)


@pytest.mark.parametrize("labels_of,expected", [
    (lambda y: [str(v) for v in y], "has labels <U1(20,); expected N integers"),
    (lambda y: y.reshape(2, 10), "has labels int64(2, 10); expected N integers"),
    (lambda y: y.astype(np.float64), "has labels float64(20,); expected N integers"),
    (lambda y: np.array([np.float64(v) for v in y], dtype=object), "has labels object(20,)"),
], ids=["strings", "2-d", "floats", "object array"])
def test_own_pickles_that_are_not_plain_labels_are_refused_in_one_line(tmp_path, labels_of,
                                                                      expected):
    folder = _own_batches(tmp_path / "cifar-10-batches-py", labels_of)
    with pytest.raises(DataError) as e:
        data.load_raw("cifar10", folder)
    msg = str(e.value)
    assert "\n" not in msg and expected in msg and "data_batch_1" in msg, msg
    assert "'labels': [int, ...]" in msg  # the way on for one's own data


def test_a_numpy_scalar_of_a_non_numeric_dtype_is_refused(tmp_path):
    from crmn.data.formats import load_data_pickle

    path = tmp_path / "f"
    path.write_bytes(pickle.dumps({"labels": [np.int64(3), np.float32(1.5)]}, protocol=2))
    assert load_data_pickle(path)["labels"] == [3, 1.5]
    blob = pickle.dumps(np.datetime64("2020-01-01"), protocol=2)
    path.write_bytes(blob)
    with pytest.raises(DataError, match="asks for a numpy scalar of dtype dtype\\('<M8"):
        load_data_pickle(path)


@pytest.mark.parametrize("member", ["../x.png", "/etc/x.png", "imgs/train/../../x.png"])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_archive_members_that_leave_the_folder_are_refused(tmp_path, cache, member, kind):
    src, _ = image_folder(tmp_path / "d", n_train=1)
    archive = _pack(src, tmp_path / ("imgs.zip" if kind == "zip" else "imgs.tar"))
    if kind == "zip":
        with zipfile.ZipFile(archive, "a") as z:
            z.writestr(member, b"abc")
    else:
        with tarfile.open(archive, "a") as tar:
            info = tarfile.TarInfo(member)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(DataError, match=f"member '{member}' leaves the folder; nothing was "
                                        "written"):
        images.load("cifar10", archive, exact=False)
