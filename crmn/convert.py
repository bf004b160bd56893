"""The one place where arrays change layout between a backend's *native* names and the
canonical names and layouts of :mod:`crmn.naming`, asserting every shape. Each mapping is a
relabelling, transpose, reshape, flip or gate slice, so a round trip is bit for bit;
``velocity.<name>`` gets the mapping of ``<name>``."""
from __future__ import annotations

from typing import Callable, Dict

import numpy as np

from crmn.config import ModelConfig
from crmn.errors import CheckpointError
from crmn.naming import LSTM_GATES, ParamSpec, param_specs, velocity_name

Arrays = Dict[str, np.ndarray]

_LASAGNE_GATE = {"i": "ingate", "f": "forgetgate", "c": "cell", "o": "outgate"}
_LASAGNE_LSTM = {"lstm_Wx": "W_in_to_", "lstm_Wh": "W_hid_to_", "lstm_b": "b_",
                 "lstm_peephole": "W_cell_to_"}
_TORCH_PACKED = {"lstm_Wx": "lstm.W_x", "lstm_Wh": "lstm.W_h", "lstm_b": "lstm.b"}


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _lasagne_entry(cfg: ModelConfig, spec: ParamSpec):
    """Lasagne's (``original/``) name and mapping: ``Conv2DLayer`` convolves (the kernel flipped);
    ``LSTMLayer`` has one array per gate (``W_in_to_ingate``, ``b_cell``, ...)."""
    name, role = spec.name, spec.role
    if role == "conv":
        flip = lambda a: np.ascontiguousarray(a[:, :, ::-1, ::-1])  # noqa: E731 (self-inverse)
        return name, None, flip, flip
    if role == "lstm_init":  # h0 / c0: canonical (H,), Lasagne (1, H)
        native = "lstm.hid_init" if name == "lstm.h0" else "lstm.cell_init"
        return native, None, (lambda a: a.reshape(1, -1)), (lambda a: a.reshape(-1))
    if role in _LASAGNE_LSTM:  # the gate is the name's last letter
        return f"lstm.{_LASAGNE_LSTM[role]}{_LASAGNE_GATE[name[-1]]}", None, _same, _same
    return name, None, _same, _same


def _torch_entry(cfg: ModelConfig, spec: ParamSpec):
    """``CIFARNet.state_dict()``'s name and mapping; the LSTM packs gates i, f, c, o (``chunk``)
    on the last axis: ``lstm.W_x`` (I, 4H), ``lstm.W_h`` (H, 4H), ``lstm.b`` (4H,)."""
    name, role = spec.name, spec.role
    if role in _TORCH_PACKED:
        return _TORCH_PACKED[role], LSTM_GATES.index(name[-1]), _same, _same
    if name.startswith("lstm."):  # peepholes, h0, c0: same names and shapes
        return name, None, _same, _same
    if name == "fc.W":
        transpose = lambda a: np.ascontiguousarray(a.T)  # noqa: E731 (self-inverse)
        return "fc.weight", None, transpose, transpose
    if name == "fc.b":
        return "fc.bias", None, _same, _same
    module, leaf = name.rsplit(".", 1)  # "s2b1.bn1", "gamma"
    if module[0] == "s":  # s{stage}b{block}.{conv,bn}{1,2} -> blocks.{(stage - 1) n + block}
        stage_block, layer = module.split(".")
        stage, block = stage_block[1:].split("b")
        module = f"blocks.{(int(stage) - 1) * cfg.n + int(block)}.{layer}"
    leaf = {"W": "weight", "gamma": "weight", "beta": "bias"}.get(leaf, leaf)
    return f"{module}.{leaf}", None, _same, _same


def _check(arr: np.ndarray, shape, what: str, where: str) -> None:
    if tuple(arr.shape) != tuple(shape):
        raise CheckpointError(
            f"{where}: array {what} has shape {tuple(arr.shape)}, expected {tuple(shape)}")


def _pairs(cfg: ModelConfig, entry: Callable, with_velocity: bool):
    """(spec, canonical name, native name, gate chunk or None, to native, to canonical)."""
    for spec in param_specs(cfg):
        native, *mapping = entry(cfg, spec)
        yield (spec, spec.name, native, *mapping)
        if with_velocity and spec.trainable:
            yield (spec, velocity_name(spec.name), velocity_name(native), *mapping)


def _to_canonical(cfg: ModelConfig, native: Arrays, entry: Callable, with_velocity: bool,
                  where: str) -> Arrays:
    out: Arrays = {}
    h = cfg.lstm_units
    for spec, canon, nat, chunk, _, from_native in _pairs(cfg, entry, with_velocity):
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


def _from_canonical(cfg: ModelConfig, canonical: Arrays, entry: Callable, with_velocity: bool,
                    where: str) -> Arrays:
    out: Arrays = {}
    packed: Dict[str, list] = {}
    for spec, canon, nat, chunk, to_native, _ in _pairs(cfg, entry, with_velocity):
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


def lasagne_to_canonical(cfg: ModelConfig, native: Arrays, with_velocity: bool = True,
                         where: str = "original/ state") -> Arrays:
    """Lasagne-named arrays (params, BN stats, ``velocity.*``) -> canonical arrays."""
    return _to_canonical(cfg, native, _lasagne_entry, with_velocity, where)


def canonical_to_lasagne(cfg: ModelConfig, canonical: Arrays, with_velocity: bool = True,
                         where: str = "checkpoint") -> Arrays:
    """Canonical arrays -> Lasagne-named arrays, shapes asserted against the config."""
    return _from_canonical(cfg, canonical, _lasagne_entry, with_velocity, where)


def torch_to_canonical(cfg: ModelConfig, native: Arrays, with_velocity: bool = True,
                       where: str = "modern/ state") -> Arrays:
    """PyTorch-named arrays -> canonical; packed LSTM arrays cut per gate (eqs. 2-7)."""
    return _to_canonical(cfg, native, _torch_entry, with_velocity, where)


def canonical_to_torch(cfg: ModelConfig, canonical: Arrays, with_velocity: bool = True,
                       where: str = "checkpoint") -> Arrays:
    """Canonical arrays -> PyTorch-named arrays; per-gate LSTM arrays packed i, f, c, o."""
    return _from_canonical(cfg, canonical, _torch_entry, with_velocity, where)


def torch_roles(cfg: ModelConfig) -> Dict[str, str]:
    """PyTorch name -> ParamSpec role (packed LSTM arrays once): which get weight decay."""
    return {_torch_entry(cfg, s)[0]: s.role for s in param_specs(cfg)}
