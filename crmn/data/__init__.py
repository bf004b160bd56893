"""Datasets, preprocessing and the batch sampler both backends draw from (docs/spec.md §4-§6).
The names used outside are re-exported here: the function ``prepare`` shadows its module, and
constants are copies (patch them in their own module)."""
from crmn.data.fake import FAKE_MARKER, is_fake, write_fake, write_fake_archive
from crmn.data.images import describe
from crmn.data.formats import count_images, load_raw
from crmn.data.integrity import STAMP, UNVERIFIED_FLAG, ensure_downloaded, fingerprint, provenance
from crmn.data.prepare import Split, prepare, ready, split_indices
from crmn.data.sampler import BatchSampler, EpochPlan, iterate_eval
from crmn.data.sources import DATASETS, MIRROR_ENV, dataset_info, locate
from crmn.weights import global_contrast_normalize
