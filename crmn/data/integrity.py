"""Is a dataset folder the official one? A folder found on disk is checked file by file: each
official file's MD5 from its raw bytes before anything parses it (and, where it differs, its
image count, to name a truncated file). A passed check leaves a stamp (:data:`STAMP`: size,
mtime, expected MD5 per file), trusted while they match: it guards against accidents, not
forgery. ``--unverified-data`` uses a differing folder as it is."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

from crmn.data import images
from crmn.data.fake import FAKE_MARKER
from crmn.data.formats import count_images
from crmn.data.sources import (DatasetInfo, PathLike, _md5, by_hand, dataset_info, fetch,
                               locate, looked_in)
from crmn.errors import DataError
from crmn.runlog import replace_file

STAMP = ".crmn-verified.json"
UNVERIFIED_FLAG = "--unverified-data"
#: (resolved folder, signature) pairs checked by this process, for folders without a stamp.
_checked: Set[Tuple[str, str]] = set()


def ensure_downloaded(name: str, data_dir: PathLike, progress: bool = True,
                      mirror: Optional[str] = None, timeout: float = 60.0,
                      unverified: bool = False) -> Path:
    """The folder of dataset ``name``: found on disk and checked, or downloaded and stamped."""
    info = dataset_info(name)
    data_dir = Path(data_dir)
    folder = locate(name, data_dir)
    if folder is None:
        folder = fetch(info, data_dir, mirror, progress, timeout)
        if not (folder / FAKE_MARKER).is_file():
            _mark_checked(folder, info)  # every file came from an archive whose MD5 matched
    _provenance_of(info, folder, unverified)
    return folder


def provenance(name: str, data_dir: PathLike, unverified: bool = False) -> str:
    """``"official"``, ``"fake"`` or ``"unverified"``: where the data come from (no download)."""
    info = dataset_info(name)
    if images.source(data_dir) is not None:
        return "unverified"  # decoded images are never the official bytes
    folder = locate(name, data_dir)
    if folder is None:
        raise DataError(f"no {name} data: looked in {looked_in(info, Path(data_dir))}; let "
                        f"it download, or {by_hand(info, Path(data_dir))}")
    return _provenance_of(info, folder, unverified)


def fingerprint(name: str, data_dir: PathLike) -> Optional[str]:
    """What identifies the data, wherever they lie (``--resume`` compares it, not the path):
    an image source's cache key, else a digest of the official files' MD5s (a checked
    folder's are the official table's); None where there are no data yet."""
    src = images.source(data_dir)
    if src is not None:
        return f"images:{images.key(name, src)}"
    info = dataset_info(name)
    folder = locate(name, data_dir)
    if folder is None:
        return None
    sums = info.files if _is_checked(folder, info) else \
        [(f, _md5(folder / f)) for f, _ in info.files if (folder / f).is_file()]
    return "md5:" + hashlib.sha256(json.dumps([list(s) for s in sums]).encode()).hexdigest()


def _provenance_of(info: DatasetInfo, folder: Path, unverified: bool) -> str:
    if (folder / FAKE_MARKER).is_file():
        return "fake"
    if unverified and not _is_checked(folder, info):
        return "unverified"
    verify_folder(info.name, folder)  # at once when stamped
    return "official"


def verify_folder(name: str, folder: PathLike) -> None:
    """Check an extracted folder against the official files of ``name`` and stamp it."""
    info = dataset_info(name)
    folder = Path(folder)
    missing = [f for f, _ in info.files if not (folder / f).is_file()]
    if missing:
        names = ",".join(f for f, _ in info.files)
        raise DataError(f"{folder} is not the complete official {info.name} folder: it lacks "
                        f"{', '.join(missing)} (official files: {folder}/{{{names}}}); add "
                        f"them, or pass {UNVERIFIED_FLAG} to use the data as it is")
    if _is_checked(folder, info):
        return
    before = _signature(folder, info)
    for fname, official in info.files:  # every MD5 from the raw bytes, before any parsing
        got = _md5(folder / fname)
        if got != official:
            _explain_mismatch(info, folder, fname, got, official)
    if _signature(folder, info) == before:  # nothing changed while it was read
        _mark_checked(folder, info)


def _refusal(what: str) -> str:
    return (f"{what}; replace it with the official file, or pass {UNVERIFIED_FLAG} "
            "to use the data as it is")


def _explain_mismatch(info: DatasetInfo, folder: Path, fname: str, got: str, official: str):
    """Refuse ``fname``, whose MD5 differs: by its image count when that differs too."""
    count = dict(info.images).get(fname)
    if count is not None:
        n = count_images(info.name, folder / fname)
        if n != count:
            raise DataError(_refusal(f"{folder / fname} holds {n:,} images, the official "
                                     f"file {count:,} (truncated, or another dataset)"))
    raise DataError(_refusal(f"{folder / fname} has MD5 {got}, the official file {official} "
                             f"(same name, different bytes: re-packed or altered)"))


def _signature(folder: Path, info: DatasetInfo) -> Dict[str, List]:
    """``{file: [size, mtime_ns, expected MD5]}``; the expected MD5 ties it to the table."""
    stats = {fname: (folder / fname).stat() for fname, _ in info.files}
    return {f: [stats[f].st_size, stats[f].st_mtime_ns, md5] for f, md5 in info.files}


def _key(folder: Path, sig: Dict[str, List]) -> Tuple[str, str]:
    return str(folder.resolve()), json.dumps(sig, sort_keys=True)


def _is_checked(folder: Path, info: DatasetInfo) -> bool:
    try:
        sig = _signature(folder, info)
    except OSError:  # an official file is missing: not checked
        return False
    if _key(folder, sig) in _checked:
        return True
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp == {"dataset": info.name, "files": sig}


def _mark_checked(folder: Path, info: DatasetInfo) -> None:
    """Remember that ``folder`` is official: in this process, and in a stamp if writable."""
    try:
        sig = _signature(folder, info)
    except OSError:  # incomplete: :func:`verify_folder` will say what lacks
        return
    _checked.add(_key(folder, sig))
    try:  # atomically: a reader never sees half a stamp
        replace_file(folder / STAMP, json.dumps({"dataset": info.name, "files": sig}).encode())
    except OSError:  # a read-only folder or a full disk: this process remembers, the next
        pass  # one re-checks
