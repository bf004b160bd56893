"""An independent float64 numpy LSTM: the paper's equations 2-7, for checking both backends.

Written straight from section 3.2 of Moniz & Pal (2016), with no framework involved, so that
``original/`` (Lasagne's ``LSTMLayer``) and ``modern/`` (the PyTorch port) are each compared
with the equations rather than with one another:

    i_l = σ(W_xi x_l + W_hi h_{l-1} + w_ci ⊙ c_{l-1} + b_i)          (2)
    f_l = σ(W_xf x_l + W_hf h_{l-1} + w_cf ⊙ c_{l-1} + b_f)          (3)
    o_l = σ_o(W_xo x_l + W_ho h_{l-1} + w_co ⊙ c_l + b_o)            (4)
    c_l = f_l ⊙ c_{l-1} + i_l ⊙ s_l                                  (5)
    s_l = tanh(W_xc x_l + W_hc h_{l-1} + b_c)                        (6)
    h_l = o_l ⊙ tanh(c_l)                                            (7)

Note that the output gate's peephole (4) reads the *new* cell c_l, the input and forget
gates' (2, 3) the previous one. ``σ_o`` is the logistic function (eq. 4) or tanh (the text);
docs/spec.md §4 picks logistic by default. Row-vector convention as in ``crmn.naming``: ``x W``.
"""
from __future__ import annotations

from typing import Dict

import numpy as np


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # written in the form that cannot overflow exp() for large |z|
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def lstm_forward(x: np.ndarray, params: Dict[str, np.ndarray],
                 outgate: str = "logistic") -> np.ndarray:
    """Run the peephole LSTM of eqs. 2-7 over a batch of sequences, in float64.

    Parameters
    ----------
    x : ndarray, shape (B, T, I)
        Input sequences (for CRMN: the 3n pooled, zero-padded block outputs, shallow first).
    params : dict of ndarray
        Canonical names of :mod:`crmn.naming`, with or without the ``"lstm."`` prefix:
        ``W_x{g}`` (I, H), ``W_h{g}`` (H, H), ``b_{g}`` (H,) for g in i, f, c, o;
        peepholes ``w_ci, w_cf, w_co`` (H,) (all three absent: no peepholes);
        initial states ``h0, c0`` (H,) (absent: zeros).
    outgate : {"logistic", "tanh"}
        Nonlinearity σ_o of the output gate, eq. 4.

    Returns
    -------
    h : ndarray, shape (B, T, H)
        Hidden state after every step; ``h[:, -1]`` is what CRMN's softmax reads.
    """
    if outgate not in ("logistic", "tanh"):
        raise ValueError(f"outgate must be 'logistic' or 'tanh', got {outgate!r}")
    p = {k[len("lstm."):] if k.startswith("lstm.") else k: np.asarray(v, dtype=np.float64)
         for k, v in params.items()}
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"x must be (B, T, I), got shape {x.shape}")
    B, T, _ = x.shape
    H = p["b_i"].shape[0]
    sigma_o = _sigmoid if outgate == "logistic" else np.tanh
    zero = np.zeros(H)
    w_ci, w_cf, w_co = (p.get(f"w_c{g}", zero) for g in "ifo")
    h = np.broadcast_to(p.get("h0", zero), (B, H)).copy()
    c = np.broadcast_to(p.get("c0", zero), (B, H)).copy()
    out = np.empty((B, T, H))
    for t in range(T):
        xt = x[:, t]

        def pre(g):  # W_xg x_l + W_hg h_{l-1} + b_g, shared by all four gates
            return xt @ p[f"W_x{g}"] + h @ p[f"W_h{g}"] + p[f"b_{g}"]

        i = _sigmoid(pre("i") + w_ci * c)  # (2)
        f = _sigmoid(pre("f") + w_cf * c)  # (3)
        s = np.tanh(pre("c"))  # (6)
        c = f * c + i * s  # (5)
        o = sigma_o(pre("o") + w_co * c)  # (4): peephole on the new cell
        h = o * np.tanh(c)  # (7)
        out[:, t] = h
    return out
