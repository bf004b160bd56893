"""Datasets, preprocessing and the one batch sampler that both stacks draw from (SPEC §4-§6).

Three pieces, in the order a run uses them:

1. **Files** — :func:`ensure_downloaded` fetches the official archives listed in
   :data:`DATASETS` (CIFAR-10/100 from Krizhevsky's page, SVHN's cropped-digit ``.mat``
   files from Stanford), verifies their MD5 and extracts them; :func:`load_raw` reads the
   official on-disk formats into ``uint8`` arrays ``(N, 3, 32, 32)``; :func:`write_fake` and
   :func:`write_fake_archive` write small learnable stand-ins in the *same* formats, so that
   smoke runs and tests go through the real readers.
2. **Preprocessing** — :func:`prepare` turns one dataset into a :class:`Split` for a phase of
   the protocol (section 4, SPEC §5): ``"search"`` holds out a seeded validation subset of
   the training set, ``"final"`` trains on all of it and evaluates on the test set.

   * CIFAR (section 4.2: "convert each pixel to the range [0,1] and subtract all images by
     the mean pixel value of the training set"): ``x / 255 - m`` where ``m`` is the
     per-channel mean pixel, shape ``(3,)``, of the training split actually used (the 90 % in
     the search run, all 50,000 images in the final run), so the held-out images never leak
     into the statistics.
   * SVHN (section 4.2): ``train`` + ``extra`` (604,388 images) for training, ``x / 255`` then
     global contrast normalisation per image (:func:`global_contrast_normalize`); the search
     run validates on 5,000 images drawn (seeded) from train + extra.
3. **Batches** — :class:`BatchSampler` draws every random choice of an epoch (order, crop
   offsets, flips) from ``np.random.default_rng([seed, epoch])`` in :meth:`BatchSampler.plan`
   and applies it with one vectorised gather per batch: zero padding by ``pad`` pixels
   (after normalisation, so padding is the mean image in CIFAR and 0 after GCN in SVHN) and a
   32 × 32 crop at ``(dy, dx)``, mirrored when planned. A seed therefore means the same
   batches in both stacks, across a resumed run, and on a GPU that applies the plan itself.

Memory: the float32 arrays are built chunk by chunk straight into their final buffers (never
a float64 copy of a whole set, never a copy of the joined train + extra). CIFAR needs about
0.7 GB. SVHN's final run holds 604,388 × 3 × 32 × 32 float32 = 7.4 GB of training images,
plus 1.9 GB of ``uint8`` originals while they are converted (peak about 10 GB; measured
1.7x the float32 result at 42k fake images, where the fixed overheads weigh more); the
originals are released when :func:`prepare` returns. Machines with less than ~12 GB of RAM
cannot prepare SVHN in float32.

Run ``python -m crmn.data bench`` for the sampler's throughput, ``python -m crmn.data
download NAME`` to fetch a dataset, ``python -m crmn.data fake NAME DIR`` to write fake data.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import http.client
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from tqdm import tqdm

from crmn.errors import ConfigError, DataError
from crmn.paper import DATASET_CLASSES

PathLike = Union[str, Path]

#: Environment variable naming a base URL that replaces every dataset's official one
#: (the mirror serves each archive under its official file name).
MIRROR_ENV = "CRMN_DATA_MIRROR"
#: Images in the SVHN validation set of the search run (section 4.2: "a random sub-set of
#: a total of 5000 images from the training and extra sets").
SVHN_VAL_IMAGES = 5000
#: Floor of the per-image standard deviation in global contrast normalisation, in [0, 1]
#: pixel units: below 1/100 an image is flat and dividing would only amplify its noise.
GCN_MIN_STD = 1e-2
#: Images converted to float32 at a time by :func:`prepare` (bounds the temporaries).
_CHUNK = 4096
#: Network failures are retried this many times in all, waiting _RETRY_WAIT_S × attempt.
_ATTEMPTS = 3
_RETRY_WAIT_S = 2.0
#: Marker that :func:`write_fake` leaves in a folder of fake data.
FAKE_MARKER = "FAKE_DATA.txt"


@dataclass(frozen=True)
class DatasetInfo:
    """Where a dataset comes from and what its extracted folder must contain."""

    name: str  # "cifar10" | "cifar100" | "svhn"
    base_url: str  # official location; each archive is base_url + file name
    archives: Tuple[Tuple[str, str], ...]  # (file name, published MD5) per download
    folder: str  # folder under data_dir holding the usable files
    required: Tuple[str, ...]  # files that folder must contain
    extract: bool  # True: archives are .tar.gz beside the folder; False: they are the files

    @property
    def classes(self) -> int:
        return DATASET_CLASSES[self.name]


#: The official sources. MD5s: CIFAR from https://www.cs.toronto.edu/~kriz/cifar.html (as
#: published there); SVHN's page publishes none, so these are the widely used checksums of
#: the files that http://ufldl.stanford.edu/housenumbers/ serves (the ones torchvision checks).
DATASETS: Dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        name="cifar10",
        base_url="https://www.cs.toronto.edu/~kriz/",
        archives=(("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        folder="cifar-10-batches-py",
        required=tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
        extract=True,
    ),
    "cifar100": DatasetInfo(
        name="cifar100",
        base_url="https://www.cs.toronto.edu/~kriz/",
        archives=(("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),),
        folder="cifar-100-python",
        required=("train", "test"),
        extract=True,
    ),
    "svhn": DatasetInfo(
        name="svhn",
        base_url="http://ufldl.stanford.edu/housenumbers/",
        archives=(("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
                  ("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
                  ("extra_32x32.mat", "a93ce644f1a588dc4d68dda5feec44a7")),
        folder="svhn",
        required=("train_32x32.mat", "test_32x32.mat", "extra_32x32.mat"),
        extract=False,
    ),
}


class Split(NamedTuple):
    """Normalised arrays of one phase of the protocol (SPEC §5)."""

    train_x: np.ndarray  # float32 (N, 3, 32, 32), normalised
    train_y: np.ndarray  # int64 (N,), class indices
    eval_x: np.ndarray  # float32 (M, 3, 32, 32), normalised like train_x
    eval_y: np.ndarray  # int64 (M,)
    eval_name: str  # "val" (search phase) or "test" (final phase)


def dataset_info(name: str) -> DatasetInfo:
    """The :data:`DATASETS` entry of ``name``; an unknown name is a :class:`ConfigError`."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; expected one of "
                          f"{', '.join(sorted(DATASETS))}") from None


# --------------------------------------------------------------------------------------------
# Download, verification, extraction

def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _missing(folder: Path, info: DatasetInfo) -> List[str]:
    return [f for f in info.required if not (folder / f).is_file()]


def _ensure_writable(data_dir: Path) -> None:
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} is a file, not a directory")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=data_dir):
            pass
    except OSError as e:
        raise DataError(f"data directory {data_dir} is not writable: "
                        f"{e.strerror or e}") from None


def _download(url: str, target: Path, md5: str, progress: bool, timeout: float) -> None:
    """Stream ``url`` into ``<target>.part``, check its length and MD5, then rename it.

    A failed check removes the ``.part`` file and never touches ``target``; only network
    failures (refused, reset, cut short) are retried.
    """
    part = target.with_name(target.name + ".part")
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            _fetch(url, part, progress, timeout)
            break
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                TimeoutError) as e:
            part.unlink(missing_ok=True)
            if isinstance(e, urllib.error.HTTPError) or attempt == _ATTEMPTS:
                reason = getattr(e, "reason", None) or e
                raise DataError(f"cannot download {url} to {target}: {reason} "
                                f"(after {attempt} attempt(s))") from None
            time.sleep(_RETRY_WAIT_S * attempt)
        except OSError as e:  # the local side: disk full, permissions
            part.unlink(missing_ok=True)
            raise DataError(f"cannot write {part}: {e.strerror or e}") from None
    got = _md5(part)
    if got != md5:
        part.unlink(missing_ok=True)
        raise DataError(f"checksum mismatch for {target} downloaded from {url}: MD5 {got}, "
                        f"expected {md5}; removed the partial file {part}")
    os.replace(part, target)


def _fetch(url: str, part: Path, progress: bool, timeout: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        total = resp.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        got = 0
        with open(part, "wb") as f, tqdm(total=total, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=part.name[:-5],
                                         disable=not progress, file=sys.stderr) as bar:
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                f.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
        if total is not None and got != total:
            raise http.client.IncompleteRead(b"", total - got)


def _safe_extractall(tar: tarfile.TarFile, dest: Path, archive: Path) -> None:
    """Extract refusing members that would land outside ``dest`` (absolute, ``..``, links)."""
    if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: the standard check
        try:
            tar.extractall(dest, filter="data")
        except tarfile.FilterError as e:
            raise DataError(f"unsafe member in archive {archive}: {e}") from None
        return
    for m in tar.getmembers():
        p = Path(m.name)
        if p.is_absolute() or ".." in p.parts or m.issym() or m.islnk() or m.isdev():
            raise DataError(f"unsafe member {m.name!r} in archive {archive}")
    tar.extractall(dest)


def _extract(archive: Path, data_dir: Path, info: DatasetInfo) -> None:
    """Unpack ``archive`` into a scratch folder, then move its files into ``info.folder``.

    Extraction never writes into the final folder until the whole archive has been read, so
    an interrupted or corrupt extraction leaves no half-filled folder that looks complete.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".extract-{info.folder}-", dir=data_dir))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                _safe_extractall(tar, tmp, archive)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise DataError(f"corrupt or truncated archive {archive}: {e}") from None
        src = tmp / info.folder
        missing = _missing(src, info)
        if missing:
            raise DataError(f"archive {archive} lacks {', '.join(missing)} under "
                            f"{info.folder}/ after extraction")
        dest = data_dir / info.folder
        dest.mkdir(exist_ok=True)
        for item in src.iterdir():
            os.replace(item, dest / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_downloaded(name: str, data_dir: PathLike, progress: bool = True,
                      mirror: Optional[str] = None, timeout: float = 60.0) -> Path:
    """Make sure the files of dataset ``name`` are in ``data_dir``; return their folder.

    Parameters
    ----------
    name : "cifar10" | "cifar100" | "svhn"
    data_dir : folder holding archives and extracted folders (created if missing)
    progress : show a tqdm progress bar per download (on stderr)
    mirror : base URL replacing the official one (default: ``$CRMN_DATA_MIRROR`` if set);
        each archive is fetched from ``mirror/<file name>``
    timeout : seconds a connection may stay silent

    Returns
    -------
    Path
        ``data_dir/cifar-10-batches-py``, ``data_dir/cifar-100-python`` or ``data_dir/svhn``.

    Notes
    -----
    A complete folder is used as it is (nothing is downloaded or hashed). A download goes to
    ``<file>.part`` and is renamed to ``<file>`` only after its MD5 matches, so a file at its
    final name is a verified one: it is never downloaded again and never deleted. A CIFAR
    archive found on disk is hashed before extraction; a mismatch stops with a
    :class:`DataError` and leaves the file alone. Runs sharing ``data_dir`` take turns
    (:func:`_download_lock`): one downloads, the others wait and then use its files.
    """
    info = dataset_info(name)
    data_dir = Path(data_dir)
    folder = data_dir / info.folder
    if data_dir.is_dir() and not _missing(folder, info):
        return folder
    _ensure_writable(data_dir)
    with _download_lock(data_dir, info, progress):
        if not _missing(folder, info):  # another process finished it while we waited
            return folder
        return _download_and_extract(info, data_dir, folder, mirror, progress, timeout)


@contextlib.contextmanager
def _download_lock(data_dir: Path, info: DatasetInfo, progress: bool):
    """Hold ``data_dir/.<name>.lock`` so that two runs never write the same ``.part`` file.

    A second run (another seed or row started beside the first) waits here, then finds the
    dataset complete. The lock is ``flock``'s: the system drops it when its holder dies.
    """
    path = data_dir / f".{info.name}.lock"
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"waiting for another process to finish downloading {info.name} into "
                      f"{data_dir} (lock {path})", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_and_extract(info: DatasetInfo, data_dir: Path, folder: Path,
                          mirror: Optional[str], progress: bool, timeout: float) -> Path:
    base = mirror or os.environ.get(MIRROR_ENV) or info.base_url
    for fname, md5 in info.archives:
        target = (data_dir if info.extract else folder) / fname
        if target.is_file():
            if info.extract and _md5(target) != md5:
                raise DataError(f"archive {target} fails its MD5 check (expected {md5}); "
                                f"delete it to download it again")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        _download(f"{base.rstrip('/')}/{fname}", target, md5, progress, timeout)
    if info.extract:
        _extract(data_dir / info.archives[0][0], data_dir, info)
    missing = _missing(folder, info)
    if missing:  # only reachable if someone removes files while we run
        raise DataError(f"{folder} lacks {', '.join(missing)} after download")
    return folder


# --------------------------------------------------------------------------------------------
# Reading the official formats

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


def load_raw(name: str, data_dir: PathLike) -> Dict[str, np.ndarray]:
    """Read the extracted official files of ``name`` from ``data_dir``.

    Returns
    -------
    dict
        ``x_train`` uint8 (N, 3, 32, 32), ``y_train`` int64 (N,), ``x_test``, ``y_test``;
        for SVHN also ``x_extra``, ``y_extra``. CIFAR-100 uses the 100 fine labels; SVHN's
        label 10 becomes the digit 0.
    """
    info = dataset_info(name)
    folder = Path(data_dir) / info.folder
    if name == "svhn":
        out = {}
        for part in ("train", "extra", "test"):
            out[f"x_{part}"], out[f"y_{part}"] = _svhn_mat(folder / f"{part}_32x32.mat")
        return out
    if name == "cifar10":
        parts = [_cifar_batch(folder / f"data_batch_{i}", b"labels", 10) for i in range(1, 6)]
        x_test, y_test = _cifar_batch(folder / "test_batch", b"labels", 10)
        x_train = np.concatenate([p[0] for p in parts])
        y_train = np.concatenate([p[1] for p in parts])
    else:
        x_train, y_train = _cifar_batch(folder / "train", b"fine_labels", 100)
        x_test, y_test = _cifar_batch(folder / "test", b"fine_labels", 100)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def is_fake(name: str, data_dir: PathLike) -> bool:
    """True when ``data_dir`` holds data written by :func:`write_fake` for ``name``."""
    return (Path(data_dir) / dataset_info(name).folder / FAKE_MARKER).is_file()


# --------------------------------------------------------------------------------------------
# Preprocessing

def global_contrast_normalize(x: np.ndarray) -> np.ndarray:
    """Per-image global contrast normalisation (section 4.2, SVHN; Goodfellow et al. 2013).

    Parameters
    ----------
    x : float32 (B, C, H, W), pixels in [0, 1]

    Returns
    -------
    float32 (B, C, H, W): each image minus its mean over all C·H·W values, divided by its
    standard deviation over them, floored at :data:`GCN_MIN_STD`.
    """
    mean = x.mean(axis=(1, 2, 3), keepdims=True, dtype=np.float64)
    std = x.std(axis=(1, 2, 3), keepdims=True, dtype=np.float64)
    scale = 1.0 / np.maximum(std, GCN_MIN_STD)
    return ((x - mean) * scale).astype(np.float32)


def _take(parts: Sequence[np.ndarray], idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of the concatenation of ``parts`` without building the concatenation."""
    out = np.empty((len(idx),) + parts[0].shape[1:], dtype=parts[0].dtype)
    start = 0
    for p in parts:
        sel = (idx >= start) & (idx < start + len(p))
        out[sel] = p[idx[sel] - start]
        start += len(p)
    return out


def _build(parts: Sequence[np.ndarray], idx: np.ndarray, fn) -> np.ndarray:
    """float32 ``fn(uint8 images)`` for rows ``idx``, converted chunk by chunk in place."""
    out = np.empty((len(idx),) + parts[0].shape[1:], dtype=np.float32)
    for s in range(0, len(idx), _CHUNK):
        out[s:s + _CHUNK] = fn(_take(parts, idx[s:s + _CHUNK]))
    return out


_SPLIT_KEY = 0x53504C54  # "SPLT": keys the split's random stream apart from the sampler's


def split_indices(n: int, n_val: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded disjoint (train, val) index sets of ``range(n)``, each sorted (search phase).

    ``val`` has ``n_val`` indices; :func:`prepare` uses these, in this order, to pick the
    rows of the joined training set (SVHN: train then extra).

    The stream is keyed ``[_SPLIT_KEY, seed]``: ``default_rng(seed)`` would equal the
    sampler's ``default_rng([seed, 0])`` (NumPy's SeedSequence ignores trailing zeros), and
    the split must not share random numbers with epoch 0's batch order.
    """
    perm = np.random.default_rng([_SPLIT_KEY, seed]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])



def prepare(name: str, data_dir: PathLike, phase: str, seed: int, val_fraction: float = 0.1,
            download: bool = True, progress: bool = True) -> Split:
    """Normalised training and evaluation arrays of one phase of the protocol (SPEC §5).

    Parameters
    ----------
    name : "cifar10" | "cifar100" | "svhn"
    data_dir : folder with the dataset (see :func:`ensure_downloaded`)
    phase : "search" — train on a seeded ``1 - val_fraction`` share of the training set,
        evaluate on the rest ("val"); SVHN holds out ``min(5000, val_fraction · N)`` images
        of train + extra (5,000 on the real data, section 4.2). "final" — train on the whole
        training set, evaluate on the test set ("test").
    seed : selects the held-out images (same seed, same split)
    val_fraction : held-out share in the search phase, in (0, 1)
    download : fetch missing files first; False makes missing files a :class:`DataError`
    progress : progress bars while downloading

    Returns
    -------
    Split
        ``train_x`` float32 (N, 3, 32, 32), ``train_y`` int64 (N,), ``eval_x``, ``eval_y``,
        ``eval_name``. CIFAR: ``x/255`` minus the per-channel mean pixel of ``train_x``'s
        images; SVHN: ``x/255`` with per-image global contrast normalisation.
    """
    info = dataset_info(name)
    if phase not in ("search", "final"):
        raise ConfigError(f"unknown phase {phase!r}; expected 'search' or 'final'")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if download:
        ensure_downloaded(name, data_dir, progress=progress)
    raw = load_raw(name, data_dir)
    train_parts = [raw.pop("x_train")] + ([raw.pop("x_extra")] if name == "svhn" else [])
    train_labels = np.concatenate([raw["y_train"]] + ([raw["y_extra"]] if name == "svhn"
                                                      else []))
    n = len(train_labels)
    if phase == "search":
        n_val = int(round(val_fraction * n))
        if name == "svhn":
            n_val = min(SVHN_VAL_IMAGES, n_val)
        if n_val < 1 or n_val >= n:
            raise DataError(f"{Path(data_dir) / info.folder}: {n} training images cannot "
                            f"be split with val_fraction {val_fraction}")
        train_idx, eval_idx = split_indices(n, n_val, seed)
        eval_parts, eval_labels, eval_name = train_parts, train_labels, "val"
    else:
        train_idx = np.arange(n)
        eval_idx = np.arange(len(raw["y_test"]))
        eval_parts, eval_labels, eval_name = [raw.pop("x_test")], raw["y_test"], "test"

    if name == "svhn":
        def fn(u):
            return global_contrast_normalize(u.astype(np.float32) * np.float32(1 / 255))
    else:
        # mean pixel of the training images used, accumulated in float64 (section 4.2)
        total = np.zeros(3, dtype=np.float64)
        for s in range(0, len(train_idx), _CHUNK):
            total += _take(train_parts, train_idx[s:s + _CHUNK]).sum(axis=(0, 2, 3),
                                                                     dtype=np.float64)
        mean = (total / (len(train_idx) * 32 * 32 * 255.0)).astype(np.float32)
        mean = mean.reshape(1, 3, 1, 1)

        def fn(u):
            return u.astype(np.float32) * np.float32(1 / 255) - mean

    train_x = _build(train_parts, train_idx, fn)
    eval_x = _build(eval_parts, eval_idx, fn)
    return Split(train_x, train_labels[train_idx], eval_x, eval_labels[eval_idx], eval_name)


# --------------------------------------------------------------------------------------------
# Fake data in the official formats

def _fake_images(classes: int, counts: Sequence[int], seed: int):
    """Learnable random images: a colour and a coarse 4x4 pattern per class, plus noise.

    Returns one ``(uint8 (n, 3, 32, 32), int64 (n,))`` pair per entry of ``counts``, all
    drawn around the same class templates (so a model trained on the first generalises).
    """
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


def write_fake(name: str, data_dir: PathLike, n_train: int, n_test: int,
               seed: int = 0) -> Path:
    """Write small fake data in the extracted official format of ``name``; return the folder.

    CIFAR-10: ``data_batch_1..5`` (``n_train`` images shared out), ``test_batch``,
    ``batches.meta``; CIFAR-100: ``train``, ``test``, ``meta`` with fine and coarse labels;
    SVHN: ``train_32x32.mat`` and ``extra_32x32.mat`` (``n_train`` images between them, so
    train + extra has ``n_train``) and ``test_32x32.mat``, digit 0 stored as 10. A
    ``FAKE_DATA.txt`` marker (:func:`is_fake`) tells fake folders from real ones.
    """
    info = dataset_info(name)
    if n_train < 1 or n_test < 1:
        raise ConfigError(f"fake data needs n_train, n_test >= 1, got {n_train}, {n_test}")
    folder = Path(data_dir) / info.folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {folder}: {e.strerror or e}") from None
    if name == "svhn":
        import scipy.io

        n_extra = n_train // 2
        sets = _fake_images(10, [n_train - n_extra, n_extra, n_test], seed)
        for part, (x, y) in zip(("train", "extra", "test"), sets):
            scipy.io.savemat(str(folder / f"{part}_32x32.mat"), {
                "X": np.ascontiguousarray(x.transpose(2, 3, 1, 0)),  # (32, 32, 3, N)
                "y": np.where(y == 0, 10, y).astype(np.uint8).reshape(-1, 1)})
    elif name == "cifar10":
        (x, y), (xt, yt) = _fake_images(10, [n_train, n_test], seed)
        for i, (xs, ys) in enumerate(zip(np.array_split(x, 5), np.array_split(y, 5)), 1):
            _write_pickle(folder / f"data_batch_{i}", {
                b"batch_label": f"training batch {i} of 5".encode(),
                b"labels": ys.tolist(), b"data": xs.reshape(len(xs), 3072),
                b"filenames": [f"fake_{i}_{j}.png".encode() for j in range(len(xs))]})
        _write_pickle(folder / "test_batch", {
            b"batch_label": b"testing batch 1 of 1", b"labels": yt.tolist(),
            b"data": xt.reshape(len(xt), 3072),
            b"filenames": [f"fake_test_{j}.png".encode() for j in range(len(xt))]})
        _write_pickle(folder / "batches.meta", {
            b"label_names": [f"class{c}".encode() for c in range(10)],
            b"num_cases_per_batch": int(np.ceil(n_train / 5)), b"num_vis": 3072})
    else:
        (x, y), (xt, yt) = _fake_images(100, [n_train, n_test], seed)
        for fname, xs, ys in (("train", x, y), ("test", xt, yt)):
            _write_pickle(folder / fname, {
                b"batch_label": f"{fname}ing batch 1 of 1".encode(),
                b"fine_labels": ys.tolist(), b"coarse_labels": (ys // 5).tolist(),
                b"data": xs.reshape(len(xs), 3072),
                b"filenames": [f"fake_{fname}_{j}.png".encode() for j in range(len(xs))]})
        _write_pickle(folder / "meta", {
            b"fine_label_names": [f"fine{c}".encode() for c in range(100)],
            b"coarse_label_names": [f"coarse{c}".encode() for c in range(20)]})
    (folder / FAKE_MARKER).write_text(
        f"Fake {name} data written by crmn.data.write_fake (n_train={n_train}, "
        f"n_test={n_test}, seed={seed}); not the real dataset.\n")
    return folder


def write_fake_archive(name: str, out_dir: PathLike, n_train: int, n_test: int,
                       seed: int = 0) -> Dict[str, Path]:
    """Fake data packed as the official downloads of ``name``, for download tests.

    Returns ``{file name: path}`` for each entry of ``DATASETS[name].archives``: a
    ``.tar.gz`` holding ``<folder>/...`` for CIFAR, the three ``.mat`` files for SVHN.
    """
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


# --------------------------------------------------------------------------------------------
# Batches

class EpochPlan(NamedTuple):
    """Every random choice of one epoch; entry ``j`` belongs to the image ``order[j]``.

    Batch ``i`` is positions ``i·B .. (i+1)·B - 1`` (B the batch size); positions past the
    last full batch are drawn but unused, so the plan does not depend on B. Position ``j``
    yields ``P[:, dy[j]:dy[j]+H, dx[j]:dx[j]+W]`` of ``P = x[order[j]]`` zero-padded by
    ``pad`` on each side, columns reversed when ``flip[j]``: a GPU port applies exactly
    this (e.g. with one batched gather over device-resident images) to get the same batches.
    """

    epoch: int
    order: np.ndarray  # int64 (N,): a permutation of the training images
    dy: np.ndarray  # int64 (N,): crop row offset in the padded image, 0..2·pad
    dx: np.ndarray  # int64 (N,): crop column offset, 0..2·pad
    flip: np.ndarray  # bool (N,): mirror left-right (all False unless flips are on)


class BatchSampler:
    """Shuffled, padded-and-cropped training batches, deterministic in (seed, epoch).

    Parameters
    ----------
    x : float32 (N, C, H, W), normalised images (padding adds zeros *after* normalisation)
    y : int64 (N,)
    batch_size : images per batch; the last incomplete batch of an epoch is dropped
    seed : with the epoch number, keys ``np.random.default_rng([seed, epoch])``
    pad : zero padding per side before the random H × W crop (SPEC §4: 4)
    flip : random horizontal flips with probability 1/2 (off in the paper)
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int,
                 pad: int = 4, flip: bool = False):
        if x.ndim != 4 or x.dtype != np.float32:
            raise ValueError(f"x must be float32 (N, C, H, W), got {x.dtype}{x.shape}")
        if y.shape != (len(x),):
            raise ValueError(f"y must have shape ({len(x)},), got {y.shape}")
        if batch_size < 1 or batch_size > len(x):
            raise ConfigError(f"batch size {batch_size} does not fit {len(x)} training "
                              f"images")
        if pad < 0:
            raise ConfigError(f"crop padding must be >= 0, got {pad}")
        self.x, self.y = x, np.asarray(y, dtype=np.int64)
        self.batch_size, self.seed, self.pad, self.flip = batch_size, seed, pad, flip

    def __len__(self) -> int:
        """Full batches per epoch."""
        return len(self.x) // self.batch_size

    def plan(self, epoch: int) -> EpochPlan:
        """The order, crops and flips of ``epoch``, drawn from ``default_rng([seed, epoch])``.

        The draws happen in a fixed sequence (order, dy, dx, flip) and flips are drawn even
        when off, so turning flips on changes no order or crop.
        """
        rng = np.random.default_rng([self.seed, epoch])
        n, span = len(self.x), 2 * self.pad + 1
        order = rng.permutation(n).astype(np.int64)
        dy = rng.integers(0, span, size=n, dtype=np.int64)
        dx = rng.integers(0, span, size=n, dtype=np.int64)
        flip = (rng.random(n) < 0.5) & self.flip
        return EpochPlan(epoch, order, dy, dx, flip)

    def batch(self, plan: EpochPlan, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """Batch ``i`` of ``plan``: ``(xb float32 (B, C, H, W), yb int64 (B,))``.

        The batch is copied into a zero-padded buffer ``(B, C, H+2p, W+2p)``; a strided view
        of all its ``H x W`` windows, ``(B, C, 2p+1, 2p+1, H, W)``, is then indexed once with
        ``(b, dy_b, dx_b)``, which copies each image's window in one gather (4-5x faster than
        computing a flat index per pixel); planned flips reverse the columns of their images.
        """
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} outside 0..{len(self) - 1}")
        b, p = self.batch_size, self.pad
        sl = slice(i * b, (i + 1) * b)
        idx = plan.order[sl]
        _, c, h, w = self.x.shape
        padded = np.zeros((b, c, h + 2 * p, w + 2 * p), dtype=np.float32)
        padded[:, :, p:p + h, p:p + w] = self.x[idx]
        windows = sliding_window_view(padded, (h, w), axis=(2, 3))  # (B, c, 2p+1, 2p+1, h, w)
        # advanced indices on axes 0, 2, 3 around a slice: the result is (B, c, h, w)
        xb = windows[np.arange(b), :, plan.dy[sl], plan.dx[sl]]
        flip = plan.flip[sl]
        if flip.any():
            xb[flip] = xb[flip, :, :, ::-1]
        return xb, self.y[idx]

    def epoch(self, epoch: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """The ``len(self)`` batches of ``epoch`` in order (see :meth:`plan`)."""
        plan = self.plan(epoch)
        for i in range(len(self)):
            yield self.batch(plan, i)


def iterate_eval(x: np.ndarray, y: np.ndarray,
                 batch_size: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """In-order, un-augmented batches ``(x[s:s+B], y[s:s+B])``, the last one partial."""
    if batch_size < 1:
        raise ConfigError(f"evaluation batch size must be >= 1, got {batch_size}")
    for s in range(0, len(x), batch_size):
        yield x[s:s + batch_size], y[s:s + batch_size]


# --------------------------------------------------------------------------------------------
# Command line: benchmark, download, fake data

def bench(n: int = 10000, batch_size: int = 100, epochs: int = 2, seed: int = 0) -> None:
    """Print the sampler's images/s on CIFAR-shaped float32 data, with and without flips."""
    x = np.random.default_rng(seed).standard_normal((n, 3, 32, 32), dtype=np.float32)
    y = np.zeros(n, dtype=np.int64)
    print(f"BatchSampler on {n} CIFAR-shaped images, batch {batch_size}, pad 4, "
          f"{epochs} epoch(s), numpy {np.__version__}")
    for flip in (False, True):
        s = BatchSampler(x, y, batch_size, seed, pad=4, flip=flip)
        t0 = time.perf_counter()
        images = 0
        for e in range(epochs):
            for xb, _ in s.epoch(e):
                images += len(xb)
        dt = time.perf_counter() - t0
        print(f"  flip={str(flip):5s}: {images / dt:10.0f} images/s "
              f"({1e3 * dt / (epochs * len(s)):.2f} ms per batch)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m crmn.data", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="sampler throughput on CIFAR-shaped data")
    b.add_argument("--n", type=int, default=10000, help="images (default 10000)")
    b.add_argument("--batch-size", type=int, default=100, help="batch size (default 100)")
    b.add_argument("--epochs", type=int, default=2, help="epochs timed (default 2)")
    d = sub.add_parser("download", help="download and verify a dataset")
    d.add_argument("name", choices=sorted(DATASETS))
    d.add_argument("--data-dir", default="data", help="default: data")
    f = sub.add_parser("fake", help="write fake data in the official format")
    f.add_argument("name", choices=sorted(DATASETS))
    f.add_argument("data_dir")
    f.add_argument("--n-train", type=int, default=1000, help="default 1000")
    f.add_argument("--n-test", type=int, default=200, help="default 200")
    f.add_argument("--seed", type=int, default=0, help="default 0")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "bench":
            bench(args.n, args.batch_size, args.epochs)
        elif args.cmd == "download":
            print(ensure_downloaded(args.name, args.data_dir))
        else:
            print(write_fake(args.name, args.data_dir, args.n_train, args.n_test, args.seed))
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
