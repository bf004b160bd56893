"""TheanoBackend: training, BN state, momentum form, state round trips, errors.

One tiny CRMN (n=1, k=0.5, 10 classes) is compiled once per module (the compiled C modules
are cached in Theano's compile directory, so later runs compile much faster).
"""
import numpy as np
import pytest

from crmn import train as trainer
from crmn.config import ModelConfig, TrainConfig
from crmn.data import BatchSampler
from crmn.errors import CheckpointError, ConfigError
from crmn.naming import BN_ALPHA, BN_EPS, param_specs, velocity_name
from original.backend import TheanoBackend
from backend_steps import train_step

CFG = ModelConfig(n=1, k=0.5, classes=10, memory=True)
TRAIN = TrainConfig(batch_size=20, seed=3)


def synthetic(n, seed=0):
    """CIFAR-shaped images around 10 fixed class templates: learnable in a few steps."""
    r = np.random.RandomState(seed)
    templates = np.random.RandomState(99).randn(10, 3, 32, 32).astype(np.float32)
    y = r.randint(0, 10, n).astype(np.int64)
    x = templates[y] + 0.5 * r.randn(n, 3, 32, 32).astype(np.float32)
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def backend():
    return TheanoBackend(CFG, TRAIN)


@pytest.fixture(scope="module")
def fresh_state(backend):
    """The initial state, before any test trains the shared backend."""
    return backend.get_state()


def _restore(backend, state):
    backend.set_state(state)


def test_protocol_basics(backend):
    assert backend.name == "theano"
    assert backend.device.startswith("cpu")
    from crmn.naming import count_trainable

    assert backend.param_count() == count_trainable(CFG)
    state = backend.get_state()
    names = {s.name for s in param_specs(CFG)}
    names |= {velocity_name(s.name) for s in param_specs(CFG) if s.trainable}
    assert set(state) == names
    for s in param_specs(CFG):
        assert state[s.name].shape == s.shape


@pytest.mark.slow
def test_forward_train_changes_nothing_and_step_moves_bn_once(backend, fresh_state):
    _restore(backend, fresh_state)
    x, y = synthetic(8, seed=1)
    before = backend.get_state()
    backend.logits(x, training=True)
    backend.logits(x, training=False)
    after = backend.get_state()
    assert all(np.array_equal(before[k], after[k]) for k in before)

    train_step(backend, x, y, lr=0.0)  # lr 0: only the BN running averages may move
    after = backend.get_state()
    # conv0 (canonical: cross-correlation, pad 1) on the batch, in float64
    w = before["conv0.W"].astype(np.float64)
    pad = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = sum(np.einsum("bchw,oc->bohw", pad[:, :, i:i + 32, j:j + 32], w[:, :, i, j])
               for i in range(3) for j in range(3))
    mu = conv.mean(axis=(0, 2, 3))
    inv_std = 1 / np.sqrt(conv.var(axis=(0, 2, 3)) + BN_EPS)
    np.testing.assert_allclose(after["bn0.mean"],
                               (1 - BN_ALPHA) * before["bn0.mean"] + BN_ALPHA * mu,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(after["bn0.inv_std"],
                               (1 - BN_ALPHA) * before["bn0.inv_std"] + BN_ALPHA * inv_std,
                               rtol=1e-4)
    for s in param_specs(CFG):
        if s.trainable:
            assert np.array_equal(after[s.name], before[s.name]), s.name


@pytest.mark.slow
def test_momentum_is_lasagne_form(backend, fresh_state):
    """v <- mu v - lr g; p <- p + v: with lr = 0 a step moves every p by mu v exactly."""
    _restore(backend, fresh_state)
    x, y = synthetic(20, seed=2)
    train_step(backend, x, y, lr=0.05)
    s1 = backend.get_state()
    assert any(np.abs(s1[velocity_name(s.name)]).max() > 0 for s in param_specs(CFG)
               if s.trainable)
    train_step(backend, x, y, lr=0.0)
    s2 = backend.get_state()
    for s in param_specs(CFG):
        if s.trainable:
            v = velocity_name(s.name)
            np.testing.assert_allclose(s2[v], TRAIN.momentum * s1[v], rtol=1e-6, atol=1e-12)
            np.testing.assert_allclose(s2[s.name], s1[s.name] + s2[v], rtol=1e-5, atol=1e-7)
    backend.reset_velocity()
    s3 = backend.get_state()
    assert all(not s3[velocity_name(s.name)].any() for s in param_specs(CFG) if s.trainable)


@pytest.mark.slow
def test_two_epochs_reduce_training_loss(backend, fresh_state):
    _restore(backend, fresh_state)
    x, y = synthetic(200, seed=4)
    sampler = BatchSampler(x, y, batch_size=20, seed=0, pad=0)  # no crops: learnable fast
    e1 = trainer.train_epoch(backend, sampler, 1, lr=0.05)
    e2 = trainer.train_epoch(backend, sampler, 2, lr=0.05)
    assert e1.images == e2.images == 200
    assert np.isfinite(e1.loss) and e2.loss < e1.loss
    loss, acc = trainer.evaluate(backend, x, y, batch_size=64)
    assert 0 <= acc <= 1 and np.isfinite(loss)


@pytest.mark.slow
def test_state_round_trip_on_a_fresh_backend(backend, fresh_state, tmp_path):
    _restore(backend, fresh_state)
    x, y = synthetic(20, seed=5)
    for _ in range(2):  # move weights, BN statistics and velocities away from their init
        train_step(backend, x, y, lr=0.05)
    state = backend.get_state()
    other = TheanoBackend(CFG, TrainConfig(batch_size=20, seed=11))  # different init
    assert not np.allclose(other.logits(x, training=False), backend.logits(x, False))
    other.set_state(state)
    for training in (True, False):
        np.testing.assert_array_equal(other.logits(x, training), backend.logits(x, training))
    back = other.get_state()
    assert all(np.array_equal(back[k], state[k]) for k in state)

    from crmn import checkpoint

    path = tmp_path / "ckpt.h5"
    checkpoint.save(path, state, {"epoch": 2})
    arrays, meta = checkpoint.load(path)
    third = TheanoBackend(CFG, TrainConfig(batch_size=20, seed=12))
    third.set_state(arrays)
    np.testing.assert_array_equal(third.logits(x, False), backend.logits(x, False))


def test_set_state_rejects_missing_or_misshaped(backend):
    state = backend.get_state()
    bad = dict(state)
    del bad["fc.b"]
    with pytest.raises(CheckpointError, match="fc.b"):
        backend.set_state(bad)
    bad = dict(state)
    bad["conv0.W"] = bad["conv0.W"][:, :2]
    with pytest.raises(CheckpointError, match="conv0.W"):
        backend.set_state(bad)


@pytest.mark.slow
def test_nan_loss_is_reported_by_the_step(backend, fresh_state):
    """The step returns the NaN (the loop's one check stops the run, test_train.py)."""
    state = dict(fresh_state)
    state["fc.b"] = np.full_like(state["fc.b"], np.nan)
    backend.set_state(state)
    x, y = synthetic(20, seed=6)
    assert np.isnan(train_step(backend, x, y, lr=0.1)[0])
    backend.set_state(fresh_state)


def test_bad_device_and_dtype_are_config_errors():
    import theano

    if str(theano.config.device).startswith("cuda"):
        pytest.skip("Theano runs on a GPU here")
    with pytest.raises(ConfigError, match="THEANO_FLAGS"):
        TheanoBackend(CFG, TRAIN, device="cuda")
    with pytest.raises(ConfigError, match="dtype"):
        TheanoBackend(CFG, TRAIN, dtype="float16")
