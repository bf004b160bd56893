"""Is a dataset folder the official one? Data supplied by hand is checked like a download.

SPEC §8 and issue #14. A downloaded archive is checked by its published MD5 before it is
unpacked (:mod:`crmn.data.sources`). An extracted folder found on disk — put there by hand,
copied from another machine, or given directly as ``--data-dir`` — is checked file by file
(:func:`verify_folder`):

1. every official file is there (CIFAR-10: ``data_batch_1..5``, ``test_batch``,
   ``batches.meta``; CIFAR-100: ``train``, ``test``, ``meta``; SVHN: ``train_32x32.mat``,
   ``test_32x32.mat``, ``extra_32x32.mat``);
2. each file has its official MD5, computed from its raw bytes before anything parses it
   (a data file is a program only to a careless reader: see
   :func:`crmn.data.formats.load_data_pickle`);
3. only for a file whose MD5 differs, to say plainly what is wrong: its image count (CIFAR:
   50,000 training / 10,000 test; SVHN: 73,257 / 26,032 / 531,131), read with the same
   restricted reader as an unverified folder, names a truncated file; otherwise the MD5
   mismatch is reported (a re-packed or altered file that kept its name and size).

A mismatch stops with one line naming the file, what was expected and what was found —
unless the caller passes ``unverified=True`` (the command line's ``--unverified-data``):
then the folder is used as it is, unchecked, and :func:`provenance` reports it as
``"unverified"`` so that the run records it. Data written by :func:`crmn.data.write_fake`
is marked as such and reported as ``"fake"`` without checks.

Checking costs one read of every file (CIFAR: 0.2 GB, under a second; SVHN: 2.4 GB, a few
seconds). It is paid once: a successful check writes a stamp (:data:`STAMP`) into the
folder recording each file's size, modification time (ns) and the expected MD5; while they
all still match, the folder counts as checked. The stamp guards against accidents (a copy
cut short, a file replaced), not against someone forging modification times. A folder
that cannot be written to is re-checked once per process instead (:data:`_checked`).
"""
from __future__ import annotations

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

#: File written into a folder after it passed :func:`verify_folder`.
STAMP = ".crmn-verified.json"
#: The command-line flag that passes ``unverified=True`` (named in refusals).
UNVERIFIED_FLAG = "--unverified-data"
#: (resolved folder, signature) pairs checked by this process, for folders without a stamp.
_checked: Set[Tuple[str, str]] = set()


def ensure_downloaded(name: str, data_dir: PathLike, progress: bool = True,
                      mirror: Optional[str] = None, timeout: float = 60.0,
                      unverified: bool = False) -> Path:
    """Make sure the files of dataset ``name`` are at hand and checked; return their folder.

    Parameters
    ----------
    name : "cifar10" | "cifar100" | "svhn"
    data_dir : folder holding archives and extracted folders (created if a download is
        needed), or the extracted folder itself
    progress : show a tqdm progress bar per download (on stderr)
    mirror : base URL replacing the official one (default: ``$CRMN_DATA_MIRROR`` if set);
        each archive is fetched from ``mirror/<file name>``
    timeout : seconds a connection may stay silent
    unverified : use a folder found on disk even if it is not the official one (see
        :func:`provenance`)

    Returns
    -------
    Path
        ``data_dir/cifar-10-batches-py``, ``data_dir/cifar-100-python``, ``data_dir/svhn``,
        or ``data_dir`` itself when it is the extracted folder.

    Notes
    -----
    A folder found by :func:`crmn.data.locate` is checked (:func:`verify_folder`, cheap
    after the first time) and used; nothing is downloaded and no lock file is created.
    Otherwise :func:`crmn.data.sources.fetch` downloads what is missing into ``data_dir``:
    every archive's MD5 is checked before use, so the folder it unpacks is official by
    construction and is stamped as checked without hashing it again. A file at its final
    name is never deleted; runs sharing ``data_dir`` take turns downloading.
    """
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
    """Where the data of ``name`` in ``data_dir`` comes from, checking it if needed.

    Parameters
    ----------
    name : "cifar10" | "cifar100" | "svhn"
    data_dir : as for :func:`ensure_downloaded`; nothing is downloaded
    unverified : accept a folder that is not the official one, without checking it

    Returns
    -------
    str
        ``"official"``: the folder passed :func:`verify_folder` (now or before: a valid
        stamp); ``"fake"``: written by :func:`crmn.data.write_fake`; ``"unverified"``: not
        checked, because ``unverified`` is True and the folder carries no valid stamp.

    Raises
    ------
    DataError
        No folder holds the files (the message lists every place looked at), or the folder
        differs from the official files and ``unverified`` is False.
    """
    info = dataset_info(name)
    if images.source(data_dir) is not None:
        return "unverified"  # decoded images are never the official bytes
    folder = locate(name, data_dir)
    if folder is None:
        raise DataError(f"no {name} data: looked in {looked_in(info, Path(data_dir))}; let "
                        f"it download, or {by_hand(info, Path(data_dir))}")
    return _provenance_of(info, folder, unverified)


def _provenance_of(info: DatasetInfo, folder: Path, unverified: bool) -> str:
    if (folder / FAKE_MARKER).is_file():
        return "fake"
    if _is_checked(folder, info):
        return "official"
    if unverified:
        return "unverified"
    verify_folder(info.name, folder)
    return "official"


def verify_folder(name: str, folder: PathLike) -> None:
    """Check an extracted folder against the official files of ``name``; stamp it if good.

    Checks presence of every official file, then each file's MD5 before any file is parsed;
    a file whose MD5 differs is then counted, so that a truncated file is named as such. A
    valid stamp skips all of it.

    Raises
    ------
    DataError
        One line naming the first file that differs, with the expected and found values.
    """
    info = dataset_info(name)
    folder = Path(folder)
    _check_present(info, folder)
    if _is_checked(folder, info):
        return
    before = _signature(folder, info)
    _check_md5s(info, folder)
    if _signature(folder, info) == before:  # nothing changed while it was read
        _mark_checked(folder, info)


def _refusal(what: str) -> str:
    return (f"{what}; replace it with the official file, or pass {UNVERIFIED_FLAG} "
            "to use the data as it is")


def _check_present(info: DatasetInfo, folder: Path) -> None:
    missing = [f for f, _ in info.files if not (folder / f).is_file()]
    if missing:
        names = ",".join(f for f, _ in info.files)
        raise DataError(f"{folder} is not the complete official {info.name} folder: it lacks "
                        f"{', '.join(missing)} (official files: {folder}/{{{names}}}); add "
                        f"them, or pass {UNVERIFIED_FLAG} to use the data as it is")


def _check_md5s(info: DatasetInfo, folder: Path) -> None:
    """Every official file's MD5, from its raw bytes, before any of them is parsed."""
    for fname, official in info.files:
        got = _md5(folder / fname)
        if got != official:
            _explain_mismatch(info, folder, fname, got, official)


def _explain_mismatch(info: DatasetInfo, folder: Path, fname: str, got: str,
                      official: str) -> None:
    """Refuse ``fname``, whose MD5 differs: by its image count when that differs too.

    The file is known not to be the official one here; it is read as an unverified folder
    would be (:func:`crmn.data.formats.load_data_pickle`, SVHN headers only), which runs no
    code and refuses a pickle that asks for anything but arrays and containers.
    """
    count = dict(info.images).get(fname)
    if count is not None:
        n = count_images(info.name, folder / fname)
        if n != count:
            raise DataError(_refusal(f"{folder / fname} holds {n:,} images, the official "
                                     f"file {count:,} (truncated, or another dataset)"))
    raise DataError(_refusal(f"{folder / fname} has MD5 {got}, the official file {official} "
                             f"(same name, different bytes: re-packed or altered)"))


# --------------------------------------------------------------------------------------------
# The stamp: checked once, then trusted while size and modification time stay the same

def _signature(folder: Path, info: DatasetInfo) -> Dict[str, List]:
    """``{file: [size, mtime_ns, expected MD5]}``; the expected MD5 ties it to the table."""
    sig = {}
    for fname, md5 in info.files:
        st = (folder / fname).stat()
        sig[fname] = [st.st_size, st.st_mtime_ns, md5]
    return sig


def _key(folder: Path, sig: Dict[str, List]) -> Tuple[str, str]:
    return str(folder.resolve()), json.dumps(sig, sort_keys=True)


def _is_checked(folder: Path, info: DatasetInfo) -> bool:
    """True when this process or a valid stamp says ``folder`` passed its checks."""
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
