"""original/layers.py and original/model.py: shapes, numbers, parameter counts, the LSTM."""
import sys
from pathlib import Path

import numpy as np
import pytest

import original  # noqa: F401  (compat bridges first)
import lasagne
import theano
import theano.tensor as T

from crmn import paper
from crmn.config import ModelConfig
from crmn.naming import BN_ALPHA, BN_EPS, count_trainable, param_specs
from original import compat
from original import model as omodel
from original.backend import native_names
from original.layers import BatchNormLayer, ShortcutALayer, crmn_tap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_lstm import lstm_forward  # noqa: E402

F64 = theano.config.change_flags(floatX="float64")


# --- batch norm ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bn():
    """A BatchNormLayer on (B, 3, 4, 4) with non-trivial γ, β and running statistics, and
    its three compiled uses: training with updates, training without, inference."""
    r = np.random.RandomState(0)
    with F64:
        layer = BatchNormLayer((None, 3, 4, 4), gamma=r.rand(3) + 0.5, beta=r.randn(3),
                               mean=r.randn(3), inv_std=r.rand(3) + 0.5)
        x = T.tensor4("x", dtype="float64")
        fns = {
            "update": theano.function([x], layer.get_output_for(
                x, deterministic=False, batch_norm_update_averages=True)),
            "train": theano.function([x], layer.get_output_for(x, deterministic=False)),
            "infer": theano.function([x], layer.get_output_for(x, deterministic=True)),
        }
    return layer, fns


def _bn_state(layer):
    return {k: getattr(layer, k).get_value().copy() for k in ("gamma", "beta", "mean",
                                                                "inv_std")}


def test_bn_params_and_tags(bn):
    layer, _ = bn
    assert layer.epsilon == BN_EPS and layer.alpha == BN_ALPHA
    trainable = layer.get_params(trainable=True)
    assert {p.name for p in trainable} == {"beta", "gamma"}
    assert layer.get_params(regularizable=True) == []
    assert len(layer.get_params()) == 4


def test_bn_training_mode_batch_statistics_without_update(bn):
    layer, fns = bn
    x = np.random.RandomState(1).randn(5, 3, 4, 4) * 3 + 2
    s = _bn_state(layer)
    out = fns["train"](x)
    mu = x.mean(axis=(0, 2, 3))
    inv_std = 1 / np.sqrt(x.var(axis=(0, 2, 3)) + BN_EPS)  # biased variance
    c = lambda v: v[None, :, None, None]  # noqa: E731
    np.testing.assert_allclose(out, (x - c(mu)) * c(s["gamma"] * inv_std) + c(s["beta"]),
                               rtol=1e-12, atol=1e-12)
    after = _bn_state(layer)
    assert all(np.array_equal(s[k], after[k]) for k in s)


def test_bn_inference_uses_running_statistics(bn):
    layer, fns = bn
    x = np.random.RandomState(2).randn(2, 3, 4, 4)
    s = _bn_state(layer)
    c = lambda v: v[None, :, None, None]  # noqa: E731
    expected = (x - c(s["mean"])) * c(s["gamma"] * s["inv_std"]) + c(s["beta"])
    np.testing.assert_allclose(fns["infer"](x), expected, rtol=1e-12, atol=1e-12)


def test_bn_running_average_moves_exactly_once_per_call(bn):
    layer, fns = bn
    r = np.random.RandomState(3)
    for _ in range(2):
        x = r.randn(6, 3, 4, 4) * 2 - 1
        s = _bn_state(layer)
        out = fns["update"](x)
        np.testing.assert_allclose(out, fns["train"](x), rtol=1e-12)  # same normalisation
        mu = x.mean(axis=(0, 2, 3))
        inv_std = 1 / np.sqrt(x.var(axis=(0, 2, 3)) + BN_EPS)
        after = _bn_state(layer)
        np.testing.assert_allclose(after["mean"], (1 - BN_ALPHA) * s["mean"] + BN_ALPHA * mu,
                                   rtol=1e-12)
        np.testing.assert_allclose(after["inv_std"],
                                   (1 - BN_ALPHA) * s["inv_std"] + BN_ALPHA * inv_std,
                                   rtol=1e-12)
        assert np.array_equal(after["gamma"], s["gamma"])


def test_bn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        BatchNormLayer((None, 3, 4, 4), alpha=0)


# --- shortcut and tap ------------------------------------------------------------------------

def test_shortcut_a_subsamples_and_pads_both_sides():
    layer = ShortcutALayer((None, 4, 8, 8), 8, stride=2)
    assert layer.output_shape == (None, 8, 4, 4)
    assert lasagne.layers.count_params(layer) == 0
    x = T.tensor4("x", dtype="float64")
    data = np.random.RandomState(0).randn(2, 4, 8, 8)
    out = theano.function([x], layer.get_output_for(x))(data)
    assert out.shape == (2, 8, 4, 4)
    np.testing.assert_array_equal(out[:, 2:6], data[:, :, ::2, ::2])
    assert not out[:, :2].any() and not out[:, 6:].any()


def test_crmn_tap_pools_flattens_and_pads_at_the_end():
    with F64:
        layer = crmn_tap(lasagne.layers.InputLayer((None, 2, 4, 4)), 16, name="t")
        x = T.tensor4("x", dtype="float64")
        expr = lasagne.layers.get_output(layer, x)
    assert layer.output_shape == (None, 16)
    data = np.random.RandomState(0).randn(3, 2, 4, 4)
    out = theano.function([x], expr)(data)
    pooled = data.reshape(3, 2, 2, 2, 2, 2).mean(axis=(3, 5))  # 2x2 mean, stride 2
    np.testing.assert_allclose(out[:, :8], pooled.reshape(3, 8), rtol=1e-12)  # C x H x W
    assert not out[:, 8:].any()


# --- parameter counts over the paper's rows --------------------------------------------------

@pytest.mark.parametrize("row", paper.ROWS, ids=lambda r: r.id)
@pytest.mark.slow
def test_param_count_matches_naming_and_paper(row):
    cfg = ModelConfig.for_row(row)
    out = omodel.build(cfg)
    count = lasagne.layers.count_params(out, trainable=True)
    assert count == count_trainable(cfg)
    if row.paper_params_m is not None:
        assert round(count / 1e6, 2) == row.paper_params_m
    assert out.output_shape == (None, row.classes)


def test_native_names_are_exactly_what_convert_expects():
    cfg = ModelConfig(n=2, k=0.5, classes=10, memory=True)
    out = omodel.build(cfg)
    params = omodel.native_params(out)
    names = native_names(cfg)
    assert set(params) == set(names.values())
    for spec in param_specs(cfg):
        p = params[names[spec.name]]
        assert int(np.prod(p.get_value().shape)) == spec.size
        trainable = p in lasagne.layers.get_all_params(out, trainable=True)
        assert trainable == spec.trainable, spec.name


def test_init_is_seeded_and_follows_spec():
    cfg = ModelConfig(n=1, k=0.5, classes=10, memory=True, forget_bias=-3.0, gate_bias=0.5)
    a = {k: v.get_value() for k, v in omodel.native_params(omodel.build(cfg, seed=1)).items()}
    b = {k: v.get_value() for k, v in omodel.native_params(omodel.build(cfg, seed=1)).items()}
    c = {k: v.get_value() for k, v in omodel.native_params(omodel.build(cfg, seed=2)).items()}
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv0.W"], c["conv0.W"])
    assert np.all(a["lstm.b_forgetgate"] == -3.0) and np.all(a["lstm.b_ingate"] == 0.5)
    assert not a["lstm.hid_init"].any() and not a["lstm.cell_init"].any()
    w = a["lstm.W_hid_to_cell"]  # orthogonal (Saxe et al.)
    np.testing.assert_allclose(w.T @ w, np.eye(w.shape[0]), atol=1e-5)
    w = a["s1b0.conv1.W"]  # He normal, gain sqrt(2): std sqrt(2 / fan_in)
    assert abs(w.std() / np.sqrt(2.0 / (8 * 9)) - 1) < 0.1


# --- the LSTM against the numpy reference of eqs. 2-7 ---------------------------------------

@pytest.mark.parametrize("outgate, unroll", [("logistic", True), ("tanh", True),
                                             ("logistic", False)])
def test_lasagne_lstm_matches_reference(outgate, unroll):
    # k = 1/16: stage-1 width 1, so the LSTM input is 1 x 16 x 16 = 256; n = 2: 6 steps
    cfg = ModelConfig(n=2, k=0.0625, classes=10, memory=True, lstm_units=7, outgate=outgate)
    r = np.random.RandomState(4)
    with F64, compat.graph_settings():  # theano.scan's Python loop, as the backend gets it
        l_in = lasagne.layers.InputLayer((None, cfg.taps, cfg.lstm_input))
        lstm = omodel._lstm(l_in, cfg, unroll_scan=unroll)
        x = T.tensor3("x", dtype="float64")
        f = theano.function([x], lasagne.layers.get_output(lstm, x))
    names = native_names(cfg)
    canonical = {}
    for spec in param_specs(cfg):
        if spec.name.startswith("lstm."):
            value = r.randn(*spec.shape) * (0.1 if spec.role == "lstm_Wx" else 0.5)
            canonical[spec.name] = value
            native = {p.name: p for p in lstm.get_params()}[names[spec.name]]
            native.set_value(value.reshape(native.get_value().shape))
    seq = r.randn(4, cfg.taps, cfg.lstm_input)
    expected = lstm_forward(seq, canonical, outgate=outgate)  # (B, T, H)
    np.testing.assert_allclose(f(seq), expected, rtol=1e-10, atol=1e-12)


def test_lasagne_01_lstm_differs_only_by_the_outgate_peephole():
    """Why PeepholeLSTMLayer exists: plain Lasagne 0.1 adds w_co ⊙ c after σ_o."""
    cfg = ModelConfig(n=1, k=0.0625, classes=10, memory=True, lstm_units=3)
    r = np.random.RandomState(5)
    seq = r.randn(2, cfg.taps, cfg.lstm_input)
    outs = []
    for peephole_o in (0.0, 0.5):
        with F64:
            l_in = lasagne.layers.InputLayer((None, cfg.taps, cfg.lstm_input))
            ours = omodel._lstm(l_in, cfg)
            plain = lasagne.layers.LSTMLayer(l_in, cfg.lstm_units, unroll_scan=True)
            x = T.tensor3("x", dtype="float64")
            f = theano.function([x], [lasagne.layers.get_output(ours, x),
                                      lasagne.layers.get_output(plain, x)])
        for a, b in zip(ours.get_params(), plain.get_params()):
            assert a.name.split(".")[-1] == b.name
            b.set_value(a.get_value())
        ours.W_cell_to_outgate.set_value(np.full(3, peephole_o))
        plain.W_cell_to_outgate.set_value(np.full(3, peephole_o))
        outs.append(f(seq))
    np.testing.assert_allclose(outs[0][0], outs[0][1], rtol=1e-12)  # w_co = 0: identical
    assert np.abs(outs[1][0] - outs[1][1]).max() > 1e-3
