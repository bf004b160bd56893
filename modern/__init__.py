"""The PyTorch port of CRMN (SPEC §2): verified equal to ``original/``, fast on GPUs.

* :mod:`modern.model` -- the network (``build``, ``build_resnet``, ``build_crmn``);
* :mod:`modern.backend` -- :class:`~modern.backend.TorchBackend`, the
  :class:`crmn.stack.Stack` with Lasagne's SGD and the CUDA-graph train step;
* :mod:`modern.gpu` -- the training set resident on the device, one epoch's crops at once;

Measured speeds (one H100, float32 / bfloat16 / ``--compile``, every Table 1 row) are in
REPRODUCING.md, section 5; ``run_experiments.sh bench --device cuda`` measures them again.
"""
