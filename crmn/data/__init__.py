"""Datasets, preprocessing and the batch sampler both stacks draw from (docs/spec.md §4-§6).
Every public name is re-exported here: the function ``prepare`` shadows its module, and
constants are copies (patch them in their own module)."""
from crmn.data.fake import FAKE_MARKER, is_fake, write_fake, write_fake_archive
from crmn.data.images import describe
from crmn.data.formats import count_images, load_raw
from crmn.data.integrity import (STAMP, UNVERIFIED_FLAG, ensure_downloaded, provenance,
                                 verify_folder)
from crmn.data.prepare import (GCN_MIN_STD, SVHN_VAL_IMAGES, Split, global_contrast_normalize,
                               prepare, ready, split_indices)
from crmn.data.sampler import BatchSampler, EpochPlan, iterate_eval
from crmn.data.sources import DATASETS, MIRROR_ENV, DatasetInfo, PathLike, dataset_info, locate
