"""The HDF5 checkpoint both backends read and write (docs/spec.md §6, §7): a Fletcher-32
checked dataset per array by canonical name (:mod:`crmn.naming`), the JSON attribute ``meta``
(crmn.runstate.CheckpointMeta) and ``digest`` (crmn.weights.digest), which also covers
scalars, empty arrays and the meta; a checkpoint older than the digest reads without it."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import h5py
import numpy as np

from crmn.config import ModelConfig, TrainConfig, json_view
from crmn.errors import CheckpointError
from crmn.runlog import commit_temp, link_over, write_temp
from crmn.weights import digest

FORMAT_VERSION = 1
_IMAGE_BLOCK = 1 << 22  # growth step of the in-memory file image (bytes)

Arrays = Dict[str, np.ndarray]

#: what to do when a checkpoint cannot be written (a full disk, most often)
WAY_ON = ("; free disk space, then run the same command with --resume (it goes on from the "
          "last checkpoint written)")


def previous_path(path) -> Path:
    """Where :func:`save` keeps the file it replaced: checkpoint.prev.h5 for checkpoint.h5."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save(path, arrays: Arrays, meta: Dict, *, keep_previous: bool = False) -> None:
    """Write ``path`` atomically, read back first; ``keep_previous``: see :func:`previous_path`."""
    path = Path(path)
    bad = [n for n in arrays if "/" in n or not n]
    if bad:
        raise CheckpointError(f"{path}: array names may not be empty or contain '/': {bad}")
    text = json.dumps(dict(meta, format_version=FORMAT_VERSION), allow_nan=False)
    tmp = None
    try:
        tmp = write_temp(path, _h5_image(arrays, text))
        try:
            same = load(tmp)[1].get("epoch") == meta.get("epoch")
            problem = None if same else "reads back another epoch"
        except CheckpointError:
            problem = "does not read back (a failing disk?)"
        if problem:
            raise CheckpointError(f"{path}: the checkpoint just written {problem}; the previous "
                                  "one is kept; check the disk and run again with --resume")
        if keep_previous and readable(path):
            link_over(path, previous_path(path))
        commit_temp(tmp, path)
    except (OSError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: could not write checkpoint ({_reason(e)}){WAY_ON}") from e
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def readable(path) -> bool:
    """Whether ``path`` is a checkpoint that :func:`load` reads (every checksum holds)."""
    try:
        load(path)
    except CheckpointError:
        return False
    return True


def _h5_image(arrays: Arrays, meta_text: str) -> bytes:
    """The bytes of the HDF5 file, built in memory: a full disk then fails in a plain
    ``os.write``, not inside HDF5, whose half-written files crash the interpreter at exit."""
    with h5py.File("checkpoint-image.h5", "w", driver="core", backing_store=False,
                   block_size=_IMAGE_BLOCK) as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["meta"] = meta_text
        f.attrs["digest"] = digest(arrays, json.loads(meta_text))
        for name in sorted(arrays):
            a = np.asarray(arrays[name])  # not ascontiguousarray: it turns 0-d into 1-d
            # Fletcher-32 needs chunked storage, which h5py cannot give scalars or empties
            checksum = a.ndim > 0 and a.size > 0
            f.create_dataset(name, data=a, fletcher32=checksum)
        f.flush()
        return f.id.get_file_image()


def _reason(e: BaseException, limit: int = 160) -> str:
    """One short line for a message: the errno's text, else the collapsed message."""
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load(path) -> Tuple[Arrays, Dict]:
    """``(arrays by name, meta)`` of a checkpoint written by :func:`save`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:  # HDF5's words ("truncated file: eof = ...") mean this
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint (it does not open "
                              "as a complete HDF5 file)") from e
    with f:
        try:
            if "meta" not in f.attrs:
                raise CheckpointError(f"{path}: no 'meta' attribute; not a CRMN checkpoint")
            version = int(f.attrs.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise CheckpointError(f"{path}: checkpoint format version {version}, this code "
                                      f"reads version {FORMAT_VERSION}; use the archive that "
                                      "wrote it, or delete it and start the run over")
            meta = json.loads(f.attrs["meta"])  # str, or bytes from another writer
        except (OSError, RuntimeError, KeyError) as e:
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint (its metadata "
                                  "does not read)") from e
        except ValueError as e:
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint (its 'meta' "
                                  "attribute is not valid JSON)") from e
        arrays = {}
        for name, item in f.items():
            if not isinstance(item, h5py.Dataset):
                raise CheckpointError(f"{path}: unexpected group {name!r}; not a CRMN "
                                      "checkpoint")
            try:
                arrays[name] = item[()]
            except (OSError, RuntimeError, ValueError, KeyError) as e:
                raise CheckpointError(f"{path}: truncated or corrupt checkpoint (array "
                                      f"{name!r} fails its checksum or is cut off)") from e
        recorded = f.attrs.get("digest")  # absent in a checkpoint older than the digest
    if recorded is not None and digest(arrays, meta) != recorded:
        raise CheckpointError(f"{path}: corrupt checkpoint (its arrays or meta do not match "
                              "the digest written with them)")
    return arrays, meta


def show(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value) if isinstance(value, (list, dict, str)) else str(value)


def check_compatible(recorded: Dict, model: ModelConfig, train: Optional[TrainConfig] = None,
                     *, backend: Optional[str] = None, dtype: Optional[str] = None,
                     dataset: Optional[str] = None, path="checkpoint.h5",
                     source: str = "the checkpoint",
                     may_change: Callable[[str], bool] = lambda name: False) -> None:
    """Refuse ``recorded`` (checkpoint meta, config.json) unless equal but for ``may_change``."""
    sections = [("model", model.to_dict(), recorded.get("model"))]
    if train is not None:
        sections.append(("train", train.to_dict(), recorded.get("train")))
    for label, here, there in sections:
        if not isinstance(there, dict):
            raise CheckpointError(f"{path}: {source} records no {label} configuration")
        here, there = json_view(here), json_view(there)
        for key in sorted(set(here) | set(there)):
            if key not in here or key not in there or (
                    here[key] != there[key] and not may_change(f"{label}.{key}")):
                mine = show(here[key]) if key in here else "unknown"
                theirs = show(there[key]) if key in there else "absent"
                raise CheckpointError(f"{path}: {label}.{key} is {mine} here, "
                                      f"{theirs} in {source}")
    for key, here in (("backend", backend), ("dtype", dtype), ("dataset", dataset)):
        if here is not None and recorded.get(key) != here:
            raise CheckpointError(f"{path}: {key} is {here} here, "
                                  f"{recorded.get(key)} in {source}")
