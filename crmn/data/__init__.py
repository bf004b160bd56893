"""Datasets, preprocessing and the one batch sampler that both stacks draw from (SPEC §4-§6).

One module per job, in the order a run uses them:

- :mod:`crmn.data.sources` — what each dataset is (:data:`DATASETS`: official URLs, archive
  MD5s, per-file MD5s and image counts), where its files are (:func:`locate`), downloading
  with a lock and retries, extraction, the mirror ``$CRMN_DATA_MIRROR``;
- :mod:`crmn.data.formats` — readers of the official CIFAR pickles and SVHN ``.mat`` files
  (:func:`load_raw`);
- :mod:`crmn.data.integrity` — checks a folder against the official files and says where
  the data comes from (:func:`provenance`: "official", "fake" or "unverified");
  :func:`ensure_downloaded`;
- :mod:`crmn.data.prepare` — preprocessing and the seeded split (:func:`prepare`,
  :class:`Split`);
- :mod:`crmn.data.sampler` — :class:`BatchSampler`, :class:`EpochPlan`, :func:`iterate_eval`;
- :mod:`crmn.data.fake` — small fake data in the official formats (:func:`write_fake`).

Every public name is re-exported here: ``from crmn import data; data.prepare(...)``. The
module ``crmn.data.prepare`` is shadowed by the function of the same name on this package;
reach the module (e.g. to patch ``_CHUNK`` in a test) with
``importlib.import_module("crmn.data.prepare")``. Constants re-exported here are copies of
the names: patch them in their own module, where the code reads them.
"""
from crmn.data.fake import FAKE_MARKER, is_fake, write_fake, write_fake_archive
from crmn.data.images import check as check_images, describe
from crmn.data.formats import count_images, load_raw
from crmn.data.integrity import (STAMP, UNVERIFIED_FLAG, ensure_downloaded, provenance,
                                 verify_folder)
from crmn.data.prepare import (GCN_MIN_STD, SVHN_VAL_IMAGES, Split, global_contrast_normalize,
                               prepare, split_indices)
from crmn.data.sampler import BatchSampler, EpochPlan, iterate_eval
from crmn.data.sources import DATASETS, MIRROR_ENV, DatasetInfo, PathLike, dataset_info, locate

__all__ = [
    "BatchSampler", "DATASETS", "DatasetInfo", "EpochPlan", "FAKE_MARKER", "GCN_MIN_STD",
    "MIRROR_ENV", "PathLike", "STAMP", "SVHN_VAL_IMAGES", "Split", "UNVERIFIED_FLAG",
    "check_images", "count_images", "dataset_info", "describe", "ensure_downloaded", "global_contrast_normalize",
    "is_fake", "iterate_eval", "load_raw", "locate", "prepare", "provenance", "split_indices",
    "verify_folder", "write_fake", "write_fake_archive",
]
