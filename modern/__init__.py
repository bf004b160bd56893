"""The PyTorch port of CRMN (docs/spec.md §2): :mod:`modern.model` the network,
:mod:`modern.backend` the torch backend, :mod:`modern.gpu` the training set on the device."""
