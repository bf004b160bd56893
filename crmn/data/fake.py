"""Small fake datasets in the official formats (smoke runs, tests): everything downstream
runs unchanged on them; a marker file (:data:`FAKE_MARKER`) tells them from real ones."""
from __future__ import annotations

import pickle
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, Sequence

import numpy as np

from crmn.data.sources import PathLike, dataset_info, locate
from crmn.errors import ConfigError, DataError

FAKE_MARKER = "FAKE_DATA.txt"  # left by write_fake in a folder of fake data


def _fake_images(classes: int, counts: Sequence[int], seed: int):
    """Learnable random images per count: a colour and a 4x4 pattern per class, plus noise."""
    rng = np.random.default_rng([seed, classes])
    colour = rng.uniform(0.2, 0.8, size=(classes, 3, 1, 1))
    pattern = rng.uniform(-0.2, 0.2, size=(classes, 1, 4, 4)).repeat(8, 2).repeat(8, 3)
    templates = colour + pattern  # (classes, 3, 32, 32); blocks of 8 px survive ±4 crops
    out = []
    for n in counts:
        y = rng.integers(0, classes, size=n).astype(np.int64)
        x = templates[y] + rng.normal(0.0, 0.08, size=(n, 3, 32, 32))
        out.append((np.round(np.clip(x, 0, 1) * 255).astype(np.uint8), y))
    return out


def _write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the protocol of the official Python 2 files


def _batch(label: str, key: bytes, x: np.ndarray, y: np.ndarray, name: str) -> dict:
    """A batch laid out as the official CIFAR pickles are."""
    return {b"batch_label": label.encode(), key: y.tolist(), b"data": x.reshape(len(x), 3072),
            b"filenames": [f"fake_{name}_{j}.png".encode() for j in range(len(x))]}


def write_fake(name: str, data_dir: PathLike, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write fake data as the official files of ``name`` (SVHN: train + extra) and the marker."""
    info = dataset_info(name)
    if n_train < 1 or n_test < 1:
        raise ConfigError(f"fake data needs n_train, n_test >= 1, got {n_train}, {n_test}")
    folder = Path(data_dir) / info.folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {folder}: {e.strerror or e}") from None
    writer = {"svhn": _write_svhn, "cifar10": _write_cifar10, "cifar100": _write_cifar100}
    writer[name](folder, n_train, n_test, seed)
    (folder / FAKE_MARKER).write_text(
        f"Fake {name} data written by crmn.data.write_fake (n_train={n_train}, "
        f"n_test={n_test}, seed={seed}); not the real dataset.\n")
    return folder


def _write_svhn(folder: Path, n_train: int, n_test: int, seed: int) -> None:
    import scipy.io  # imported here: only SVHN needs scipy

    n_extra = n_train // 2
    sets = _fake_images(10, [n_train - n_extra, n_extra, n_test], seed)
    for part, (x, y) in zip(("train", "extra", "test"), sets):
        scipy.io.savemat(str(folder / f"{part}_32x32.mat"), {
            "X": np.ascontiguousarray(x.transpose(2, 3, 1, 0)),  # (32, 32, 3, N)
            "y": np.where(y == 0, 10, y).astype(np.uint8).reshape(-1, 1)})


def _write_cifar10(folder: Path, n_train: int, n_test: int, seed: int) -> None:
    (x, y), (xt, yt) = _fake_images(10, [n_train, n_test], seed)
    for i, (xs, ys) in enumerate(zip(np.array_split(x, 5), np.array_split(y, 5)), 1):
        _write_pickle(folder / f"data_batch_{i}",
                      _batch(f"training batch {i} of 5", b"labels", xs, ys, str(i)))
    _write_pickle(folder / "test_batch", _batch("testing batch 1 of 1", b"labels", xt, yt, "test"))
    _write_pickle(folder / "batches.meta", {
        b"label_names": [f"class{c}".encode() for c in range(10)],
        b"num_cases_per_batch": int(np.ceil(n_train / 5)), b"num_vis": 3072})


def _write_cifar100(folder: Path, n_train: int, n_test: int, seed: int) -> None:
    (x, y), (xt, yt) = _fake_images(100, [n_train, n_test], seed)
    for fname, xs, ys in (("train", x, y), ("test", xt, yt)):
        batch = _batch(f"{fname}ing batch 1 of 1", b"fine_labels", xs, ys, fname)
        _write_pickle(folder / fname, {**batch, b"coarse_labels": (ys // 5).tolist()})
    _write_pickle(folder / "meta", {
        b"fine_label_names": [f"fine{c}".encode() for c in range(100)],
        b"coarse_label_names": [f"coarse{c}".encode() for c in range(20)]})


def write_fake_archive(name: str, out_dir: PathLike, n_train: int, n_test: int,
                       seed: int = 0) -> Dict[str, Path]:
    """Fake data packed as the official downloads of ``name``: ``{file name: path}``."""
    info = dataset_info(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not info.extract:
        folder = write_fake(name, out_dir, n_train, n_test, seed)
        return {fname: folder / fname for fname, _ in info.archives}
    fname = info.archives[0][0]
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        folder = write_fake(name, tmp, n_train, n_test, seed)
        with tarfile.open(out_dir / fname, "w:gz") as tar:
            tar.add(folder, arcname=info.folder)
    return {fname: out_dir / fname}


def is_fake(name: str, data_dir: PathLike) -> bool:
    """True when ``data_dir`` holds, or is, a folder written by :func:`write_fake`."""
    folder = locate(name, data_dir) or Path(data_dir) / dataset_info(name).folder
    return (folder / FAKE_MARKER).is_file()

