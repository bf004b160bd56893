"""CRMN and its ResNet baseline as Lasagne 0.1 networks (paper section 3.2, docs/spec.md §4);
layer names give :mod:`crmn.convert`'s native names (``s1b0.bn2.inv_std``). ``python -m
original.model`` prints the parameter counts of every paper row."""
from __future__ import annotations

import numpy as np

import lasagne
from lasagne import init, nonlinearities
from lasagne.layers import (ConcatLayer, Conv2DLayer, DenseLayer,
                            ElemwiseSumLayer, GlobalPoolLayer, Gate, InputLayer,
                            NonlinearityLayer, ReshapeLayer, SliceLayer)

from crmn.config import ModelConfig
from crmn.convert import canonical_to_lasagne
from crmn.init import initial_state
from crmn.naming import block_names
from original.compat import graph_settings
from original.layers import BatchNormLayer, PeepholeLSTMLayer, ShortcutALayer, crmn_tap

#: He-normal with gain √2 for the ReLU convolutions (He et al. 2015, docs/spec.md §4)
CONV_INIT = init.HeNormal(gain="relu")


def _conv_bn(incoming, num_filters, stride, name, relu):
    """3×3 conv (pad 1, no bias) → BN [→ ReLU] (docs/spec.md §4): ``conv1`` -> ``bn1``."""
    conv = Conv2DLayer(incoming, num_filters, (3, 3), stride=(stride, stride), pad=1,
                       W=CONV_INIT, b=None, nonlinearity=None, name=name)
    bn = BatchNormLayer(conv, name=name.replace("conv", "bn"))
    return NonlinearityLayer(bn, nonlinearities.rectify, name=bn.name + "_nonlin") if relu else bn


def basic_block(incoming, num_filters, stride, name):
    """Post-activation basic block (He et al. 2015): conv-BN-ReLU-conv-BN + shortcut, ReLU."""
    residual = _conv_bn(incoming, num_filters, stride, f"{name}.conv1", relu=True)
    residual = _conv_bn(residual, num_filters, 1, f"{name}.conv2", relu=False)
    shortcut = incoming
    if stride != 1 or incoming.output_shape[1] != num_filters:
        shortcut = ShortcutALayer(incoming, num_filters, stride, name=f"{name}.shortcut")
    added = ElemwiseSumLayer([residual, shortcut], name=f"{name}.add")
    return NonlinearityLayer(added, nonlinearities.rectify, name=f"{name}.out")


def _lstm(incoming, cfg: ModelConfig, unroll_scan: bool = True):
    """The peephole LSTM (eqs. 2-7), (B, 3n, I) -> (B, 3n, H): orthogonal weights (Saxe et
    al.), peepholes Lasagne's ``Normal(0.1)``, learned h0 and c0."""
    out_nl = nonlinearities.sigmoid if cfg.outgate == "logistic" else nonlinearities.tanh

    def gate(bias, nonlinearity=nonlinearities.sigmoid, peephole=True):
        kw = {} if peephole else {"W_cell": None}
        return Gate(W_in=init.Orthogonal(), W_hid=init.Orthogonal(), b=init.Constant(bias),
                    nonlinearity=nonlinearity, **kw)

    return PeepholeLSTMLayer(
        incoming, cfg.lstm_units,
        ingate=gate(cfg.gate_bias),
        forgetgate=gate(cfg.forget_bias),
        cell=gate(cfg.gate_bias, nonlinearities.tanh, peephole=False),  # s_l, eq. 6
        outgate=gate(cfg.gate_bias, out_nl),
        nonlinearity=nonlinearities.tanh,  # σ_h of eq. 7
        cell_init=init.Constant(0.), hid_init=init.Constant(0.), learn_init=True,
        peepholes=cfg.peepholes, unroll_scan=unroll_scan, name="lstm")


def build(cfg: ModelConfig, seed: int = 0, input_var=None):
    """The softmax output layer of ``cfg``'s network (its ``input_layer``: the logits, "fc"),
    holding :func:`crmn.init.initial_state` of ``(cfg, seed)`` as ``modern/``'s does."""
    with graph_settings():
        lasagne.random.set_rng(np.random.RandomState(seed))
        w1, w2, w3 = cfg.widths
        net = InputLayer((None, 3, 32, 32), input_var=input_var, name="input")
        net = _conv_bn(net, w1, 1, "conv0", relu=True)  # (B, 16k, 32, 32)
        names = iter(block_names(cfg))
        taps = []
        for stage, width in zip((1, 2, 3), (w1, w2, w3)):
            for b in range(cfg.n):
                stride = 2 if stage > 1 and b == 0 else 1
                name = next(names)
                net = basic_block(net, width, stride, name)  # (B, width, 32/2^(stage-1), ...)
                if cfg.memory:
                    taps.append(crmn_tap(net, cfg.lstm_input, name=f"{name}.tap"))  # (B, I)
        features = GlobalPoolLayer(net, name="gap")  # (B, 64k)
        if cfg.memory:
            seq = ConcatLayer(taps, axis=1, name="taps")  # (B, 3n·I), shallow first
            seq = ReshapeLayer(seq, ([0], cfg.taps, cfg.lstm_input), name="seq")  # (B, 3n, I)
            hid = _lstm(seq, cfg)  # (B, 3n, H)
            h_last = SliceLayer(hid, indices=-1, axis=1, name="h_last")  # (B, H)
            features = ConcatLayer([features, h_last], axis=1, name="features")  # (B, 64k + H)
        dense_w = init.HeNormal(gain=1.0) if cfg.dense_init == "he" else init.GlorotUniform()
        logits = DenseLayer(features, cfg.classes, W=dense_w, b=init.Constant(0.),
                            nonlinearity=None, name="fc")  # (B, classes)
        out = NonlinearityLayer(logits, nonlinearities.softmax, name="softmax")
        native = canonical_to_lasagne(cfg, initial_state(cfg, seed), with_velocity=False,
                                      where="crmn.init")
        params = native_params(out)
        if set(native) != set(params):  # pragma: no cover - one naming for builder, convert
            raise AssertionError(f"initial state and network differ: "
                                 f"{set(native) ^ set(params)}")
        for name, value in native.items():
            params[name].set_value(np.asarray(value, dtype=params[name].dtype))
    return out


def native_params(output_layer):
    """``{Lasagne name: shared variable}`` of every array, in network order."""
    params = lasagne.layers.get_all_params(output_layer)
    out = {p.name: p for p in params}
    if len(out) != len(params) or None in out:
        raise AssertionError("Lasagne parameter names are missing or not unique")
    return out


if __name__ == "__main__":  # pragma: no cover - a printout for checking the counts by eye
    from crmn import paper

    for row in paper.ROWS:
        cfg = ModelConfig.for_row(row)
        count = lasagne.layers.count_params(build(cfg), trainable=True)
        published = "" if row.paper_params_m is None else f"  paper {row.paper_params_m} M"
        print(f"{row.id:24s} {row.label:18s} {count / 1e6:7.2f} M{published}")
