"""modern/backend.py: Lasagne's SGD, state through crmn.convert, epochs, the GPU data path."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the current environment has no torch

import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from crmn import convert
from crmn import train as trainer
from crmn.config import ModelConfig, TrainConfig
from crmn.data import BatchSampler
from crmn.errors import CheckpointError, ConfigError
from crmn.naming import param_specs, velocity_name
from modern import gpu
from modern.backend import TorchBackend
from modern.model import build
from backend_steps import train_step

TINY_CRMN = ModelConfig(n=1, k=0.5, classes=10, memory=True)
TINY_RESNET = ModelConfig(n=1, k=0.5, classes=10, memory=False)


def _batch(seed, b=6, classes=10):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((b, 3, 32, 32)), rng.integers(0, classes, b)


def _decayed(name):  # written from docs/spec.md §4, independently of crmn.convert / naming
    return name.endswith("conv1.weight") or name.endswith("conv2.weight") or name in (
        "conv0.weight", "lstm.W_x", "lstm.W_h", "fc.weight")


@pytest.mark.parametrize("cfg,nesterov", [(TINY_CRMN, False), (TINY_RESNET, True)],
                         ids=["crmn-classical", "resnet-nesterov"])
@pytest.mark.slow
def test_train_step_is_lasagnes_sgd(cfg, nesterov):
    tc = TrainConfig(batch_size=6, nesterov=nesterov, weight_decay=1e-3, seed=4)
    be = TorchBackend(cfg, tc, dtype="float64")
    ref = build(cfg, seed=4).double()  # the same initial network, updated by hand below
    ref.reset_parameters(4)  # crmn.init's float64 values, as the float64 backend loads them
    vel = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for step, lr in enumerate((0.1, 0.05)):  # two steps: the second uses a velocity
        x, y = _batch(step)
        xt, yt = torch.as_tensor(x), torch.as_tensor(y)
        logits = ref(xt, training=True, update_stats=True)
        loss = F.cross_entropy(logits, yt)
        names, params = zip(*ref.named_parameters())
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for n, p, g in zip(names, params, grads):
                g = g + 1e-3 * p if _decayed(n) else g
                vel[n] = 0.9 * vel[n] - lr * g
                p += 0.9 * vel[n] - lr * g if nesterov else vel[n]
        got_loss, got_acc = train_step(be, x, y, lr)
        assert got_loss == pytest.approx(loss.item(), rel=1e-12)
        assert got_acc == (logits.argmax(1) == yt).double().mean().item()
    mine = dict(be.net.state_dict())
    for n, t in ref.state_dict().items():  # params and BN running averages
        torch.testing.assert_close(mine[n], t, rtol=1e-10, atol=1e-12, msg=n)
    for n, v in zip(be.names, be.velocity):
        torch.testing.assert_close(v, vel[n], rtol=1e-10, atol=1e-12, msg=n)


def test_weight_decay_skips_bn_biases_peepholes_and_initial_states():
    # zero data gradient is impossible to arrange, so compare two decays instead: the
    # difference of the updates is -lr·Δwd·p exactly on the decayed arrays, zero elsewhere
    x, y = _batch(0)
    states = []
    for wd in (0.0, 0.5):
        be = TorchBackend(TINY_CRMN, TrainConfig(batch_size=6, weight_decay=wd), dtype="float64")
        start = be.get_state()
        train_step(be, x, y, 0.1)
        states.append(be.get_state())
    for spec in param_specs(TINY_CRMN):
        if not spec.trainable:
            continue
        diff = states[1][spec.name] - states[0][spec.name]
        if spec.decayed:
            np.testing.assert_allclose(diff, -0.1 * 0.5 * start[spec.name], rtol=1e-6,
                                       atol=1e-12, err_msg=spec.name)
        else:
            assert np.abs(diff).max() < 1e-12, spec.name


def test_state_round_trip_in_place_and_errors():
    a = TorchBackend(TINY_CRMN, TrainConfig(batch_size=6, seed=1), dtype="float64")
    train_step(a, *_batch(0), 0.1)
    state = a.get_state()
    assert set(state) == {s.name for s in param_specs(TINY_CRMN)} | {
        velocity_name(s.name) for s in param_specs(TINY_CRMN) if s.trainable}
    b = TorchBackend(TINY_CRMN, TrainConfig(batch_size=6, seed=2), dtype="float64")
    ptr = b.params[0].data_ptr()
    b.set_state(state)
    assert b.params[0].data_ptr() == ptr  # copied in place: a captured graph stays valid
    for k, v in b.get_state().items():
        assert np.array_equal(v, state[k]), k
    x, _ = _batch(5)
    np.testing.assert_array_equal(a.logits(x, False), b.logits(x, False))
    bad = dict(state)
    del bad["lstm.W_hf"]
    with pytest.raises(CheckpointError, match="lstm.W_hf"):
        b.set_state(bad)
    bad = dict(state, **{"fc.W": state["fc.W"].T})
    with pytest.raises(CheckpointError, match="fc.W"):
        b.set_state(bad)
    b.reset_velocity()
    assert all(not np.any(v) for k, v in b.get_state().items() if k.startswith("velocity."))


def test_convert_round_trip_is_exact():
    rng = np.random.default_rng(0)
    canon = {}
    for s in param_specs(TINY_CRMN):
        canon[s.name] = rng.standard_normal(s.shape)
        if s.trainable:
            canon[velocity_name(s.name)] = rng.standard_normal(s.shape)
    native = convert.canonical_to_torch(TINY_CRMN, canon)
    H = TINY_CRMN.lstm_units
    assert native["lstm.W_x"].shape == (TINY_CRMN.lstm_input, 4 * H)
    np.testing.assert_array_equal(native["lstm.W_x"][:, H:2 * H], canon["lstm.W_xf"])
    np.testing.assert_array_equal(native["fc.weight"], canon["fc.W"].T)
    np.testing.assert_array_equal(native["blocks.2.bn1.inv_std"], canon["s3b0.bn1.inv_std"])
    # the native names are exactly the network's state_dict keys (plus velocities)
    net = build(TINY_CRMN)
    assert {k for k in native if not k.startswith("velocity.")} == set(net.state_dict())
    back = convert.torch_to_canonical(TINY_CRMN, native)
    assert set(back) == set(canon)
    for k in canon:
        assert back[k].shape == canon[k].shape and np.array_equal(back[k], canon[k]), k


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.slow
def test_train_epoch_equals_single_steps_on_either_path(fast):
    """The loop's epoch, through the generic path (the sampler's numpy batches) or the
    backend's fast path (resident data gathered on the device, here the CPU), ends where
    single steps over the sampler's batches end, bit for bit."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 40)
    sampler = BatchSampler(x, y, batch_size=12, seed=3, flip=True)  # 3 batches, 4 dropped
    tc = TrainConfig(batch_size=12)
    a = TorchBackend(TINY_RESNET, tc, dtype="float64")
    b = TorchBackend(TINY_RESNET, tc, dtype="float64")
    assert a.fast_epoch is False  # on the CPU the generic path is the default
    stats = trainer.train_epoch(a, sampler, 2, 0.05, fast=fast)
    losses, accs = zip(*[train_step(b, xb, yb, 0.05) for xb, yb in sampler.epoch(2)])
    assert stats.images == 36 and stats.seconds > 0
    assert stats.loss == pytest.approx(np.mean(losses), rel=1e-12)
    assert stats.acc == pytest.approx(np.mean(accs), rel=1e-12)
    sa, sb = a.get_state(), b.get_state()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def test_train_epoch_reports_a_nan_loss():
    """The step does not check (no host sync); the epoch's loss says NaN and the loop's
    one check (crmn.train, tested in test_train.py) stops the run."""
    x = np.full((24, 3, 32, 32), np.nan, dtype=np.float32)
    sampler = BatchSampler(x, np.zeros(24, dtype=np.int64), batch_size=12, seed=0)
    be = TorchBackend(TINY_RESNET, TrainConfig(batch_size=12))
    assert np.isnan(trainer.train_epoch(be, sampler, 0, 0.1).loss)


@pytest.mark.slow
def test_training_learns_a_separable_problem():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 48)
    x = (rng.standard_normal((48, 3, 32, 32)) * 0.5).astype(np.float32)
    x[np.arange(48), y % 3] += np.where(y < 3, 1.0, -1.0)[:, None, None]  # class: a tint
    sampler = BatchSampler(x, y, batch_size=8, seed=0)
    be = TorchBackend(ModelConfig(n=1, k=0.5, classes=4, memory=False),
                      TrainConfig(batch_size=8))
    stats = [trainer.train_epoch(be, sampler, e, 0.05) for e in range(4)]
    assert stats[-1].loss < 0.5 * stats[0].loss and stats[-1].acc > 0.9
    loss, acc = trainer.evaluate(be, x, y, 16)  # running statistics: noisy after 24 steps of 8
    assert np.isfinite(loss) and 0 <= acc <= 1


@pytest.mark.parametrize("pad,flip", [(4, False), (4, True), (2, True)])
def test_gpu_epoch_gather_equals_the_sampler(pad, flip):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 30)
    sampler = BatchSampler(x, y, batch_size=7, seed=5, pad=pad, flip=flip)
    res = gpu.make_resident(x, y, pad, torch.device("cpu"), torch.float32)
    plan = sampler.plan(3)
    m = len(sampler) * 7
    xe, ye = gpu.gather_epoch(res, plan.order[:m], plan.dy[:m], plan.dx[:m], plan.flip[:m])
    for i, (xb, yb) in enumerate(sampler.epoch(3)):
        np.testing.assert_array_equal(xe[i * 7:(i + 1) * 7].numpy(), xb)
        np.testing.assert_array_equal(ye[i * 7:(i + 1) * 7].numpy(), yb)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="dtype"):
        TorchBackend(TINY_RESNET, TrainConfig(), dtype="float16")
    with pytest.raises(ConfigError, match="CUDA"):
        TorchBackend(TINY_RESNET, TrainConfig(), graph=True)
    be = TorchBackend(TINY_RESNET, TrainConfig())
    with pytest.raises(ConfigError, match="32"):
        be.logits(np.zeros((2, 3, 28, 28), np.float32), False)


def test_bfloat16_autocast_runs_on_cpu():
    be = TorchBackend(TINY_CRMN, TrainConfig(batch_size=6), dtype="bfloat16")
    x, y = _batch(0)
    loss, _ = train_step(be, x.astype(np.float32), y, 0.1)
    assert np.isfinite(loss)
    assert be.get_state()["conv0.W"].dtype == np.float32  # weights stay float32


class _Casts(TorchDispatchMode):
    """Records the shape of every dtype cast (aten._to_copy) run under it, per direction."""

    def __init__(self):
        super().__init__()
        self.down, self.up = [], []  # float32 -> bfloat16, bfloat16 -> float32

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default:
            src, dst = args[0].dtype, out.dtype
            if (src, dst) == (torch.float32, torch.bfloat16):
                self.down.append(tuple(out.shape))
            elif (src, dst) == (torch.bfloat16, torch.float32):
                self.up.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("cfg,channels_last", [(TINY_CRMN, True), (TINY_RESNET, False)],
                         ids=["crmn-channels-last", "resnet-channels-first"])
@pytest.mark.slow
def test_bfloat16_cast_once_gives_autocasts_bits_in_one_cast(cfg, channels_last):
    """cast_once rounds each weight as autocast does (same bits after two steps), but casts
    the single-product weights in one kernel each way instead of one per weight."""
    runs = []
    for cast_once in (False, True):
        tc = TrainConfig(batch_size=6, weight_decay=1e-3, seed=2)
        be = TorchBackend(cfg, tc, dtype="bfloat16", channels_last=channels_last,
                          cast_once=cast_once)
        losses = []
        for step, lr in enumerate((0.1, 0.05)):
            x, y = _batch(step)
            with _Casts() as casts:
                losses.append(train_step(be, x.astype(np.float32), y, lr))
        runs.append((losses, be.get_state(), casts))
    (l_use, s_use, c_use), (l_once, s_once, c_once) = runs
    assert l_use == l_once
    for k in s_use:
        np.testing.assert_array_equal(s_use[k], s_once[k], err_msg=k)
    net = build(cfg)
    shapes = [tuple(dict(net.named_parameters())[n].shape)
              for n in net.single_product_weights()]
    total = sum(int(np.prod(s)) for s in shapes)
    for made in (c_use.down, c_use.up):  # autocast: each weight at its use, each gradient back
        assert all(made.count(s) >= shapes.count(s) for s in shapes)
    for made in (c_once.down, c_once.up):  # one flat cast each way, no weight cast alone
        assert made.count((total,)) == 1
        assert not [s for s in made if s in shapes]


def test_cast_once_is_a_bfloat16_option():
    with pytest.raises(ConfigError, match="bfloat16"):
        TorchBackend(TINY_RESNET, TrainConfig(), dtype="float32", cast_once=True)
    assert not TorchBackend(TINY_RESNET, TrainConfig(), dtype="float32").cast_once
    assert TorchBackend(TINY_RESNET, TrainConfig(), dtype="bfloat16").cast_once


@pytest.mark.parametrize("cfg", [TINY_RESNET, TINY_CRMN], ids=["resnet", "crmn"])
@pytest.mark.slow
def test_compiled_bfloat16_step_trains_like_the_eager_one(cfg):
    """torch.compile (inductor, here on the CPU) of the forward, cast-once weights passed in,
    the LSTM's hand-written backward traced through: its update is as close to float32's as
    eager bfloat16's is (bfloat16 rounding only)."""
    changes = {}
    for name, opts in (("float32", dict(dtype="float32")), ("bf16", dict(dtype="bfloat16")),
                       ("bf16-compiled", dict(dtype="bfloat16", compile=True))):
        be = TorchBackend(cfg, TrainConfig(batch_size=6, seed=1), **opts)
        start = be.get_state()
        for step in range(2):
            x, y = _batch(step)
            train_step(be, x.astype(np.float32), y, 0.1)
        end = be.get_state()
        changes[name] = np.concatenate([(end[k] - start[k]).ravel() for k in sorted(start)])
    ref = changes["float32"]

    def off(name):
        return np.linalg.norm(changes[name] - ref) / np.linalg.norm(ref)

    assert 0 < off("bf16") < 5e-2  # measured 2.3e-2 / 1.6e-2: bf16 rounding over two steps
    assert off("bf16-compiled") < max(1.5 * off("bf16"), 1e-3)


def test_checkpoint_round_trip_across_backends(tmp_path):
    """original -> HDF5 -> modern -> HDF5 -> original gives identical arrays (STYLE 5)."""
    pytest.importorskip("original.backend")  # compat bridges before theano
    from crmn import checkpoint
    from original.backend import TheanoBackend

    tc = TrainConfig(batch_size=4)
    rng = np.random.default_rng(3)
    state = {}
    for s in param_specs(TINY_CRMN):  # every array random, velocities included
        state[s.name] = rng.standard_normal(s.shape)
        if s.trainable:
            state[velocity_name(s.name)] = rng.standard_normal(s.shape)
    src = TheanoBackend(TINY_CRMN, tc, dtype="float64")
    src.set_state(state)
    meta = {"model": TINY_CRMN.to_dict(), "train": tc.to_dict()}
    checkpoint.save(tmp_path / "a.h5", src.get_state(), dict(meta, backend="theano"))
    arrays, _ = checkpoint.load(tmp_path / "a.h5")
    mid = TorchBackend(TINY_CRMN, tc, dtype="float64")
    mid.set_state(arrays)
    checkpoint.save(tmp_path / "b.h5", mid.get_state(), dict(meta, backend="torch"))
    arrays, _ = checkpoint.load(tmp_path / "b.h5")
    dst = TheanoBackend(TINY_CRMN, tc, dtype="float64")
    dst.set_state(arrays)
    final = dst.get_state()
    assert set(final) == set(state)
    for k, v in state.items():
        assert final[k].dtype == np.float64 and np.array_equal(final[k], v), k
