"""The initial weights of a network, drawn once in numpy for both backends (docs/spec.md §4).

Both builders load :func:`initial_state`, so one seed means one starting point in both
backends, bit for bit. Per :class:`crmn.naming.ParamSpec` role, in canonical layouts
(``fan_in``: the inputs of one output unit):

========================  ==============================================================
role (canonical shape)    initial value
========================  ==============================================================
``conv`` (O, I, 3, 3)     He normal: N(0, 2 / fan_in), fan_in = I·3·3
``bn_*`` (C,)             γ 1, β 0; running mean 0, inv_std 1
``lstm_Wx``, ``lstm_Wh``  orthogonal (Saxe et al. 2014), one matrix per gate i, f, c, o
``lstm_b`` (H,)           ``forget_bias`` for the forget gate, ``gate_bias`` for i, c, o
``lstm_peephole`` (H,)    N(0, 0.1²): Lasagne's ``Gate`` default ``W_cell=Normal(0.1)``
``lstm_init`` (H,)        0 (learned h0 and c0)
``dense_W`` (F, K)        ``"he"``: N(0, 1 / F); ``"glorot"``: U(-a, a), a = sqrt(6 / (F + K))
``dense_b``, velocities   0
========================  ==============================================================

Each array has its own stream, ``SeedSequence(seed, spawn_key=<bytes of its name>)``, so its
values depend only on the seed and its name: another option or depth leaves the others as
they were. numpy's PCG64 normal and uniform samplers give the same numbers from 1.17 to 2.x.
"""
from __future__ import annotations

import numbers
from typing import Dict

import numpy as np

from crmn.config import ModelConfig
from crmn.errors import ConfigError
from crmn.naming import ParamSpec, param_specs, velocity_name

#: standard deviation of the peephole weights (Lasagne's ``Gate(W_cell=Normal(0.1))``)
PEEPHOLE_STD = 0.1
#: gain of the convolutions' He-normal init: sqrt(2) for the ReLUs that follow
CONV_GAIN = np.sqrt(2.0)


def array_rng(seed: int, name: str) -> np.random.Generator:
    """The random stream of the array called ``name`` (canonical) under ``seed``."""
    return np.random.default_rng(
        np.random.SeedSequence(seed, spawn_key=tuple(name.encode("utf-8"))))


def he_normal(rng: np.random.Generator, shape, fan_in: int, gain: float) -> np.ndarray:
    """N(0, (gain / sqrt(fan_in))²) of ``shape`` (He et al. 2015, Lasagne's ``HeNormal``)."""
    return rng.standard_normal(shape) * (gain / np.sqrt(fan_in))


def glorot_uniform(rng: np.random.Generator, shape, fan_in: int, fan_out: int) -> np.ndarray:
    """U(-a, a) of ``shape``, a = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010)."""
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, shape)


def orthogonal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) matrix with orthonormal columns (rows ≥ cols) or rows (rows < cols):
    Lasagne's reading of Saxe et al. (2014), gain 1. Haar-distributed (Mezzadri 2007): Q of
    a standard-normal matrix's QR, its column signs fixed by R's diagonal."""
    a = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)  # q: (max, min), orthonormal columns
    q = q * np.where(np.diagonal(r) < 0, -1.0, 1.0)  # (max, min)
    return q if rows >= cols else q.T


def _draw(spec: ParamSpec, model: ModelConfig, seed: int) -> np.ndarray:
    """The initial value of one canonical array (see the module docstring's table)."""
    shape, role = spec.shape, spec.role
    if role in ("bn_gamma", "bn_inv_std"):
        return np.ones(shape)
    if role in ("bn_beta", "bn_mean", "lstm_init", "dense_b"):
        return np.zeros(shape)
    if role == "lstm_b":  # lstm.b_f is the forget gate's (naming.LSTM_GATES)
        return np.full(shape, model.forget_bias if spec.name == "lstm.b_f" else model.gate_bias)
    rng = array_rng(seed, spec.name)
    if role == "conv":  # (O, I, 3, 3)
        return he_normal(rng, shape, fan_in=shape[1] * shape[2] * shape[3], gain=CONV_GAIN)
    if role in ("lstm_Wx", "lstm_Wh"):  # (I, H) / (H, H), one per gate
        return orthogonal(rng, *shape)
    if role == "lstm_peephole":
        return rng.standard_normal(shape) * PEEPHOLE_STD
    if role == "dense_W":  # (F, K): y = x W + b
        if model.dense_init == "he":
            return he_normal(rng, shape, fan_in=shape[0], gain=1.0)
        return glorot_uniform(rng, shape, fan_in=shape[0], fan_out=shape[1])
    raise AssertionError(f"no initialiser for role {role!r} of {spec.name}")  # pragma: no cover


def initial_state(model: ModelConfig, seed: int) -> Dict[str, np.ndarray]:
    """Every array of ``model``'s canonical state, initialised from ``seed`` (>= 0).

    float64 arrays under canonical names and shapes (:func:`crmn.naming.param_specs`) plus
    ``velocity.<name>`` zeros for each trainable array: what a backend's ``set_state()``
    accepts. ConfigError when ``model`` is not a ModelConfig or ``seed`` not an int >= 0.
    """
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

