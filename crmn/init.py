"""The initial weights of a network, drawn once in numpy for both stacks (SPEC §4).

Both builders, :func:`original.model.build` and :func:`modern.model.build`, load their
initial arrays from :func:`initial_state`, so one ``seed`` means one starting point in the
Theano and the PyTorch stack, bit for bit (issue #14, item 5). Only numpy is used here.

Distributions, per :class:`crmn.naming.ParamSpec` role, in the canonical layouts of
:mod:`crmn.naming` (``fan_in`` counts the inputs of one output unit):

========================  ==============================================================
role (canonical shape)    initial value
========================  ==============================================================
``conv`` (O, I, 3, 3)     He normal (He et al. 2015): N(0, 2 / fan_in), fan_in = I·3·3
``bn_gamma`` (C,)         1
``bn_beta`` (C,)          0
``bn_mean`` (C,)          0 (running mean)
``bn_inv_std`` (C,)       1 (running 1/sqrt(var + eps))
``lstm_Wx`` (I, H)        orthogonal (Saxe et al. 2014), one matrix per gate i, f, c, o
``lstm_Wh`` (H, H)        orthogonal, one matrix per gate
``lstm_b`` (H,)           ``forget_bias`` for the forget gate, ``gate_bias`` for i, c, o
``lstm_peephole`` (H,)    N(0, 0.1²): Lasagne's ``Gate`` default ``W_cell=Normal(0.1)``
``lstm_init`` (H,)        0 (learned h0 and c0)
``dense_W`` (F, K)        ``dense_init="he"``: N(0, 1 / F), He normal with gain 1,
                          fan_in = F;  ``"glorot"``: U(-a, a), a = sqrt(6 / (F + K))
                          (Glorot & Bengio 2010; fan_in F, fan_out K)
``dense_b`` (K,)          0
``velocity.<name>``       0, one per trainable array, shape of the array
========================  ==============================================================

"Orthogonal" is Lasagne's reading of Saxe et al. with gain 1: a tall matrix (rows ≥
columns) has orthonormal columns, a wide one orthonormal rows. It is drawn as the Q factor
of a standard-normal matrix with the signs of R's diagonal moved into Q, which makes it
uniform (Haar) over such matrices (Mezzadri 2007).

Each array has its own random stream, ``SeedSequence(seed, spawn_key=<bytes of its
canonical name>)``: an array's values depend only on the seed and its name, so adding,
removing or reordering arrays (another option, another depth) leaves the others unchanged.
The streams are numpy's PCG64 ``Generator``; its normal and uniform samplers have given the
same numbers from numpy 1.17 to 2.x, and both stacks call this function in one process.
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
#: gain of the convolutions' He-normal init: sqrt(2) for the ReLUs that follow (SPEC §4)
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
    """A (rows, cols) matrix with orthonormal columns (rows ≥ cols) or rows (rows < cols).

    Saxe et al. (2014), gain 1; Haar-distributed: QR of a (max, min) standard-normal
    matrix, Q's column signs fixed by R's diagonal.
    """
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
    """Every array of ``model``'s canonical state, initialised from ``seed`` (SPEC §4).

    Parameters
    ----------
    model : ModelConfig
        The network; its arrays are those of :func:`crmn.naming.param_specs`.
    seed : int
        Non-negative; ``TrainConfig.seed`` in a run.

    Returns
    -------
    dict of str to ndarray
        float64 arrays under canonical names and in canonical shapes (e.g. ``conv0.W``
        (16k, 3, 3, 3), ``lstm.W_xi`` (16k·16·16, H), ``fc.W`` (64k [+ H], classes)), plus
        ``velocity.<name>`` zeros of the same shape for each trainable array: what a
        stack's ``get_state()`` returns and its ``set_state()`` accepts.

    Raises
    ------
    ConfigError
        ``model`` is not a ModelConfig, or ``seed`` is not a non-negative integer.
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


__all__ = ["initial_state", "array_rng", "he_normal", "glorot_uniform", "orthogonal"]
