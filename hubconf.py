"""torch.hub entries of the CRMN archive: the PyTorch network of every paper row.

    model = torch.hub.load("<owner>/<repo>", "t1_crmn32x4")        # or source="local"
    model.eval()
    logits = model(images)       # images (B, 3, 32, 32), preprocessed as REPRODUCING.md says

``crmn(n, k, num_classes)`` and ``resnet(n, k, num_classes)`` build any depth 6n+2 and
width k; one entry per row of crmn/paper.py (its id with ``-`` and ``.`` made ``_``:
``t1_crmn32x4``, ``t1_resnet104x1_5``, ``t3_crmn56x3``, ...) builds that row's network.
Loading imports torch, numpy and the archive's framework-free core only (no Theano, h5py
or jax). ``pretrained=True`` loads the row's released ``<row>-<sha8>.pt`` (made by
``bash run_experiments.sh export RUN_DIR``), its SHA-256 checked against the name.
"""
from crmn import paper as _paper
from crmn.config import ModelConfig as _ModelConfig
from crmn.errors import ConfigError as _ConfigError
from modern.model import CIFARNet as _CIFARNet

dependencies = ["torch", "numpy"]

#: row id -> URL of its released ``<row>-<sha8>.pt``; none is released yet
RELEASES = {}


class _HubNet(_CIFARNet):
    """The archive's network whose forward follows the module's mode, as torch code expects:
    ``eval()`` normalises with the running batch-norm statistics, ``train()`` with the
    batch's and moves the running averages (the archive's own code passes ``training``)."""

    def forward(self, x, training=None, update_stats=None):
        training = self.training if training is None else training
        return super().forward(x, training, training if update_stats is None else update_stats)


def _build(cfg, seed):
    net = _HubNet(cfg)
    net.reset_parameters(seed)  # crmn.init's arrays: the same as the Theano stack's
    return net


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
            f"load that file's state_dict.")
    return RELEASES[row.id]


def _load_release(row, url, model):
    import torch

    # the file name's -<sha8> is checked against the SHA-256 of the downloaded bytes
    saved = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True,
                                               weights_only=True)
    if saved.get("model") != model.cfg.to_dict():
        raise _ConfigError(f"{url}: its configuration is not the one of row {row.id}")
    model.load_state_dict(saved["state_dict"])


def _entry(row):
    def entry(pretrained=False, seed=0):
        url = _release(row) if pretrained else None
        model = _build(_ModelConfig.for_row(row), seed)
        if url:
            _load_release(row, url, model)
        return model

    entry.__name__ = row.id.replace("-", "_").replace(".", "_")
    entry.__doc__ = (f"{row.label} of {row.table} ({row.dataset}, {row.classes} classes; "
                     f"paper: {row.paper_accuracy:.2f} % test accuracy). pretrained=True "
                     f"loads its released weights.")
    return entry


for _row in _paper.ROWS:
    _fn = _entry(_row)
    globals()[_fn.__name__] = _fn
del _row, _fn
