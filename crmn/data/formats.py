"""Readers of the official on-disk formats: CIFAR's Python pickles and SVHN's ``.mat`` files.

:func:`load_raw` reads a dataset's extracted folder into ``uint8`` arrays ``(N, 3, 32, 32)``
and ``int64`` labels, checking every file's layout so that a wrong or damaged file stops with
one line naming it; :func:`count_images` counts the images of one file for the checks of
:mod:`crmn.data.integrity`.
"""
from __future__ import annotations

import pickle
import zlib
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from crmn.data.sources import PathLike, dataset_info, locate
from crmn.errors import DataError


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"missing dataset file {path}")
    try:
        with open(path, "rb") as f:
            # the CIFAR batches are Python 2 pickles with byte-string keys
            return pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError) as e:
        raise DataError(f"corrupt CIFAR batch {path}: {e.__class__.__name__}: {e}") from None


def _cifar_batch(path: Path, label_key: bytes, classes: int) -> Tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        raise DataError(f"CIFAR batch {path} lacks the keys 'data' and "
                        f"{label_key.decode()!r}")
    x = np.asarray(d[b"data"])
    y = np.asarray(d[label_key], dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
        raise DataError(f"CIFAR batch {path} has data {x.dtype}{x.shape} and {len(y)} "
                        f"labels; expected uint8 (N, 3072) and N labels")
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise DataError(f"CIFAR batch {path} has labels outside 0..{classes - 1}")
    # each row is 1024 red, 1024 green, 1024 blue values, row-major: (N, 3, 32, 32)
    return x.reshape(-1, 3, 32, 32), y


def _svhn_mat(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    import scipy.io

    if not path.is_file():
        raise DataError(f"missing dataset file {path}")
    try:
        m = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except (ValueError, TypeError, OSError, EOFError, KeyError, IndexError,
            NotImplementedError, zlib.error) as e:
        raise DataError(f"corrupt SVHN file {path}: {e.__class__.__name__}: {e}") from None
    if "X" not in m or "y" not in m:
        raise DataError(f"SVHN file {path} lacks the variables 'X' and 'y'")
    x, y = m["X"], np.asarray(m["y"]).reshape(-1).astype(np.int64)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) \
            or x.shape[3] != len(y):
        raise DataError(f"SVHN file {path} has X {x.dtype}{x.shape} and {len(y)} labels; "
                        f"expected uint8 (32, 32, 3, N) and N labels")
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise DataError(f"SVHN file {path} has labels outside 1..10")
    y[y == 10] = 0  # SVHN stores the digit 0 as label 10
    # X[row, col, channel, image] -> (image, channel, row, col)
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y


#: The label list a run uses: CIFAR-100's 100 fine labels, not its 20 coarse ones.
_LABEL_KEY = {"cifar10": b"labels", "cifar100": b"fine_labels"}


def count_images(name: str, path: Path) -> int:
    """Images in the official data file ``path`` of ``name``, its layout checked.

    CIFAR batches are read whole (as :func:`load_raw` reads them); an SVHN ``.mat`` file is
    counted from its header, without loading its pixels.
    """
    if name != "svhn":
        return len(_cifar_batch(path, _LABEL_KEY[name], dataset_info(name).classes)[1])
    import scipy.io  # imported here, as in _svhn_mat

    try:
        shapes = {var: shape for var, shape, _ in scipy.io.whosmat(str(path))}
    except (ValueError, TypeError, OSError, EOFError, KeyError, IndexError,
            NotImplementedError, zlib.error) as e:
        raise DataError(f"corrupt SVHN file {path}: {e.__class__.__name__}: {e}") from None
    if len(shapes.get("X", ())) != 4:
        raise DataError(f"SVHN file {path} lacks a 4-d variable 'X' (32, 32, 3, N)")
    return int(shapes["X"][3])


def load_raw(name: str, data_dir: PathLike) -> Dict[str, np.ndarray]:
    """Read the extracted official files of ``name`` from ``data_dir``.

    ``data_dir`` holds the extracted folder, or is it (:func:`crmn.data.locate`); when
    neither has every file, the missing file under ``data_dir/<folder>`` is named.

    Returns
    -------
    dict
        ``x_train`` uint8 (N, 3, 32, 32), ``y_train`` int64 (N,), ``x_test``, ``y_test``;
        for SVHN also ``x_extra``, ``y_extra``. CIFAR-100 uses the 100 fine labels; SVHN's
        label 10 becomes the digit 0.
    """
    info = dataset_info(name)
    folder = locate(name, data_dir) or Path(data_dir) / info.folder
    if name == "svhn":
        out = {}
        for part in ("train", "extra", "test"):
            out[f"x_{part}"], out[f"y_{part}"] = _svhn_mat(folder / f"{part}_32x32.mat")
        return out
    if name == "cifar10":
        key = _LABEL_KEY[name]
        parts = [_cifar_batch(folder / f"data_batch_{i}", key, 10) for i in range(1, 6)]
        x_test, y_test = _cifar_batch(folder / "test_batch", key, 10)
        x_train = np.concatenate([p[0] for p in parts])
        y_train = np.concatenate([p[1] for p in parts])
    else:
        x_train, y_train = _cifar_batch(folder / "train", _LABEL_KEY[name], 100)
        x_test, y_test = _cifar_batch(folder / "test", _LABEL_KEY[name], 100)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}

