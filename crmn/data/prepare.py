"""Preprocessing (section 4.2) and the seeded validation split: a dataset becomes a
:class:`Split`. The float32 arrays are built chunk by chunk into their final buffers (no
float64 copy of a whole set)."""
from __future__ import annotations

from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from crmn.data import images
from crmn.data.formats import load_raw
from crmn.data.integrity import ensure_downloaded, provenance
from crmn.data.sources import PathLike, dataset_info, locate
from crmn.errors import ConfigError, DataError
from crmn.weights import GCN_MIN_STD, Preprocessing

#: Images in the SVHN validation set of the search run (section 4.2).
SVHN_VAL_IMAGES = 5000
_CHUNK = 4096  # images converted to float32 at a time (bounds the temporaries)


class Split(NamedTuple):
    """Normalised arrays of one phase of the protocol (docs/spec.md §5)."""

    train_x: np.ndarray  # float32 (N, 3, 32, 32), normalised
    train_y: np.ndarray  # int64 (N,), class indices
    eval_x: np.ndarray  # float32 (M, 3, 32, 32), normalised like train_x
    eval_y: np.ndarray  # int64 (M,)
    eval_name: str  # "val" (search phase) or "test" (final phase)
    preprocessing: Preprocessing  # uint8 -> train_x's and eval_x's values


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
    """Seeded disjoint sorted (train, val) index sets of ``range(n)``, ``n_val`` in val.
    Keyed apart: ``default_rng(seed)`` would equal the sampler's ``default_rng([seed, 0])``."""
    perm = np.random.default_rng([_SPLIT_KEY, seed]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def ready(name: str, data_dir: PathLike, subset: Optional[int] = None,
          unverified: bool = False, progress: bool = True) -> None:
    """A run's data checked before its folder exists: images loaded, else fetched or verified."""
    if not images.check(name, data_dir, subset):
        ensure_downloaded(name, data_dir, progress=progress, unverified=unverified)


def prepare(name: str, data_dir: PathLike, phase: str, seed: int, val_fraction: float = 0.1,
            download: bool = True, progress: bool = True, unverified: bool = False,
            subset: Optional[int] = None) -> Split:
    """Normalised arrays of one phase (docs/spec.md §5): "search" holds out a seeded
    ``val_fraction`` ("val"; SVHN at most 5000), "final" evaluates on the test set. ``subset``
    (``--subset N``): N class-balanced training images and a proportional share of the test."""
    dataset_info(name)  # an unknown name is a ConfigError
    if phase not in ("search", "final"):
        raise ConfigError(f"unknown phase {phase!r}; expected 'search' or 'final'")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    src = images.source(data_dir, name)
    if src is not None:
        raw = images.load(name, src, exact=subset is None)
    else:
        if download:
            ensure_downloaded(name, data_dir, progress=progress, unverified=unverified)
        elif locate(name, data_dir) is not None:  # else load_raw names the missing file
            provenance(name, data_dir, unverified=unverified)
        raw = load_raw(name, data_dir)
    where = src or locate(name, data_dir) or Path(data_dir) / dataset_info(name).folder
    svhn = name == "svhn"
    train_parts = [raw.pop("x_train")] + ([raw.pop("x_extra")] if svhn else [])
    train_labels = np.concatenate([raw["y_train"]] + ([raw["y_extra"]] if svhn else []))
    pool, test_pool = np.arange(len(train_labels)), np.arange(len(raw["y_test"]))
    if subset is not None:
        pool = _balanced(train_labels, subset, where, "training")
        share = round(subset * len(test_pool) / len(train_labels))
        test_pool = _balanced(raw["y_test"], max(share, len(np.unique(raw["y_test"]))),
                              where, "test")
    if phase == "search":
        train_idx, eval_idx = (pool[i] for i in _search_split(name, where, len(pool), seed,
                                                               val_fraction))
        eval_parts, eval_labels, eval_name = train_parts, train_labels, "val"
    else:
        train_idx, eval_idx = pool, test_pool
        eval_parts, eval_labels, eval_name = [raw.pop("x_test")], raw["y_test"], "test"
    fn = _normalizer(name, train_parts, train_idx)
    return Split(_build(train_parts, train_idx, fn), train_labels[train_idx],
                 _build(eval_parts, eval_idx, fn), eval_labels[eval_idx], eval_name, fn)


_SUBSET_KEY = 0x53554253  # "SUBS": the subset is the same for every seed


def _balanced(labels: np.ndarray, k: int, where: Path, what: str) -> np.ndarray:
    """``k`` sorted indices of ``labels``, drawn in rounds of one per class (a fixed seed)."""
    if k > len(labels):
        raise DataError(f"{where}: --subset asks for {k:,} {what} images, the data hold "
                        f"{len(labels):,}; choose a smaller N")
    perm = np.random.default_rng(_SUBSET_KEY).permutation(len(labels))
    shuffled = labels[perm]
    rank = np.empty(len(labels), dtype=np.int64)  # how many of its class came before it
    for c in np.unique(shuffled):
        hit = shuffled == c
        rank[hit] = np.arange(hit.sum())
    return np.sort(perm[np.argsort(rank, kind="stable")[:k]])


def _search_split(name: str, where: Path, n: int, seed: int,
                  val_fraction: float) -> Tuple[np.ndarray, np.ndarray]:
    n_val = int(round(val_fraction * n))
    if name == "svhn":
        n_val = min(SVHN_VAL_IMAGES, n_val)
    if n_val < 1 or n_val >= n:
        raise DataError(f"{where}: {n} training images cannot be split with val_fraction "
                        f"{val_fraction}")
    return split_indices(n, n_val, seed)


def _normalizer(name: str, train_parts: List[np.ndarray],
                train_idx: np.ndarray) -> Preprocessing:
    """uint8 -> float32 (section 4.2), fitted on the training rows only (no held-out leak)."""
    if name == "svhn":
        return Preprocessing("gcn", min_std=GCN_MIN_STD)
    total = np.zeros(3, dtype=np.float64)
    for s in range(0, len(train_idx), _CHUNK):
        total += _take(train_parts, train_idx[s:s + _CHUNK]).sum((0, 2, 3), dtype=np.float64)
    mean = (total / (len(train_idx) * 32 * 32 * 255.0)).astype(np.float32)
    return Preprocessing("mean_pixel", mean=tuple(float(v) for v in mean))
