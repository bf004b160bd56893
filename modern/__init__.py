"""The PyTorch port of CRMN (docs/spec.md §2): verified equal to ``original/``, fast on
GPUs. :mod:`modern.model` is the network, :mod:`modern.backend` the torch backend, and
:mod:`modern.gpu` keeps the training set on the device. Measured speeds: REPRODUCING.md §5.
"""
