"""Where the datasets come from: descriptions, download with lock and retries, extraction.

:data:`DATASETS` describes each dataset once: the official base URL, the archives with their
published MD5s, the folder the archives unpack to and the files a run reads from it.
:func:`fetch` downloads what is missing into ``data_dir`` (from the official site, or from
the mirror named by ``$CRMN_DATA_MIRROR``), checks each archive's MD5 and unpacks it.

A download goes to ``<file>.part`` and is renamed to ``<file>`` only after its MD5 matches,
so a file at its final name is a verified one: it is never downloaded again and never
deleted. Runs sharing ``data_dir`` take turns (:func:`_download_lock`).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import os
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
from typing import Dict, List, Optional, Tuple, Union

from tqdm import tqdm

from crmn.errors import ConfigError, DataError
from crmn.paper import DATASET_CLASSES

PathLike = Union[str, Path]

#: Environment variable naming a base URL that replaces every dataset's official one
#: (the mirror serves each archive under its official file name).
MIRROR_ENV = "CRMN_DATA_MIRROR"
#: Network failures are retried this many times in all, waiting _RETRY_WAIT_S × attempt.
_ATTEMPTS = 3
_RETRY_WAIT_S = 2.0


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


def dataset_info(name: str) -> DatasetInfo:
    """The :data:`DATASETS` entry of ``name``; an unknown name is a :class:`ConfigError`."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; expected one of "
                          f"{', '.join(sorted(DATASETS))}") from None


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


# --------------------------------------------------------------------------------------------
# Download

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


# --------------------------------------------------------------------------------------------
# Extraction

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


# --------------------------------------------------------------------------------------------
# The whole fetch

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
    """
    info = dataset_info(name)
    data_dir = Path(data_dir)
    folder = data_dir / info.folder
    if data_dir.is_dir() and not _missing(folder, info):
        return folder
    return fetch(info, data_dir, mirror, progress, timeout)


def fetch(info: DatasetInfo, data_dir: Path, mirror: Optional[str], progress: bool,
          timeout: float) -> Path:
    """Download and unpack what ``data_dir`` lacks of ``info``; return the folder.

    Takes :func:`_download_lock` first: a run that waited finds the folder complete and
    downloads nothing.
    """
    folder = data_dir / info.folder
    _ensure_writable(data_dir)
    with _download_lock(data_dir, info, progress):
        if not _missing(folder, info):  # another process finished it while we waited
            return folder
        return _download_and_extract(info, data_dir, folder, mirror, progress, timeout)


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
