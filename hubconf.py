"""torch.hub entries of the CRMN archive: the PyTorch network of every paper row.

    model = torch.hub.load("<owner>/<repo>", "exported", "t3-crmn56x3-<sha8>.pt",
                           source="local").eval()
    logits = model(model.preprocess(images))   # uint8 (B, 32, 32, 3) or (B, 3, 32, 32)

``exported(path)`` is the network of a file written by ``bash run_experiments.sh export
RUN_DIR``. ``crmn(n, k, num_classes)`` and ``resnet(n, k, num_classes)`` build any depth
6n+2 and width k; one entry per row of crmn/paper.py (its id with ``-`` and ``.`` made
``_``: ``t1_crmn32x4``, ``t1_resnet104x1_5``, ``t3_crmn56x3``, ...) builds that row's
network, and ``pretrained=True`` loads the row's released ``<row>-<sha8>.pt``. A weights file
is checked as crmn/weights.py says (its name's sha8, a reader that runs no code, the digest
of its arrays) and brings its run's preprocessing, which ``model.preprocess`` applies.
Loading imports torch, numpy and the archive's framework-free core only (no Theano, h5py
or jax).
"""
from pathlib import Path as _Path

from crmn import paper as _paper
from crmn import weights as _weights
from crmn.config import ModelConfig as _ModelConfig
from crmn.errors import ConfigError as _ConfigError
from crmn.errors import CRMNError as _CRMNError
from modern import model as _model
from modern.model import CIFARNet as _CIFARNet

dependencies = ["torch", "numpy"]

#: row id -> URL of its released ``<row>-<sha8>.pt``; none is released yet
RELEASES = {}


class _HubNet(_CIFARNet):
    """The archive's network whose forward follows the module's mode, as torch code expects:
    ``eval()`` normalises with the running batch-norm statistics, ``train()`` with the
    batch's and moves the running averages (the archive's own code passes ``training``)."""

    preprocessing = None  # the loaded weights' crmn.weights.Preprocessing

    def forward(self, x, training=None, update_stats=None):
        training = self.training if training is None else training
        return super().forward(x, training, training if update_stats is None else update_stats)

    def preprocess(self, images):
        """uint8 images, (B, 32, 32, 3) or (B, 3, 32, 32), tensor or array -> the float32
        (B, 3, 32, 32) tensor of the run's own preprocessing, as its weights file records it."""
        import numpy as np
        import torch

        x = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if x.dtype != np.uint8 or x.ndim != 4 or 3 not in (x.shape[1], x.shape[3]):
            raise _ConfigError(f"preprocess takes uint8 images (B, 32, 32, 3) or (B, 3, 32, "
                               f"32), not {x.dtype} {tuple(x.shape)}")
        if self.preprocessing is None:
            raise _ConfigError("this model holds no recorded preprocessing (no weights "
                               "loaded, or exported from a run that finished before runs "
                               "recorded it); normalise as REPRODUCING.md's protocol says")
        x = x if x.shape[1] == 3 else x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
        return torch.from_numpy(self.preprocessing(x)).to(self.bn0.mean.device)


def _build(cfg, seed):
    return _model.build(cfg, seed, _HubNet)  # the one builder, hub semantics


def crmn(n=5, k=4, num_classes=100, seed=0, **options):
    """A CRMN: the 6n+2-layer, width-k CIFAR ResNet with the LSTM over its 3n block outputs
    (default CRMN-32x4 for CIFAR-100). ``options``: the other ModelConfig fields."""
    return _build(_ModelConfig(n=n, k=k, classes=num_classes, memory=True, **options), seed)


def resnet(n=5, k=1, num_classes=100, seed=0, **options):
    """The plain 6n+2-layer, width-k CIFAR ResNet (option-A shortcuts) of Table 1."""
    return _build(_ModelConfig(n=n, k=k, classes=num_classes, memory=False, **options), seed)


def _release(row):
    """The URL of ``row``'s released weights; one sentence, before any download, if none."""
    if row.id not in RELEASES:
        raise _ConfigError(
            f"No pretrained weights for {row.id} have been released with this archive yet; "
            f"make them from a finished run with `bash run_experiments.sh export RUN_DIR` and "
            f"load that file with exported(path).")
    return RELEASES[row.id]


def _load(path, model=None, where=None):
    """``model`` (else the file's own network) holding the weights of an exported ``.pt``."""
    import torch

    record, state = _weights.read_pt(path)
    cfg = _ModelConfig(**record["model"])
    if model is None:
        model = _build(cfg, 0)
    elif cfg != model.cfg:
        raise _ConfigError(f"{where or path}: its configuration is not the one of row "
                           f"{record.get('row')}")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    model.preprocessing = _weights.Preprocessing.from_dict(record.get("preprocessing"))
    return model


def _load_release(row, url, model):
    import torch

    # torch.hub's cache; the name's -<sha8>, the reader and the digest are crmn.weights'
    path = _Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    fresh = not path.exists()
    if fresh:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=False)
    try:
        return _load(path, model, url)
    except _CRMNError:
        if fresh:  # a bad download is not kept
            path.unlink()
        raise


def exported(path):
    """The network of a ``.pt`` written by ``bash run_experiments.sh export RUN_DIR``, with
    that run's preprocessing (``model.preprocess``); the file is checked before it is read."""
    return _load(path)


def _entry(row):
    def entry(pretrained=False, seed=0):
        url = _release(row) if pretrained else None
        model = _build(_ModelConfig.for_row(row), seed)
        return _load_release(row, url, model) if url else model

    entry.__name__ = row.id.replace("-", "_").replace(".", "_")
    entry.__doc__ = (f"{row.label} of {row.table} ({row.dataset}, {row.classes} classes; "
                     f"paper: {row.paper_accuracy:.2f} % test accuracy). pretrained=True "
                     f"loads its released weights.")
    return entry


for _row in _paper.ROWS:
    _fn = _entry(_row)
    globals()[_fn.__name__] = _fn
del _row, _fn
