"""The PyTorch port of CRMN (SPEC §2): verified equal to ``original/``, fast on GPUs.

* :mod:`modern.model` -- the network (``build``, ``build_resnet``, ``build_crmn``);
* :mod:`modern.backend` -- :class:`~modern.backend.TorchBackend`, the
  :class:`crmn.backend.Backend` with Lasagne's SGD and the CUDA-graph train step;
* :mod:`modern.gpu` -- the training set resident on the device, one epoch's crops at once;
* :mod:`modern.profile_step` -- a GPU timing tool for the captured step's settings.

Measured on one H100 80GB HBM3 (torch 2.11, ``python -m crmn.bench --device cuda --steps
500``), seconds per 50,000-image epoch and speed-up over the paper's (Table 1):

============== ================ ================= ===========================
row            float32 (TF32)   bfloat16          bfloat16 + ``--compile``
============== ================ ================= ===========================
ResNet-134x1   12.67 s (36x)    6.15 s (74x)      4.60 s (99x)
ResNet-104x1.5 11.59 s (41x)    5.41 s (87x)      4.17 s (113x)
ResNet-92x2    11.93 s (49x)    5.11 s (114x)     3.96 s (147x)
ResNet-62x4    12.48 s (71x)    4.58 s (192x)     3.84 s (229x)
ResNet-32x1     3.04 s (41x)    1.50 s (83x)      1.12 s (112x)
ResNet-32x1.5   3.57 s (48x)    1.70 s (102x)     1.31 s (132x)
ResNet-32x2     4.12 s (48x)    1.81 s (110x)     1.37 s (145x)
ResNet-32x4     6.40 s (67x)    2.41 s (177x)     1.97 s (217x)
CRMN-32x1       4.24 s (33x)    2.86 s (49x)      1.40 s (100x)
CRMN-32x1.5     4.87 s (34x)    3.17 s (52x)      1.62 s (102x)
CRMN-32x2       5.53 s (42x)    3.42 s (68x)      1.72 s (135x)
CRMN-32x4       8.25 s (59x)    4.53 s (108x)     2.41 s (203x)
============== ================ ================= ===========================

All three with the train step captured as one CUDA graph; ``--compile`` adds 20-90 s of
compilation per row (reported apart as warm-up).
"""
