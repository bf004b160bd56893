"""The one place where arrays change layout between a backend and the canonical format.

Each backend exposes its arrays as a flat dict of numpy arrays under *native* names; the
functions here map it to the canonical names and layouts of :mod:`crmn.naming` and back,
asserting every shape. Each mapping is a relabelling, transpose, reshape or flip, so a round
trip is bit for bit; velocities ``velocity.<name>`` get the mapping of ``<name>``.

Lasagne (``original/``): names are the layer's name plus Lasagne's parameter name.
``Conv2DLayer`` convolves (Theano flips the kernel), so its ``W`` is the canonical kernel
flipped on both spatial axes; ``LSTMLayer`` keeps one array per gate (``W_in_to_ingate``,
``W_hid_to_forgetgate``, ``b_cell``, ``W_cell_to_outgate``, ...) and ``hid_init`` /
``cell_init`` of shape ``(1, H)``; dense and batch-norm arrays are canonical already.
"""
from __future__ import annotations

from typing import Callable, Dict

import numpy as np

from crmn.errors import CheckpointError
from crmn.naming import LSTM_GATES, ParamSpec, param_specs, velocity_name
from crmn.config import ModelConfig

Arrays = Dict[str, np.ndarray]

_LASAGNE_GATE = {"i": "ingate", "f": "forgetgate", "c": "cell", "o": "outgate"}
_LASAGNE_LSTM = {"lstm_Wx": "W_in_to_", "lstm_Wh": "W_hid_to_", "lstm_b": "b_",
                 "lstm_peephole": "W_cell_to_"}


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
        prefix = _LASAGNE_LSTM[role]  # KeyError: naming.param_specs has no other LSTM role
        return f"lstm.{prefix}{_LASAGNE_GATE[key[-1]]}", (lambda a: a), (lambda a: a)
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


# ----------------------------------------------------------------------------- PyTorch
# ``modern/``'s names are ``CIFARNet.state_dict()`` keys: block ``s{s}b{b}`` is
# ``blocks.{(s - 1) n + b}``; γ, β are ``weight``, ``bias``; ``fc.weight`` is ``(out, in)``;
# the LSTM packs its gates i, f, c, o: ``lstm.W_x (I, 4H)``, ``lstm.W_h (H, 4H)``, ``lstm.b``.

_TORCH_PACKED = {"lstm_Wx": "lstm.W_x", "lstm_Wh": "lstm.W_h", "lstm_b": "lstm.b"}


def _torch_entry(cfg: ModelConfig, spec: ParamSpec):
    """(native name, gate chunk index or None, canonical -> native, native -> canonical)."""
    name, role = spec.name, spec.role
    same = lambda a: a  # noqa: E731
    if role in _TORCH_PACKED:
        return _TORCH_PACKED[role], LSTM_GATES.index(name[-1]), same, same
    if name.startswith("lstm."):  # peepholes, h0, c0: same names and shapes
        return name, None, same, same
    if name == "fc.W":
        transpose = lambda a: np.ascontiguousarray(a.T)  # noqa: E731 (self-inverse)
        return "fc.weight", None, transpose, transpose
    if name == "fc.b":
        return "fc.bias", None, same, same
    module, leaf = name.rsplit(".", 1)  # "s2b1.bn1", "gamma"
    if module[0] == "s":  # s{stage}b{block}.{conv,bn}{1,2}
        stage_block, layer = module.split(".")
        stage, block = stage_block[1:].split("b")
        module = f"blocks.{(int(stage) - 1) * cfg.n + int(block)}.{layer}"
    leaf = {"W": "weight", "gamma": "weight", "beta": "bias"}.get(leaf, leaf)
    return f"{module}.{leaf}", None, same, same


def _torch_pairs(cfg: ModelConfig, with_velocity: bool):
    """Yield (spec, canonical name, native name, chunk, to_native, from_native)."""
    for spec in param_specs(cfg):
        native, chunk, to_native, from_native = _torch_entry(cfg, spec)
        yield spec, spec.name, native, chunk, to_native, from_native
        if with_velocity and spec.trainable:
            yield (spec, velocity_name(spec.name), velocity_name(native), chunk, to_native,
                   from_native)


def torch_to_canonical(cfg: ModelConfig, native: Arrays, with_velocity: bool = True,
                       where: str = "modern/ state") -> Arrays:
    """PyTorch-named arrays (state_dict, ``velocity.*``) -> canonical arrays; packed LSTM
    arrays are cut into the per-gate arrays of eqs. 2-7."""
    out: Arrays = {}
    h = cfg.lstm_units
    for spec, canon, nat, chunk, _, from_native in _torch_pairs(cfg, with_velocity):
        if nat not in native:
            raise CheckpointError(f"{where}: array {nat} is missing")
        a = np.asarray(native[nat])
        if chunk is not None:
            if a.shape[-1] != 4 * h:
                raise CheckpointError(
                    f"{where}: array {nat} has shape {tuple(a.shape)}, expected last axis {4 * h}")
            a = np.ascontiguousarray(a[..., chunk * h:(chunk + 1) * h])
        b = from_native(a)
        _check(b, spec.shape, canon, where)
        out[canon] = b
    return out


def canonical_to_torch(cfg: ModelConfig, canonical: Arrays, with_velocity: bool = True,
                       where: str = "checkpoint") -> Arrays:
    """Canonical arrays -> PyTorch-named arrays; per-gate LSTM arrays are packed i, f, c, o."""
    out: Arrays = {}
    packed: Dict[str, list] = {}
    for spec, canon, nat, chunk, to_native, _ in _torch_pairs(cfg, with_velocity):
        if canon not in canonical:
            raise CheckpointError(f"{where}: array {canon} is missing")
        a = np.asarray(canonical[canon])
        _check(a, spec.shape, canon, where)
        if chunk is None:
            out[nat] = to_native(a)
        else:
            packed.setdefault(nat, [None] * len(LSTM_GATES))[chunk] = a
    for nat, parts in packed.items():
        out[nat] = np.concatenate(parts, axis=-1)
    return out


def torch_roles(cfg: ModelConfig) -> Dict[str, str]:
    """PyTorch native name -> :class:`crmn.naming.ParamSpec` role (packed LSTM arrays once):
    where the PyTorch backend reads which arrays get weight decay."""
    return {_torch_entry(cfg, s)[0]: s.role for s in param_specs(cfg)}
