"""Weights files as untrusted bytes, and what a weights file records to feed the network.
A ``<row>-<sha8>.pt`` or ``.npz`` (crmn/export.py) is checked three ways: the name's sha8 against
the bytes' SHA-256, a reader that cannot run code, and the :func:`digest` the file carries of its
own arrays and record. Imports numpy only (torch for a .pt): torch.hub's entries use it."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import zipfile
import zlib
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from crmn.errors import CheckpointError, ConfigError

#: ``<row>-<sha8>.<ext>``: the first 8 hex digits of the file's SHA-256 (torch.hub's rule)
NAMED = re.compile(r"-([0-9a-f]{8})\.(pt|npz)$")
#: Floor of the per-image standard deviation in global contrast normalisation, in [0, 1]
#: pixel units: below 1/100 an image is flat and dividing would only amplify its noise.
GCN_MIN_STD = 1e-2


def global_contrast_normalize(x: np.ndarray, min_std: float = GCN_MIN_STD) -> np.ndarray:
    """Per-image global contrast normalisation (section 4.2, SVHN; Goodfellow et al. 2013) of
    float32 (B, C, H, W) in [0, 1]: minus its mean, over its std floored at ``min_std``."""
    mean = x.mean(axis=(1, 2, 3), keepdims=True, dtype=np.float64)
    std = x.std(axis=(1, 2, 3), keepdims=True, dtype=np.float64)
    scale = 1.0 / np.maximum(std, min_std)
    return ((x - mean) * scale).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """uint8 images -> the network's float32 input (section 4.2), as the run computed it."""
    kind: str  # "mean_pixel" (CIFAR) | "gcn" (SVHN: global contrast normalisation per image)
    mean: Optional[Tuple[float, ...]] = None  # mean_pixel: the training rows' RGB mean, [0, 1]
    min_std: Optional[float] = None  # gcn: the std floor, [0, 1] pixel units

    def __call__(self, u: np.ndarray) -> np.ndarray:
        """uint8 (B, 3, 32, 32) -> float32 (B, 3, 32, 32)."""
        x = u.astype(np.float32) * np.float32(1 / 255)
        if self.kind == "gcn":
            return global_contrast_normalize(x, self.min_std)
        return x - np.asarray(self.mean, dtype=np.float32).reshape(1, 3, 1, 1)

    def to_dict(self) -> Dict:
        return {"kind": self.kind, "mean": None if self.mean is None else list(self.mean),
                "min_std": self.min_std}

    @classmethod
    def from_dict(cls, d: Optional[Mapping]) -> Optional["Preprocessing"]:
        """The record's preprocessing; None where a run from before it recorded none."""
        if not d:
            return None
        mean = d.get("mean")
        return cls(d["kind"], None if mean is None else tuple(mean), d.get("min_std"))


def digest(arrays: Mapping[str, np.ndarray], record=None) -> str:
    """SHA-256 over each array's name, dtype, shape and bytes (in name order), then ``record``
    as sorted JSON: the same for the same contents however a file is written or named."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        if a.dtype.hasobject:
            raise CheckpointError(f"array {name!r} holds Python objects, not numbers; use "
                                  "a weights file this archive wrote")
        head = json.dumps([name, a.dtype.str, list(a.shape)]).encode()
        h.update(len(head).to_bytes(8, "little") + head)
        h.update(np.ascontiguousarray(a))  # the buffer itself: no copy of large weights
    h.update(json.dumps(record, sort_keys=True).encode())
    return h.hexdigest()


def check_digest(path, arrays: Mapping[str, np.ndarray], record: Dict, recorded) -> None:
    """Refuse arrays that are not the ones ``recorded`` (the file's digest) was taken of."""
    if not isinstance(recorded, str):
        raise CheckpointError(f"{path}: carries no digest of its arrays, so they cannot be "
                              "checked; not a weights file written by export (or by an "
                              "older one): export the run again")
    if digest(arrays, record) != recorded:
        raise CheckpointError(f"{path}: its arrays or record do not match the digest it "
                              "carries (a damaged or edited file, whatever its name says); "
                              "use the file as exported, or export the run again")


def read_bytes(path) -> bytes:
    """The file's bytes, refused where its name's sha8 is not their SHA-256's first 8 digits."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file; give the path of a .pt, .npz "
                              "or checkpoint .h5")
    payload = path.read_bytes()
    named = NAMED.search(path.name)
    actual = hashlib.sha256(payload).hexdigest()[:8]
    if named and named.group(1) != actual:
        raise CheckpointError(f"{path}: the name says sha256 {named.group(1)}..., the bytes "
                              f"hash to {actual}... (a damaged or altered file); fetch or "
                              "export it again")
    return payload


def read_pt(path) -> Tuple[Dict, Dict[str, np.ndarray]]:
    """(record, state_dict as numpy) of a .pt written by export, every check passed."""
    try:
        import torch
    except ImportError:
        raise ConfigError(f"reading {Path(path).name} needs torch, which this environment "
                          "lacks: give the .npz, or use the pinned environment") from None
    payload = read_bytes(path)
    try:
        saved = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types on hostile bytes
        raise CheckpointError(f"{path}: not a weights file written by export "
                              f"({_why_not_loaded(e)}); nothing in it was run; use the file "
                              "as exported, or export the run again") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("state_dict"), dict) or \
            not all(isinstance(v, torch.Tensor) for v in saved["state_dict"].values()):
        raise CheckpointError(f"{path}: not a weights file written by export (no state_dict "
                              "of tensors); export the run again")
    record = {k: v for k, v in saved.items() if k not in ("state_dict", "digest")}
    arrays = {str(k): v.numpy() for k, v in saved["state_dict"].items()}
    check_digest(path, arrays, record, saved.get("digest"))
    return record, arrays


def _why_not_loaded(e: Exception) -> str:
    """torch's reason in the archive's words (torch's own advice is to load unsafely)."""
    asked = re.search(r"GLOBAL ([\w.]+)", str(e))
    if asked:
        return f"its pickle asks for the Python global {asked.group(1)}, which weights never need"
    if isinstance(e, RuntimeError) and "zip" in str(e):
        return "a damaged zip archive"
    return "its bytes are neither a torch zip archive nor a pickle of tensors"


def read_npz(path) -> Tuple[Dict, Dict[str, np.ndarray]]:
    """(record, arrays by Lasagne name) of a .npz written by export, every check passed."""
    payload = read_bytes(path)
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as f:
            record = json.loads(str(f["meta"]))
            arrays = {str(k): f[str(k)] for k in f["names"]}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as e:
        why = ("a damaged zip archive" if isinstance(e, (zipfile.BadZipFile, zlib.error)) else
               "it holds pickled Python objects, which weights never need" if "pickle" in str(e)
               else f"{type(e).__name__}: {' '.join(str(e).split())[:100]}")
        raise CheckpointError(f"{path}: not a weights file written by export ({why}); "
                              "export the run again") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: not a weights file written by export (its meta is "
                              "no JSON object); export the run again")
    check_digest(path, arrays, {k: v for k, v in record.items() if k != "digest"},
                 record.get("digest"))
    return record, arrays
