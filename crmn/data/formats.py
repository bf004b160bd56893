"""Readers of CIFAR's Python pickles and SVHN's ``.mat`` files, every layout checked.

No file is trusted: pickles are read by :func:`load_data_pickle`, which refuses any global but
numpy's plain arrays and numbers and plain containers; ``scipy.io`` runs no code.
"""
from __future__ import annotations

import importlib
import pickle
import zlib
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from crmn.data.sources import PathLike, dataset_info, locate
from crmn.errors import DataError


def _numpy(module: str, name: str):
    """``numpy.<module>.<name>``, under numpy 2's module name or numpy 1's."""
    try:
        return getattr(importlib.import_module(f"numpy._core.{module}"), name)
    except (ImportError, AttributeError):
        return getattr(importlib.import_module(f"numpy.core.{module}"), name)


def _plain(dtype, what: str) -> None:
    """Refuse a dtype that is not a plain number (objects could hold anything)."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or (
            what == "scalar" and (dtype.kind not in "biufc" or dtype.fields is not None)):
        raise RefusedGlobal(f"a numpy {what} of dtype {dtype!r}")


def _plain_only(module: str, name: str, what: str):
    """numpy's scalar or protocol-5 array constructor, refusing dtypes that are not plain."""
    make, at = _numpy(module, name), 0 if what == "scalar" else 1  # where the dtype is
    return lambda *args: _plain(args[at], what) or make(*args)


def _latin1_encode(text, encoding):
    """``_codecs.encode`` as Python 3 writes ``bytes`` into a protocol-2 pickle, latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is allowed only as (str, 'latin1'), got "
                                     f"({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


_CORE = ("numpy.core.", "numpy._core.")
#: The only globals a CIFAR pickle may name (numpy 1.x and 2.x names); any other is refused
#: before it is even imported.
_ALLOWED_GLOBALS = {
    **{(m + "multiarray", "_reconstruct"): lambda: _numpy("multiarray", "_reconstruct")
       for m in _CORE},
    **{(m + "multiarray", "scalar"): lambda: _plain_only("multiarray", "scalar", "scalar")
       for m in _CORE},
    **{(m + "numeric", "_frombuffer"): lambda: _plain_only("numeric", "_frombuffer", "array")
       for m in _CORE},
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
    **{(module, name): (lambda t=t: t)
       for module in ("builtins", "__builtin__")
       for name, t in (("dict", dict), ("list", list), ("tuple", tuple), ("set", set),
                       ("frozenset", frozenset), ("bytearray", bytearray))},
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global outside :data:`_ALLOWED_GLOBALS`."""


class _DataUnpickler(pickle.Unpickler):
    """Builds numpy arrays, plain numbers and containers, and nothing else."""

    def find_class(self, module: str, name: str):
        make = _ALLOWED_GLOBALS.get((module, name))
        if make is None:
            raise RefusedGlobal(f"{module}.{name}")
        return make()


#: how to write a batch of one's own (the end of a refusal)
_OWN_BATCH = ("write your own batch as a dict of numpy arrays, lists and numbers, e.g. "
              "{'data': uint8 array (N, 3072), 'labels': [int, ...]}, or use the official file")


def load_data_pickle(path: PathLike):
    """The object in a CIFAR-style pickle, read without running code (Python 2 str: bytes)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing dataset file {path}; put the official file there")
    try:
        with open(path, "rb") as f:
            return _DataUnpickler(f, encoding="bytes").load()
    except RefusedGlobal as e:
        raise DataError(f"{path}: refuses to load: the pickle asks for {e}, which could run "
                        f"code; {_OWN_BATCH}") from None
    except OSError as e:
        raise DataError(f"cannot read dataset file {path}: {e.strerror or e}; check its "
                        "permissions and the disk") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError, MemoryError, RecursionError,
            UnicodeDecodeError) as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"corrupt CIFAR batch {path}: not a complete CIFAR pickle ({msg}); "
                        "replace it with the official file") from None


def _cifar_batch(path: Path, label_key: bytes, classes: int) -> Tuple[np.ndarray, np.ndarray]:
    d = load_data_pickle(path)
    if not isinstance(d, dict):
        raise DataError(f"CIFAR batch {path} holds a {type(d).__name__}, not the dict of an "
                        "official batch; replace it with the official file")
    d = {k.encode() if isinstance(k, str) else k: v for k, v in d.items()}  # str keys too
    missing = [k.decode() for k in (b"data", label_key) if k not in d]
    if missing:
        held = ", ".join(repr(k.decode(errors="replace") if isinstance(k, bytes) else str(k))
                         for k in d) or "no key"
        raise DataError(f"CIFAR batch {path} has no key {' or '.join(map(repr, missing))} "
                        f"(it holds {held}); replace it with the official file, or write "
                        f"its labels under {label_key.decode()!r}")
    try:
        x, y = np.asarray(d[b"data"]), np.asarray(d[label_key])
    except (ValueError, TypeError) as e:  # ragged lists
        raise DataError(f"CIFAR batch {path} holds no arrays ({e}); {_OWN_BATCH}") from None
    if y.ndim == 2 and y.shape[1] == 1:  # (N, 1), as many tools save labels
        y = y[:, 0]
    if y.ndim != 1 or (y.size and y.dtype.kind not in "iu"):
        raise DataError(f"CIFAR batch {path} has labels {y.dtype}{y.shape}; expected N "
                        f"integers: {_OWN_BATCH}")
    y = y.astype(np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
        raise DataError(f"CIFAR batch {path} has data {x.dtype}{x.shape} and {len(y)} "
                        f"labels; expected uint8 (N, 3072) and N labels: replace it with the "
                        "official file")
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise DataError(f"CIFAR batch {path} has labels outside 0..{classes - 1}; replace it "
                        "with the official file, or choose the --dataset it belongs to")
    # each row is 1024 red, 1024 green, 1024 blue values, row-major: (N, 3, 32, 32)
    return x.reshape(-1, 3, 32, 32), y


def _read_mat(path: Path, read: str):
    """``scipy.io.<read>`` of an SVHN file (``loadmat`` of X and y, or ``whosmat``)."""
    import scipy.io  # imported here: only SVHN needs scipy

    try:
        if read == "whosmat":
            return scipy.io.whosmat(str(path))
        return scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except (ValueError, TypeError, OSError, EOFError, KeyError, IndexError,
            NotImplementedError, zlib.error) as e:
        raise DataError(f"corrupt SVHN file {path}: not a complete MATLAB file ({e}); replace "
                        "it with the official file") from None


def _svhn_mat(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"missing dataset file {path}; put the official file there")
    m = _read_mat(path, "loadmat")
    if "X" not in m or "y" not in m:
        raise DataError(f"SVHN file {path} lacks the variables 'X' and 'y'; replace it with "
                        "the official file")
    x, y = m["X"], np.asarray(m["y"]).reshape(-1).astype(np.int64)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) \
            or x.shape[3] != len(y):
        raise DataError(f"SVHN file {path} has X {x.dtype}{x.shape} and {len(y)} labels; "
                        f"expected uint8 (32, 32, 3, N) and N labels: replace it with the "
                        "official file")
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise DataError(f"SVHN file {path} has labels outside 1..10; replace it with the "
                        "official file")
    y[y == 10] = 0  # SVHN stores the digit 0 as label 10
    # X[row, col, channel, image] -> (image, channel, row, col)
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y


#: The label list a run uses: CIFAR-100's 100 fine labels, not its 20 coarse ones.
_LABEL_KEY = {"cifar10": b"labels", "cifar100": b"fine_labels"}


def count_images(name: str, path: Path) -> int:
    """Images in the data file ``path`` of ``name`` (SVHN: from the header alone)."""
    if name != "svhn":
        return len(_cifar_batch(path, _LABEL_KEY[name], dataset_info(name).classes)[1])
    shapes = {var: shape for var, shape, _ in _read_mat(path, "whosmat")}
    if len(shapes.get("X", ())) != 4:
        raise DataError(f"SVHN file {path} lacks a 4-d variable 'X' (32, 32, 3, N); replace "
                        "it with the official file")
    return int(shapes["X"][3])


def load_raw(name: str, data_dir: PathLike) -> Dict[str, np.ndarray]:
    """``x_train`` uint8 (N, 3, 32, 32), ``y_train`` int64 (N,), ``x_test``, ``y_test`` (SVHN:
    also ``x_extra``, ``y_extra``; CIFAR-100: the fine labels) of ``name`` in ``data_dir``."""
    info = dataset_info(name)
    folder = locate(name, data_dir) or Path(data_dir) / info.folder
    if name == "svhn":
        mats = {p: _svhn_mat(folder / f"{p}_32x32.mat") for p in ("train", "extra", "test")}
        return {f"{k}_{p}": a for p, xy in mats.items() for k, a in zip("xy", xy)}
    meta = folder / ("batches.meta" if name == "cifar10" else "meta")  # unused, but data too
    if meta.is_file() and not isinstance(load_data_pickle(meta), dict):
        raise DataError(f"CIFAR label file {meta} does not hold a dict; replace it with the "
                        "official file")
    parts = [_cifar_batch(folder / f, _LABEL_KEY[name], info.classes)
             for f in info.required]  # the training batches, then the test batch
    return {"x_train": np.concatenate([p[0] for p in parts[:-1]]),
            "y_train": np.concatenate([p[1] for p in parts[:-1]]),
            "x_test": parts[-1][0], "y_test": parts[-1][1]}

