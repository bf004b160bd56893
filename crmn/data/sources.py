"""Where the datasets come from (:data:`DATASETS`), and their download and extraction.

A download goes to ``<file>.part`` and is renamed only after its MD5 matches, so a file at its
final name is never downloaded again nor deleted; runs sharing ``data_dir`` take turns.
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

#: a base URL (http, https or file) replacing every official one: ``<base URL>/<file name>``
MIRROR_ENV = "CRMN_DATA_MIRROR"
_ATTEMPTS = 3  # network tries in all, waiting _RETRY_WAIT_S × attempt between them
_RETRY_WAIT_S = 2.0


@dataclass(frozen=True)
class DatasetInfo:
    """Where a dataset comes from and what its extracted folder must contain."""

    name: str  # "cifar10" | "cifar100" | "svhn"
    base_url: str  # official location; each archive is base_url + file name
    archives: Tuple[Tuple[str, str], ...]  # (file name, published MD5) per download
    folder: str  # folder under data_dir holding the usable files
    extract: bool  # True: archives are .tar.gz beside the folder; False: they are the files
    files: Tuple[Tuple[str, str], ...]  # (file name, official MD5) of every extracted file
    images: Tuple[Tuple[str, int], ...]  # (file name, official image count) per data file

    @property
    def classes(self) -> int:
        return DATASET_CLASSES[self.name]

    @property
    def required(self) -> Tuple[str, ...]:
        """The data files a run reads, which the folder must contain."""
        return tuple(f for f, _ in self.images)


#: SVHN's downloads are its data files: one table serves as both.
_SVHN_FILES = (("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
               ("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
               ("extra_32x32.mat", "a93ce644f1a588dc4d68dda5feec44a7"))

#: CIFAR's archive MD5s are published on its page, SVHN's are the widely used ones; those of
#: the files inside the CIFAR archives are torchvision's; the counts are the published sizes.
DATASETS: Dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        name="cifar10", base_url="https://www.cs.toronto.edu/~kriz/",
        archives=(("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        folder="cifar-10-batches-py", extract=True,
        files=(("data_batch_1", "c99cafc152244af753f735de768cd75f"),
               ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
               ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
               ("data_batch_4", "634d18415352ddfa80567beed471001a"),
               ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
               ("test_batch", "40351d587109b95175f43aff81a1287e"),
               ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888")),
        images=(*((f"data_batch_{i}", 10000) for i in range(1, 6)), ("test_batch", 10000))),
    "cifar100": DatasetInfo(
        name="cifar100", base_url="https://www.cs.toronto.edu/~kriz/",
        archives=(("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),),
        folder="cifar-100-python", extract=True,
        files=(("train", "16019d7e3df5f24257cddd939b257f8d"),
               ("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),
               ("meta", "7973b15100ade9c7d40fb424638fde48")),
        images=(("train", 50000), ("test", 10000))),
    "svhn": DatasetInfo(
        name="svhn", base_url="http://ufldl.stanford.edu/housenumbers/", archives=_SVHN_FILES,
        folder="svhn", extract=False, files=_SVHN_FILES,
        images=(("train_32x32.mat", 73257), ("test_32x32.mat", 26032),
                ("extra_32x32.mat", 531131))),
}


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; expected one of "
                          f"{', '.join(sorted(DATASETS))}") from None


def _md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _missing(folder: Path, info: DatasetInfo) -> List[str]:
    return [f for f in info.required if not (folder / f).is_file()]


def locate(name: str, data_dir: PathLike) -> Optional[Path]:
    """The folder holding every file a run reads of ``name`` (presence only), or None."""
    info = dataset_info(name)
    for folder in (Path(data_dir) / info.folder, Path(data_dir)):  # or the folder itself
        if folder.is_dir() and not _missing(folder, info):
            return folder
    return None


def looked_in(info: DatasetInfo, data_dir: Path) -> str:
    """Every place :func:`locate` and :func:`fetch` look, with what each lacks (one line)."""
    parts = []
    for folder in (data_dir / info.folder, data_dir):
        missing = _missing(folder, info) if folder.is_dir() else None
        state = ("no such folder" if missing is None else
                 "has all files" if not missing else f"lacks {', '.join(missing)}")
        parts.append(f"{folder} ({state})")
    if info.extract:
        archive = data_dir / info.archives[0][0]
        parts.append(f"{archive} ({'present' if archive.is_file() else 'absent'})")
    return ", ".join(parts)


def by_hand(info: DatasetInfo, data_dir: Path) -> str:
    """How to supply ``info``'s files without a download (one clause naming the paths)."""
    files = f"{data_dir / info.folder}/{{{','.join(f for f, _ in info.files)}}}"
    put = (f"put the official archive at {data_dir / info.archives[0][0]} or its extracted "
           f"folder at {files}" if info.extract else f"put the official files at {files}")
    served = ", ".join(f for f, _ in info.archives)
    return (f"{put} (or give that folder as --data-dir), or set {MIRROR_ENV} to a base URL "
            f"(https://, http:// or file://) serving {served}")


def _kept(info: DatasetInfo, data_dir: Path) -> str:
    return (f"the file is kept: delete it to download it again, or {by_hand(info, data_dir)}")


def _ensure_writable(data_dir: Path) -> None:
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} is a file, not a directory; choose another "
                        "--data-dir")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=data_dir):
            pass
    except OSError as e:
        raise DataError(f"data directory {data_dir} is not writable: "
                        f"{e.strerror or e}; choose another --data-dir") from None


def _download(url: str, target: Path, md5: str, progress: bool, timeout: float,
              hint: str = "") -> None:
    """Stream ``url`` to ``<target>.part``, check its length and MD5, then rename it."""
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
                                f"(after {attempt} attempt(s)){hint}") from None
            time.sleep(_RETRY_WAIT_S * attempt)
        except OSError as e:  # the local side: disk full, permissions
            part.unlink(missing_ok=True)
            raise DataError(f"cannot write {part}: {e.strerror or e}") from None
    got = _md5(part)
    if got != md5:
        part.unlink(missing_ok=True)
        raise DataError(f"checksum mismatch for {target} downloaded from {url}: MD5 {got}, "
                        f"expected {md5}; removed the partial file {part}{hint}")
    os.replace(part, target)


def _fetch(url: str, part: Path, progress: bool, timeout: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        total = resp.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        with open(part, "wb") as f, tqdm(total=total, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=part.name[:-5],
                                         disable=not progress, file=sys.stderr) as bar:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                f.write(chunk)
                bar.update(len(chunk))
            if total is not None and f.tell() != total:
                raise http.client.IncompleteRead(b"", total - f.tell())


@contextlib.contextmanager
def _download_lock(data_dir: Path, info: DatasetInfo, progress: bool):
    """Hold ``data_dir/.<name>.lock`` (``flock``) so two runs never write the same file."""
    path = data_dir / f".{info.name}.lock"
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"waiting for another process to finish downloading {info.name} into "
                      f"{data_dir} (lock {path})", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file drops the lock


def _safe_extractall(tar: tarfile.TarFile, dest: Path, archive: Path, tail: str) -> None:
    """Extract refusing members that would land outside ``dest`` (absolute, ``..``, links)."""
    if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: the standard check
        try:
            tar.extractall(dest, filter="data")
        except tarfile.FilterError as e:
            raise DataError(f"unsafe member in archive {archive}: {e}; {tail}") from None
        return
    for m in tar.getmembers():
        p = Path(m.name)
        if p.is_absolute() or ".." in p.parts or m.issym() or m.islnk() or m.isdev():
            raise DataError(f"unsafe member {m.name!r} in archive {archive}; {tail}")
    tar.extractall(dest)


def _extract(archive: Path, data_dir: Path, info: DatasetInfo) -> None:
    """Unpack into a scratch folder, then move to ``info.folder``: a failure leaves it unfilled."""
    tail = _kept(info, data_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".extract-{info.folder}-", dir=data_dir))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                _safe_extractall(tar, tmp, archive, tail)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise DataError(f"corrupt or truncated archive {archive}: {e}; {tail}") from None
        src = tmp / info.folder
        missing = _missing(src, info)
        if missing:
            raise DataError(f"archive {archive} lacks {', '.join(missing)} under "
                            f"{info.folder}/ after extraction; {tail}")
        dest = data_dir / info.folder
        dest.mkdir(exist_ok=True)
        for item in src.iterdir():
            os.replace(item, dest / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch(info: DatasetInfo, data_dir: Path, mirror: Optional[str], progress: bool,
          timeout: float) -> Path:
    """Download and unpack what ``data_dir`` lacks of ``info`` (under the lock)."""
    folder = data_dir / info.folder
    own = _missing(data_dir, info) if data_dir.is_dir() else info.required
    if len(own) < len(info.required):
        raise DataError(f"{data_dir} holds part of the {info.name} files but lacks "
                        f"{', '.join(own)}: add them there, or give as --data-dir another "
                        f"folder to download into; nothing was written to {data_dir}")
    _ensure_writable(data_dir)
    with _download_lock(data_dir, info, progress):
        if _missing(folder, info):  # else another process finished it while we waited
            _download_and_extract(info, data_dir, folder, mirror, progress, timeout)
    return folder


def _download_and_extract(info: DatasetInfo, data_dir: Path, folder: Path,
                          mirror: Optional[str], progress: bool, timeout: float) -> None:
    """Download each missing archive, check those already there (never deleting them), extract."""
    env = os.environ.get(MIRROR_ENV) if not mirror else None
    base = mirror or env or info.base_url
    origin = f" (base URL from ${MIRROR_ENV})" if env else ""
    hint = (f"{origin}; looked in {looked_in(info, data_dir)}; to go on without the "
            f"download, {by_hand(info, data_dir)}")
    for fname, md5 in info.archives:
        target = (data_dir if info.extract else folder) / fname
        if target.is_file():
            got = _md5(target)
            if got != md5:
                what = "archive" if info.extract else "file"
                raise DataError(f"{what} {target} fails its MD5 check: got {got}, expected "
                                f"{md5} (a re-packed or partial copy is not the official "
                                f"{what}); {_kept(info, data_dir)}")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        _download(f"{base.rstrip('/')}/{fname}", target, md5, progress, timeout, hint)
    if info.extract:
        _extract(data_dir / info.archives[0][0], data_dir, info)
