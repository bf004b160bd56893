"""The canonical names and layouts of every array, shared by both backends and the checkpoint.

Convolution ``W`` (out, in, 3, 3) as cross-correlation; dense ``W`` (in, out), ``y = x W + b``;
LSTM (eqs. 2-7) per gate g in i, f, c, o ``W_xg`` (I, H), ``W_hg`` (H, H), ``b_g`` (H,); batch
norm ``gamma, beta`` and the running ``mean, inv_std`` (Lasagne's convention)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

from crmn.config import ModelConfig

BN_EPS = 1e-4  # added to the batch variance (Lasagne's BatchNormLayer default)
BN_ALPHA = 0.1  # running-average rate: running = (1 - alpha) running + alpha batch

LSTM_GATES = ("i", "f", "c", "o")  # input gate, forget gate, cell input, output gate
PEEPHOLES = ("i", "f", "o")  # eqs. 2-4

#: roles whose arrays get weight decay (Lasagne's ``regularizable`` tag, docs/spec.md §4)
DECAYED_ROLES = frozenset({"conv", "lstm_Wx", "lstm_Wh", "dense_W"})
#: roles that are state, not trainable parameters
STATE_ROLES = frozenset({"bn_mean", "bn_inv_std"})


@dataclass(frozen=True)
class ParamSpec:
    name: str  # canonical name, e.g. "s2b0.conv1.W"
    shape: Tuple[int, ...]  # canonical layout
    role: str  # conv, bn_{gamma,beta,mean,inv_std}, lstm_{Wx,Wh,b,peephole,init}, dense_{W,b}

    @property
    def trainable(self) -> bool:
        return self.role not in STATE_ROLES

    @property
    def decayed(self) -> bool:
        return self.role in DECAYED_ROLES

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _bn(prefix: str, c: int) -> List[ParamSpec]:
    return [ParamSpec(f"{prefix}.{leaf}", (c,), f"bn_{leaf}")
            for leaf in ("gamma", "beta", "mean", "inv_std")]


def block_names(cfg: ModelConfig) -> List[str]:
    """Basic-block prefixes in network order: s1b0 ... s3b{n-1}; also the LSTM's tap order."""
    return [f"s{s}b{b}" for s in (1, 2, 3) for b in range(cfg.n)]


def param_specs(cfg: ModelConfig) -> List[ParamSpec]:
    """Every array in canonical order: ``conv0``, ``bn0``, ``s{stage}b{block}.conv{1,2}`` and
    ``.bn{1,2}``, ``lstm.*`` (peepholes ``w_ci, w_cf, w_co``, ``h0, c0``), ``fc.W``, ``fc.b``."""
    w1, w2, w3 = cfg.widths
    specs = [ParamSpec("conv0.W", (w1, 3, 3, 3), "conv")] + _bn("bn0", w1)
    c_in = w1
    for stage, c_out in zip((1, 2, 3), (w1, w2, w3)):
        for b in range(cfg.n):
            p = f"s{stage}b{b}"
            specs += [ParamSpec(f"{p}.conv1.W", (c_out, c_in, 3, 3), "conv"),
                      *_bn(f"{p}.bn1", c_out),
                      ParamSpec(f"{p}.conv2.W", (c_out, c_out, 3, 3), "conv"),
                      *_bn(f"{p}.bn2", c_out)]
            c_in = c_out
    fc_in = w3
    if cfg.memory:
        i, h = cfg.lstm_input, cfg.lstm_units
        for g in LSTM_GATES:
            specs += [ParamSpec(f"lstm.W_x{g}", (i, h), "lstm_Wx"),
                      ParamSpec(f"lstm.W_h{g}", (h, h), "lstm_Wh"),
                      ParamSpec(f"lstm.b_{g}", (h,), "lstm_b")]
        specs += [ParamSpec(f"lstm.w_c{g}", (h,), "lstm_peephole")
                  for g in (PEEPHOLES if cfg.peepholes else ())]
        specs += [ParamSpec(f"lstm.{s}", (h,), "lstm_init") for s in ("h0", "c0")]
        fc_in += h
    return specs + [ParamSpec("fc.W", (fc_in, cfg.classes), "dense_W"),
                    ParamSpec("fc.b", (cfg.classes,), "dense_b")]


def spec_dict(cfg: ModelConfig) -> Dict[str, ParamSpec]:
    return {s.name: s for s in param_specs(cfg)}


def count_trainable(cfg: ModelConfig) -> int:
    """Trainable parameters (conv W, BN γ β, LSTM, dense: docs/spec.md §4), no running stats."""
    return sum(s.size for s in param_specs(cfg) if s.trainable)


def velocity_name(name: str) -> str:
    return f"velocity.{name}"
