"""One seed, one initial state in both backends (crmn.init, docs/spec.md §4).

(a) the Theano and the PyTorch backend hold bit-identical canonical state right after they are
built; (b) the distributions are those docs/spec.md §4 names; (c) the state is a function of the
seed (and each array's stream of its own name only); (d) the first training epoch gives
the same loss in both backends, through the loop's API and through the ``smoke`` command.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the current environment has no torch


import original  # noqa: F401  (Theano's compat bridges before anything imports Lasagne)
import theano
from crmn import registry
from crmn.registry import BackendOptions
from crmn import train as trainer
from crmn.config import ModelConfig, TrainConfig
from crmn.convert import canonical_to_torch, lasagne_to_canonical, torch_to_canonical
from crmn.data import BatchSampler
from crmn.errors import ConfigError
from crmn.init import initial_state, orthogonal
from crmn.naming import LSTM_GATES, param_specs, velocity_name

ROOT = Path(__file__).resolve().parents[1]
TINY = {f"{'crmn' if memory else 'resnet'}-{dense}":
        ModelConfig(n=1, k=0.5, classes=10, memory=memory, dense_init=dense)
        for memory in (True, False) for dense in ("he", "glorot")}
#: larger than the tiny nets, for the statistics: conv filters up to 128·128·9 weights
LARGE = ModelConfig(n=2, k=2, classes=100, memory=True, forget_bias=-3.0, gate_bias=0.5)


def _random_names(model):
    """Canonical names of the arrays drawn at random (not constants)."""
    return [s.name for s in param_specs(model)
            if s.role in ("conv", "lstm_Wx", "lstm_Wh", "lstm_peephole", "dense_W")]


# --- (a) both backends start bit-identical -----------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", sorted(TINY))
def test_both_backends_hold_the_same_initial_state(name, dtype):
    model, train = TINY[name], TrainConfig(batch_size=10, seed=5)
    theano_be = registry.build(BackendOptions("theano", dtype=dtype), model, train)
    torch_be = registry.build(BackendOptions("torch", dtype=dtype), model, train)
    a, b = theano_be.get_state(), torch_be.get_state()
    want = {k: v.astype(dtype) for k, v in initial_state(model, 5).items()}
    assert sorted(a) == sorted(b) == sorted(want)
    for k in want:
        assert a[k].dtype == b[k].dtype == np.dtype(dtype), k
        assert np.array_equal(a[k], want[k]), f"theano {k}"
        assert np.array_equal(b[k], want[k]), f"torch {k}"
    # the Theano state in the torch layout equals the torch module's own tensors
    native = canonical_to_torch(model, a)
    mine = {k: t.detach() for k, t in torch_be.net.state_dict().items()}
    mine.update({velocity_name(n): v for n, v in zip(torch_be.names, torch_be.velocity)})
    assert sorted(mine) == sorted(native)
    for k, t in mine.items():
        assert torch.equal(torch.from_numpy(native[k]), t), k


def test_standalone_builders_start_from_crmn_init():
    """``original.model.build`` and ``modern.model.build`` alone (no backend) load it too."""
    from modern import model as mmodel
    from original import model as omodel

    model = TINY["crmn-he"]
    want = initial_state(model, 3)
    with theano.config.change_flags(floatX="float64"):
        out = omodel.build(model, seed=3)
    native = {k: p.get_value() for k, p in omodel.native_params(out).items()}
    got = lasagne_to_canonical(model, native, with_velocity=False)
    assert all(np.array_equal(got[k], want[k]) for k in got)
    net = mmodel.build(model, seed=3)  # float32
    native = {k: t.numpy() for k, t in net.state_dict().items()}
    got = torch_to_canonical(model, native, with_velocity=False)
    assert all(np.array_equal(got[k], want[k].astype(np.float32)) for k in got)
    net.double().reset_parameters(3)  # in float64: the exact values
    native = {k: t.numpy() for k, t in net.state_dict().items()}
    got = torch_to_canonical(model, native, with_velocity=False)
    assert all(np.array_equal(got[k], want[k]) for k in got)


# --- (b) the distributions of docs/spec.md §4 -----------------------------------------------

@pytest.fixture(scope="module")
def large():
    return initial_state(LARGE, 0)


def test_conv_filters_are_he_normal(large):
    convs = [s for s in param_specs(LARGE) if s.role == "conv"]
    assert len(convs) == 1 + 6 * LARGE.n
    for s in convs:
        w = large[s.name]  # (O, I, 3, 3)
        fan_in = s.shape[1] * 9
        if w.size >= 10_000:  # the stem's 3·3·3·32 = 864 weights are too few for 3 %
            assert abs(w.std() / np.sqrt(2.0 / fan_in) - 1) < 0.03, s.name
            assert abs(w.mean()) < 0.03 * np.sqrt(2.0 / fan_in), s.name
    # the largest stage: 128·128·9 = 147,456 normal draws, kurtosis of a normal (3)
    w = large["s3b1.conv2.W"]
    z = w / w.std()
    assert abs(np.mean(z ** 4) - 3) < 0.1


def test_batch_norm_lstm_constants_and_velocities(large):
    H = LARGE.lstm_units
    for s in param_specs(LARGE):
        a = large[s.name]
        if s.role in ("bn_gamma", "bn_inv_std"):
            assert np.all(a == 1), s.name
        elif s.role in ("bn_beta", "bn_mean", "lstm_init", "dense_b"):
            assert not a.any(), s.name
        if s.trainable:
            v = large[velocity_name(s.name)]
            assert v.shape == s.shape and v.dtype == np.float64 and not v.any(), s.name
    assert np.all(large["lstm.b_f"] == -3.0)
    for g in ("i", "c", "o"):
        assert np.all(large[f"lstm.b_{g}"] == 0.5), g
    assert large["lstm.h0"].shape == large["lstm.c0"].shape == (H,)
    assert set(large) == ({s.name for s in param_specs(LARGE)}
                          | {velocity_name(s.name) for s in param_specs(LARGE) if s.trainable})
    assert all(a.dtype == np.float64 for a in large.values())


def test_lstm_weights_are_orthogonal_per_gate(large):
    I, H = LARGE.lstm_input, LARGE.lstm_units
    eye = np.eye(H)
    for g in LSTM_GATES:
        wx, wh = large[f"lstm.W_x{g}"], large[f"lstm.W_h{g}"]
        assert wx.shape == (I, H) and wh.shape == (H, H)
        np.testing.assert_allclose(wx.T @ wx, eye, atol=1e-10)  # orthonormal columns
        np.testing.assert_allclose(wh.T @ wh, eye, atol=1e-10)
        np.testing.assert_allclose(wh @ wh.T, eye, atol=1e-10)
    # one matrix per gate, not one (I, 4H) matrix cut in four: the packed (H, 4H) W_h of
    # the torch backend is then not row-orthonormal (its rows have norm 2)
    packed = np.concatenate([large[f"lstm.W_h{g}"] for g in LSTM_GATES], axis=1)
    np.testing.assert_allclose(np.linalg.norm(packed, axis=1), 2.0, atol=1e-10)
    assert not np.allclose(large["lstm.W_xi"], large["lstm.W_xf"])


def test_orthogonal_wide_and_haar():
    rng = np.random.default_rng(0)
    w = orthogonal(rng, 5, 8)  # wide: orthonormal rows
    np.testing.assert_allclose(w @ w.T, np.eye(5), atol=1e-12)
    # Haar: E[q_00] = 0. An unsigned QR gives q_00 = a_00 / r_00 of one sign every time.
    q00 = [orthogonal(rng, 4, 4)[0, 0] for _ in range(400)]
    assert abs(np.mean(q00)) < 0.1
    assert 0.2 < np.mean(np.square(q00)) < 0.3  # E[q_00²] = 1/4 (a unit vector's entry)


def test_peepholes_are_normal_with_std_0_1():
    draws = np.concatenate([initial_state(TINY["crmn-he"], s)[f"lstm.w_c{g}"]
                            for s in range(20) for g in ("i", "f", "o")])  # 6000 values
    assert abs(draws.std() / 0.1 - 1) < 0.05 and abs(draws.mean()) < 0.005


@pytest.mark.parametrize("dense", ["he", "glorot"])
def test_dense_init(dense):
    model = ModelConfig(n=1, k=2, classes=100, memory=True, dense_init=dense)
    w = initial_state(model, 1)["fc.W"]  # (64k + H, classes) = (228, 100)
    fan_in, fan_out = w.shape
    assert (fan_in, fan_out) == (128 + 100, 100)
    if dense == "he":  # N(0, 1 / fan_in), gain 1
        assert abs(w.std() / np.sqrt(1.0 / fan_in) - 1) < 0.03
        assert np.abs(w).max() > np.sqrt(3.0 / fan_in)  # normal tails beyond a uniform's
    else:  # U(-a, a), a = sqrt(6 / (fan_in + fan_out))
        a = np.sqrt(6.0 / (fan_in + fan_out))
        assert np.abs(w).max() <= a and np.abs(w).max() > 0.99 * a
        assert abs(w.std() / (a / np.sqrt(3)) - 1) < 0.03
        hist, _ = np.histogram(w, bins=4, range=(-a, a))  # flat: 5700 per quarter
        assert hist.min() > 0.9 * hist.mean()


# --- (c) a function of the seed ----------------------------------------------------------------

def test_same_seed_same_state_other_seed_other_state():
    model = TINY["crmn-he"]
    a, b, c = initial_state(model, 7), initial_state(model, 7), initial_state(model, 8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for k in _random_names(model):
        assert not np.array_equal(a[k], c[k]), k
        assert not (a[k] == c[k]).any(), k  # not one value in common


def test_each_array_has_its_own_stream():
    """An array's values depend on the seed and its name only: options that add or remove
    arrays, or change another array's distribution, leave it as it was."""
    crmn = initial_state(TINY["crmn-he"], 2)
    for other in (initial_state(TINY["resnet-he"], 2),  # no LSTM at all
                  initial_state(ModelConfig(n=1, k=0.5, classes=10, memory=True,
                                            peepholes=False, dense_init="glorot"), 2)):
        shared = [k for k in other if k in crmn and not k.endswith("fc.W")]
        assert any(k.startswith("s3b0.conv2") for k in shared)
        for k in shared:
            assert np.array_equal(other[k], crmn[k]), k
    # a deeper network keeps the shallower one's block 0 filters
    deeper = initial_state(ModelConfig(n=2, k=0.5, classes=10, memory=True), 2)
    assert np.array_equal(deeper["s2b0.conv1.W"], crmn["s2b0.conv1.W"])
    # and no two arrays share a stream
    assert not np.allclose(crmn["s1b0.conv1.W"], crmn["s1b0.conv2.W"])


@pytest.mark.parametrize("seed", [-1, 1.5, True, "3", None])
def test_bad_seed_is_one_line_config_error(seed):
    with pytest.raises(ConfigError, match="seed") as err:
        initial_state(TINY["crmn-he"], seed)
    assert "\n" not in str(err.value)


def test_bad_model_is_one_line_config_error():
    with pytest.raises(ConfigError, match="ModelConfig"):
        initial_state({"n": 1, "k": 0.5}, 0)


# --- (d) the same first epoch in both backends -------------------------------------------------

def _synthetic(n, seed):
    """CIFAR-shaped float32 images around 10 class templates."""
    r = np.random.RandomState(seed)
    templates = np.random.RandomState(99).randn(10, 3, 32, 32)
    y = r.randint(0, 10, n).astype(np.int64)
    return (templates[y] + 0.5 * r.randn(n, 3, 32, 32)).astype(np.float32), y


@pytest.mark.parametrize("name, dtype, rtol", [("crmn-he", "float32", 1e-5),
                                               ("resnet-he", "float64", 1e-9)])
@pytest.mark.slow
def test_first_epoch_loss_agrees_through_the_loop(name, dtype, rtol):
    model = TINY[name]
    train = TrainConfig(batch_size=20, seed=0)
    x, y = _synthetic(100, seed=1)
    losses = {}
    for kind in ("theano", "torch"):
        backend = registry.build(BackendOptions(kind, dtype=dtype), model, train)
        sampler = BatchSampler(x, y, batch_size=20, seed=0)
        losses[kind] = trainer.train_epoch(backend, sampler, 1, lr=0.1).loss
    assert np.isfinite(losses["theano"])
    assert losses["theano"] == pytest.approx(losses["torch"], rel=rtol), losses


def _first_log_line(out_dir: Path) -> dict:
    log = out_dir / "smoke" / "tiny-crmn-n1-k0.5" / "seed0" / "log.jsonl"
    return json.loads(log.read_text().splitlines()[0])


@pytest.mark.slow
def test_smoke_runs_of_both_backends_have_the_same_first_epoch_loss(tmp_path):
    """``run_experiments.sh smoke --backend theano`` and ``--backend torch`` (default seed,
    float32): the first epoch's training loss agrees to 1e-5 (it differed by 0.7 % when
    each backend drew its own weights: 4.6134 vs 4.5811)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    first = {}
    for backend in ("theano", "torch"):
        out = tmp_path / backend
        proc = subprocess.run(
            [sys.executable, "-m", "crmn.cli", "smoke", "--backend", backend, "--no-progress",
             "--out-dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        first[backend] = _first_log_line(out)
    th, to = first["theano"], first["torch"]
    assert th["phase"] == to["phase"] == "search" and th["epoch"] == to["epoch"] == 1
    assert th["train_loss"] == pytest.approx(to["train_loss"], rel=1e-5), (th, to)
