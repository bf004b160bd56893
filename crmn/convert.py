"""The one place where arrays change layout between a stack and the canonical format.

Canonical names and layouts are defined in :mod:`crmn.naming`. Each stack exposes its
arrays as a flat ``dict`` of numpy arrays under its *native* names; the functions here map
such a dict to canonical form and back, asserting every shape against
``naming.param_specs``. Every mapping is a pure relabelling, a transpose, a reshape or a
flip, so a round trip reproduces arrays bit for bit.

Lasagne (``original/``), native names are the Lasagne parameter names, prefixed with the
layer name the builder gives (``"s1b0.conv1.W"``, ``"lstm.W_in_to_ingate"``):

* ``Conv2DLayer`` computes a true convolution (Theano's ``conv2d`` flips the kernel), so
  its ``W`` is the canonical cross-correlation kernel flipped on both spatial axes;
* ``LSTMLayer`` keeps one ``(I, H)`` / ``(H, H)`` / ``(H,)`` array per gate, named
  ``W_in_to_{gate}``, ``W_hid_to_{gate}``, ``b_{gate}``, ``W_cell_to_{gate}`` with gate in
  ingate / forgetgate / cell / outgate, and ``hid_init`` / ``cell_init`` of shape ``(1, H)``;
* ``DenseLayer`` ``W`` is ``(in, out)`` like the canonical one; batch norm is ours and
  already keeps ``gamma, beta, mean, inv_std``.

Momentum velocities travel as ``velocity.<name>`` and get the same mapping as ``<name>``.
"""
from __future__ import annotations

from typing import Callable, Dict

import numpy as np

from crmn.errors import CheckpointError
from crmn.naming import ParamSpec, param_specs, velocity_name
from crmn.config import ModelConfig

Arrays = Dict[str, np.ndarray]

_LASAGNE_GATE = {"i": "ingate", "f": "forgetgate", "c": "cell", "o": "outgate"}


def _lasagne_entry(spec: ParamSpec):
    """(native name, canonical -> native, native -> canonical) for one canonical array."""
    name, role = spec.name, spec.role
    if role == "conv":
        flip = lambda a: np.ascontiguousarray(a[:, :, ::-1, ::-1])  # noqa: E731 (self-inverse)
        return name, flip, flip
    if name.startswith("lstm."):
        key = name[len("lstm."):]
        if role == "lstm_init":  # h0 / c0: canonical (H,), Lasagne (1, H)
            native = "lstm.hid_init" if key == "h0" else "lstm.cell_init"
            return native, (lambda a: a.reshape(1, -1)), (lambda a: a.reshape(-1))
        if role == "lstm_Wx":
            native = f"lstm.W_in_to_{_LASAGNE_GATE[key[-1]]}"
        elif role == "lstm_Wh":
            native = f"lstm.W_hid_to_{_LASAGNE_GATE[key[-1]]}"
        elif role == "lstm_b":
            native = f"lstm.b_{_LASAGNE_GATE[key[-1]]}"
        elif role == "lstm_peephole":
            native = f"lstm.W_cell_to_{_LASAGNE_GATE[key[-1]]}"
        else:  # pragma: no cover - naming.param_specs defines no other LSTM role
            raise AssertionError(f"unexpected LSTM array {name}")
        return native, (lambda a: a), (lambda a: a)
    return name, (lambda a: a), (lambda a: a)


def _check(arr: np.ndarray, shape, what: str, where: str) -> None:
    if tuple(arr.shape) != tuple(shape):
        raise CheckpointError(
            f"{where}: array {what} has shape {tuple(arr.shape)}, expected {tuple(shape)}")


def _map(cfg: ModelConfig, arrays: Arrays, *, to_canonical: bool, with_velocity: bool,
         entry: Callable, where: str) -> Arrays:
    out: Arrays = {}
    for spec in param_specs(cfg):
        native, to_native, from_native = entry(spec)
        names = [(spec.name, native)]
        if with_velocity and spec.trainable:
            names.append((velocity_name(spec.name), velocity_name(native)))
        for canon_name, native_name in names:
            src = native_name if to_canonical else canon_name
            if src not in arrays:
                raise CheckpointError(f"{where}: array {src} is missing")
            a = np.asarray(arrays[src])
            if to_canonical:
                b = from_native(a)
                _check(b, spec.shape, canon_name, where)
                out[canon_name] = b
            else:
                _check(a, spec.shape, canon_name, where)
                out[native_name] = to_native(a)
    return out


def lasagne_to_canonical(cfg: ModelConfig, native: Arrays, with_velocity: bool = True,
                         where: str = "original/ state") -> Arrays:
    """Lasagne-named arrays (params, BN stats, ``velocity.*``) -> canonical arrays."""
    return _map(cfg, native, to_canonical=True, with_velocity=with_velocity,
                entry=_lasagne_entry, where=where)


def canonical_to_lasagne(cfg: ModelConfig, canonical: Arrays, with_velocity: bool = True,
                         where: str = "checkpoint") -> Arrays:
    """Canonical arrays -> Lasagne-named arrays, shapes asserted against the config."""
    return _map(cfg, canonical, to_canonical=False, with_velocity=with_velocity,
                entry=_lasagne_entry, where=where)
