"""The initial weights of a network, drawn once in numpy for both backends (docs/spec.md §4).

Each array has its own stream, ``SeedSequence(seed, spawn_key=<bytes of its name>)``, so its
values depend only on the seed and its name (another option or depth leaves the others as they
were); numpy's PCG64 samplers give the same numbers from 1.17 to 2.x."""
from __future__ import annotations

import numbers
from typing import Dict

import numpy as np

from crmn.config import ModelConfig
from crmn.errors import ConfigError
from crmn.naming import ParamSpec, param_specs, velocity_name

PEEPHOLE_STD = 0.1  # Lasagne's Gate(W_cell=Normal(0.1))
CONV_GAIN = np.sqrt(2.0)  # He normal for the ReLUs that follow


def he_normal(rng: np.random.Generator, shape, fan_in: int, gain: float) -> np.ndarray:
    """N(0, (gain / sqrt(fan_in))²) of ``shape`` (He et al. 2015, Lasagne's ``HeNormal``)."""
    return rng.standard_normal(shape) * (gain / np.sqrt(fan_in))


def orthogonal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) matrix with orthonormal columns or rows (Saxe et al. 2014, gain 1), Haar
    distributed: Q of a normal matrix's QR, column signs fixed by R's diagonal (Mezzadri 2007)."""
    a = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)  # q: (max, min), orthonormal columns
    q = q * np.where(np.diagonal(r) < 0, -1.0, 1.0)  # (max, min)
    return q if rows >= cols else q.T


def _draw(spec: ParamSpec, model: ModelConfig, seed: int) -> np.ndarray:
    """The initial value of one canonical array, in its canonical layout."""
    shape, role = spec.shape, spec.role
    if role in ("bn_gamma", "bn_inv_std"):
        return np.ones(shape)
    if role in ("bn_beta", "bn_mean", "lstm_init", "dense_b"):
        return np.zeros(shape)
    if role == "lstm_b":  # lstm.b_f is the forget gate's (naming.LSTM_GATES)
        return np.full(shape, model.forget_bias if spec.name == "lstm.b_f" else model.gate_bias)
    rng = np.random.default_rng(
        np.random.SeedSequence(seed, spawn_key=tuple(spec.name.encode("utf-8"))))
    if role == "conv":  # (O, I, 3, 3)
        return he_normal(rng, shape, fan_in=shape[1] * shape[2] * shape[3], gain=CONV_GAIN)
    if role in ("lstm_Wx", "lstm_Wh"):  # (I, H) / (H, H), one per gate i, f, c, o
        return orthogonal(rng, *shape)
    if role == "lstm_peephole":
        return rng.standard_normal(shape) * PEEPHOLE_STD
    if role == "dense_W":  # (F, K): y = x W + b
        if model.dense_init == "he":
            return he_normal(rng, shape, fan_in=shape[0], gain=1.0)
        bound = np.sqrt(6.0 / (shape[0] + shape[1]))  # Glorot & Bengio (2010)
        return rng.uniform(-bound, bound, shape)
    raise AssertionError(f"no initialiser for role {role!r} of {spec.name}")  # pragma: no cover


def initial_state(model: ModelConfig, seed: int) -> Dict[str, np.ndarray]:
    """Every array of ``model``'s canonical state (float64) from ``seed`` >= 0, with
    ``velocity.<name>`` zeros: what a backend's ``set_state()`` accepts."""
    if not isinstance(model, ModelConfig):
        raise ConfigError(f"initial_state needs a ModelConfig, got {type(model).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"the initialisation seed must be a non-negative integer, got "
                          f"{seed!r}")
    seed = int(seed)
    state: Dict[str, np.ndarray] = {}
    for spec in param_specs(model):
        value = _draw(spec, model, seed)
        assert value.shape == spec.shape and value.dtype == np.float64, spec.name
        state[spec.name] = value
        if spec.trainable:
            state[velocity_name(spec.name)] = np.zeros(spec.shape)
    return state
