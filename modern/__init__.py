"""The PyTorch port of CRMN (SPEC §2): verified equal to ``original/``, fast on GPUs.

* :mod:`modern.model` -- the network (``build``, ``build_resnet``, ``build_crmn``);
* :mod:`modern.backend` -- :class:`~modern.backend.TorchBackend`, the
  :class:`crmn.backend.Backend` with Lasagne's SGD and the CUDA-graph train step;
* :mod:`modern.gpu` -- the training set resident on the device, one epoch's crops at once;
* :mod:`modern.profile_step` -- a GPU timing tool for the captured step's settings.

Measured on one H100 (``python -m crmn.bench --device cuda --steps 500``), seconds per
50,000-image epoch against the paper's (Table 1), for example: float32 ResNet-32x1 3.04 s
(41x), CRMN-32x4 8.25 s (59x); ``--precision bfloat16`` CRMN-32x4 4.53 s (108x),
ResNet-62x4 4.58 s (192x); bfloat16 with ``--compile`` ResNet-32x1 1.12 s (111x),
ResNet-134x1 4.60 s (99x).
"""
