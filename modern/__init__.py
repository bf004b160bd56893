"""The PyTorch backend of CRMN (docs/spec.md §2): verified equal to ``original/``, fast on GPUs.

* :mod:`modern.model` -- the network (``build``, ``build_resnet``, ``build_crmn``);
* :mod:`modern.backend` -- :class:`~modern.backend.TorchBackend`, the
  :class:`crmn.stack.Stack` with Lasagne's SGD and the CUDA-graph train step;
* :mod:`modern.gpu` -- the training set resident on the device, one epoch's crops at once.

Measured speeds are in REPRODUCING.md §5.
"""
