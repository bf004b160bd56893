"""--theano-mode jax: Theano graphs through original.jax_mode equal the C mode.

Per op: every conversion original.jax_mode adds (or fixes), forward and gradient, against
Theano's C mode in float64 at 1e-12, over the border modes, strides and pool modes the
paper's networks use (and the neighbouring ones the conversions claim). Each test first
checks that the op really is in the JAX graph, so a rewrite that removes it cannot make the
comparison vacuous. End to end: ResNet and CRMN (both output gates), three SGD steps with
momentum and weight decay from one state, every state array and both forward modes.

The C compilations dominate the run time; they are cached in Theano's compile directory.
"""
import numpy as np
import pytest

import original  # noqa: F401  (compat bridges first)
import jax
import lasagne
import theano
import theano.tensor as T
from theano.tensor.signal.pool import pool_2d

from crmn.config import ModelConfig, TrainConfig
from crmn.errors import ConfigError
from crmn.naming import velocity_name
from original import jax_mode
from original.backend import TheanoBackend
from original.references import op_names
from backend_steps import train_step

TOL = 1e-12  # float64: the two backends may differ only by rounding order
VELOCITY = velocity_name("")  # canonical prefix of the momentum velocities


# --- the TheanoBackend calls these tests make (one place, should they be renamed) ------

def backend_step(backend, x, y, lr):
    """One SGD step; (loss, accuracy)."""
    return train_step(backend, x, y, lr)


def backend_logits(backend, x, training):
    return backend.logits(x, training=training)


def backend_state(backend):
    return backend.get_state()


def backend_load(backend, state):
    backend.set_state(state)


# --- helpers ----------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def float64_graphs():
    """Symbolic variables default to float64 here (the archive's floatX is float32)."""
    with theano.config.change_flags(floatX="float64"):
        yield


def compare(inputs, outputs, values, expect_ops, tol=TOL):
    """Compile ``outputs`` with the C mode and with jax_mode; check that ``expect_ops``
    are in the JAX graph and that every output agrees within ``tol``; returns the largest
    absolute difference."""
    c_fn = theano.function(inputs, outputs)
    j_fn = jax_mode.function(inputs, outputs)
    missing = set(expect_ops) - op_names(j_fn)
    assert not missing, f"ops {missing} not in the JAX graph: {sorted(op_names(j_fn))}"
    worst = 0.0
    for ref, got in zip(c_fn(*values), j_fn(*values)):
        assert isinstance(got, np.ndarray) and got.dtype == ref.dtype and got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=0, atol=tol)
        worst = max(worst, float(np.abs(got - ref).max(initial=0.0)))
    return worst


def resident(shared):
    """The value in ``shared``'s storage cell as it is, through Theano's own API (a
    jax.Array once a JAX-mode call or ``jax_mode.set_value`` with a device put it there)."""
    return shared.get_value(borrow=True, return_internal_type=True)


def randn(*shape, seed=0):
    return np.random.RandomState(seed).randn(*shape)


# --- per-op: convolution ---------------------------------------------------------------

@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("border", ["valid", "half", "full", (1, 1)])
def test_conv_forward_and_gradients(border, stride):
    """CorrMM, CorrMM_gradWeights, CorrMM_gradInputs: Lasagne's 3x3 convolutions (explicit
    pad 1 then "valid", stride 1 and 2) and the other border modes, with kernel flip."""
    x, w = T.tensor4("x"), T.tensor4("w")
    conv = T.nnet.conv2d(x, w, border_mode=border, subsample=(stride, stride))
    r = T.tensor4("r")  # the upstream gradient, arbitrary
    loss = (conv * r).sum()
    gx, gw = T.grad(loss, [x, w])
    xv, wv = randn(2, 3, 9, 9, seed=1), randn(4, 3, 3, 3, seed=2)
    out_shape = theano.function([x, w], conv.shape)(xv, wv)
    compare([x, w, r], [conv, gx, gw], [xv, wv, randn(*out_shape, seed=3)],
            {"CorrMM", "CorrMM_gradWeights", "CorrMM_gradInputs"})


# --- per-op: pooling -------------------------------------------------------------------

@pytest.mark.parametrize("mode,pad,ignore_border,size", [
    ("average_inc_pad", (0, 0), True, 8),  # the CRMN tap: 2x2 mean pool, stride 2
    ("average_inc_pad", (1, 1), True, 7),
    ("average_exc_pad", (0, 0), False, 7),
    ("sum", (0, 0), False, 7),
    ("average_inc_pad", (0, 0), False, 7),
])
def test_average_pool_forward_and_gradient(mode, pad, ignore_border, size):
    """Pool and AveragePoolGrad, 2x2 windows, stride 2."""
    x = T.tensor4("x")
    pooled = pool_2d(x, (2, 2), ignore_border=ignore_border, stride=(2, 2), pad=pad,
                     mode=mode)
    r = T.tensor4("r")
    gx = T.grad((pooled * r).sum(), x)
    xv = randn(2, 3, size, size, seed=4)
    out_shape = theano.function([x], pooled.shape)(xv)
    compare([x, r], [pooled, gx], [xv, randn(*out_shape, seed=5)], {"Pool", "AveragePoolGrad"})


@pytest.mark.parametrize("mode,pad,ignore_border", [
    ("max", (0, 0), True), ("max", (0, 0), False),
    ("average_exc_pad", (1, 1), True),  # Theano's C code has no gradient for this one
])
def test_pool_forward_only(mode, pad, ignore_border):
    """Pool modes whose gradient op is not converted (max) or refused by Theano's C code
    (average_exc_pad with padding)."""
    x = T.tensor4("x")
    pooled = pool_2d(x, (2, 2), ignore_border=ignore_border, stride=(2, 2), pad=pad,
                     mode=mode)
    compare([x], [pooled], [randn(2, 3, 7, 7, seed=6)], {"Pool"})


def test_global_average_pool():
    """Lasagne's GlobalPoolLayer (mean over H·W): Sum accumulated in acc_dtype."""
    x = T.tensor4("x")
    pooled = T.mean(x.flatten(3), axis=2)  # (B, C)
    r = T.matrix("r")
    gx = T.grad((pooled * r).sum(), x)
    compare([x, r], [pooled, gx], [randn(4, 5, 8, 8, seed=7), randn(4, 5, seed=8)], {"Sum"})


# --- per-op: softmax cross-entropy, argmax ---------------------------------------------

def test_softmax_crossentropy_and_argmax():
    """The CRMN head: softmax over dense logits, mean cross-entropy, accuracy by argmax.
    Theano rewrites it to CrossentropySoftmaxArgmax1HotWithBias and its Dx gradient."""
    h, w, b, y = T.matrix("h"), T.matrix("w"), T.vector("b"), T.lvector("y")
    logits = T.dot(h, w) + b
    probs = T.nnet.softmax(logits)
    ce = lasagne.objectives.categorical_crossentropy(probs, y).mean()
    acc = T.mean(T.eq(T.argmax(logits, axis=1), y))
    grads = T.grad(ce, [h, w, b])
    values = [randn(6, 5, seed=9), randn(5, 10, seed=10), randn(10, seed=11),
              np.array([0, 3, 9, 3, 1, 7], dtype=np.int64)]
    compare([h, w, b, y], [ce, acc] + grads, values,
            {"CrossentropySoftmaxArgmax1HotWithBias", "CrossentropySoftmax1HotWithBiasDx",
             "Argmax"})


@pytest.mark.parametrize("axis", [1, (1, 2), None])
def test_argmax_axes(axis):
    x = T.tensor3("x")
    values = [np.round(randn(3, 4, 5, seed=12))]  # rounded: ties must go to the first index
    compare([x], [T.argmax(x, axis=axis)], values, {"Argmax"})


# --- per-op: split/join (LSTM gates), subtensor updates (option-A shortcut, padding) ---

@pytest.mark.slow
def test_split_and_join_of_lstm_gates():
    """The LSTM concatenates its four gates' weights (Join); the gradient splits them
    (Split); each gate reads a column block of the pre-activation (Subtensor)."""
    x = T.matrix("x")
    gates = [T.matrix(f"w{g}") for g in range(4)]
    w = T.concatenate(gates, axis=1)  # (I, 4H)
    pre = T.dot(x, w)  # (B, 4H)
    h = 3
    i, f, s, o = (pre[:, k * h:(k + 1) * h] for k in range(4))
    out = T.nnet.sigmoid(i) * T.tanh(s) + T.nnet.sigmoid(f) * T.nnet.sigmoid(o)
    parts = T.split(x, [1, 3, 1], 3, axis=1)
    loss = out.sum() + sum((k + 1.0) * (p ** 2).sum() for k, p in enumerate(parts))
    grads = T.grad(loss, [x] + gates)
    values = [randn(4, 5, seed=13)] + [randn(5, h, seed=14 + g) for g in range(4)]
    compare([x] + gates, [out] + list(parts) + grads, values, {"Split", "Join"})


def test_option_a_shortcut_and_explicit_padding():
    """ShortcutALayer (x[:, :, ::2, ::2] between zero channels built from x.shape) and
    Lasagne 0.1's explicit conv padding (set_subtensor into zeros): static shapes through
    Shape_i/MakeVector/Alloc, IncSubtensor set and strided increment in the gradients."""
    from lasagne.theano_extensions import padding

    x = T.tensor4("x")
    sub = x[:, :, ::2, ::2]
    zeros = T.zeros((x.shape[0], 2, sub.shape[2], sub.shape[3]), dtype=x.dtype)
    short = T.concatenate([zeros, sub, zeros], axis=1)  # (B, C + 4, H/2, W/2)
    padded = padding.pad(x, [(1, 1)], batch_ndim=2)  # (B, C, H + 2, W + 2)
    flat = T.reshape(padded, (x.shape[0], -1))
    loss = (short ** 3).sum() + (flat * T.arange(flat.shape[1])).sum()
    gx = T.grad(loss, x)
    compare([x], [short, flat, gx], [randn(2, 3, 6, 6, seed=18)],
            {"IncSubtensor", "Shape_i", "Reshape"})


@pytest.mark.parametrize("kind", ["inc", "set", "inc_rows", "set_points"])
def test_subtensor_update_of_a_constant(kind):
    """Set or increment part of a graph constant (which reaches the conversion as numpy,
    without ``.at``): basic slices, repeated rows, and index-array points."""
    x = T.vector("x")
    zeros = T.constant(np.zeros(5))
    grid = T.constant(np.arange(12.0).reshape(3, 4))
    out, size, op = {
        "inc": (lambda: T.inc_subtensor(zeros[1:3], x), 2, "IncSubtensor"),
        "set": (lambda: T.set_subtensor(zeros[1:3], x), 2, "IncSubtensor"),
        "inc_rows": (lambda: T.inc_subtensor(zeros[[0, 2, 2]], x), 3,
                     "AdvancedIncSubtensor1"),
        "set_points": (lambda: T.set_subtensor(grid[[0, 2], [1, 3]], x), 2,
                       "AdvancedIncSubtensor"),
    }[kind]
    compare([x], [out()], [randn(size, seed=19)], {op})


def test_variadic_add_and_mul():
    """Elementwise products and sums of 3-5 inputs (the stock Mul conversion called the
    removed jnp.product), fused into Composite ops by Theano."""
    a, b, c, d, e = (T.matrix(n) for n in "abcde")
    out = [a * b * c, a * b * c * d * e, a + b + c + d, T.exp(a * b * c) + d * e]
    values = [randn(3, 4, seed=20 + k) for k in range(5)]
    compare([a, b, c, d, e], out, values, {"Mul"})


def test_missing_conversion_is_one_line_naming_op_and_layer():
    w = theano.shared(np.zeros((3, 3)), name="probe.W")
    x = T.matrix("x")
    out = T.extra_ops.fill_diagonal(T.dot(x, w), 0.0)
    with pytest.raises(ConfigError) as info:
        jax_mode.function([x], out)
    message = str(info.value)
    assert "\n" not in message
    assert "FillDiagonal" in message and "'probe'" in message and "probe.W" in message


def test_unsupported_option_is_the_same_one_line_error():
    """An option a conversion refuses (max pooling over a padded image), found only when
    the graph is traced: the same ConfigError kind and form as a missing conversion."""
    w = theano.shared(np.ones((2, 3, 3, 3)), name="tap.W")
    x = T.tensor4("x")
    pooled = pool_2d(T.nnet.conv2d(x, w, border_mode="half"), (2, 2), ignore_border=True,
                     stride=(2, 2), pad=(1, 1), mode="max")
    fn = jax_mode.function([x], pooled)
    with pytest.raises(ConfigError) as info:
        fn(randn(1, 3, 6, 6, seed=40))
    message = str(info.value)
    assert "\n" not in message and message.startswith("--theano-mode jax: ")
    assert "Pool" in message and "padding (1, 1)" in message and "'tap.W'" in message


# --- precision and dtypes --------------------------------------------------------------

def _products(fn, *values):
    """StableHLO lines of the matrix products and convolutions of a jax_mode function."""
    text = jax_mode.linker_call(fn).lower(*values).as_text()
    return [line for line in text.splitlines()
            if "stablehlo.dot_general" in line or "stablehlo.convolution" in line]


@pytest.mark.parametrize("allow_tf32,word", [(False, "HIGHEST"), (True, "HIGH")])
def test_float32_products_run_at_the_requested_precision(allow_tf32, word):
    x = T.tensor4("x", dtype="float32")
    w = theano.shared(randn(4, 3, 3, 3, seed=30).astype(np.float32), name="p.W")
    v = theano.shared(randn(4 * 8 * 8, 5, seed=31).astype(np.float32), name="p.V")
    out = T.dot(T.nnet.conv2d(x, w, border_mode="half").flatten(2), v)
    gw, gv = T.grad(out.sum(), [w, v])
    fn = jax_mode.function([x], [out], updates=[(w, w - np.float32(0.1) * gw), (v, v - np.float32(0.1) * gv)],
                           allow_tf32=allow_tf32)
    xv = randn(2, 3, 8, 8, seed=32).astype(np.float32)
    fn(xv)
    lines = _products(fn, xv)
    assert len(lines) >= 5  # forward conv and dot, their gradients
    for line in lines:
        assert f"precision {word}>" in line or f"[{word}, {word}]" in line, line
    assert resident(w).dtype == np.float32
    assert "float32 HIGHEST" in jax_mode.describe("cpu", "float32")


# --- end to end: TheanoBackend in both modes -------------------------------------------

E2E = {
    "resnet": ModelConfig(n=1, k=0.5, classes=10, memory=False),
    "crmn-logistic": ModelConfig(n=1, k=0.5, classes=10, memory=True, outgate="logistic"),
    "crmn-tanh": ModelConfig(n=1, k=0.5, classes=10, memory=True, outgate="tanh"),
}


def _batches(steps, batch=4, seed=0):
    r = np.random.RandomState(seed)
    return [(r.randn(batch, 3, 32, 32), r.randint(0, 10, batch).astype(np.int64))
            for _ in range(steps)]


@pytest.fixture(scope="module", params=sorted(E2E))
def trained_pair(request):
    """A C-mode and a JAX-mode float64 backend, three SGD steps (momentum 0.9, weight
    decay 1e-4) from the same state on the same batches; returns (c, jax, batches,
    losses)."""
    cfg, train = E2E[request.param], TrainConfig(batch_size=4, seed=3)
    c = TheanoBackend(cfg, train, dtype="float64")
    j = TheanoBackend(cfg, train, dtype="float64", theano_mode="jax")
    assert train.momentum == 0.9 and train.weight_decay > 0
    backend_load(j, backend_state(c))
    batches = _batches(3)
    losses = [(backend_step(c, x, y, 0.1), backend_step(j, x, y, 0.1)) for x, y in batches]
    return c, j, batches, losses


@pytest.mark.slow
def test_training_steps_equal_the_c_mode(trained_pair):
    c, j, _, losses = trained_pair
    for (ce_c, acc_c), (ce_j, acc_j) in losses:
        assert abs(ce_c - ce_j) <= TOL and acc_c == acc_j
    sc, sj = backend_state(c), backend_state(j)
    assert set(sc) == set(sj)
    worst = max(float(np.abs(sc[k] - sj[k]).max()) for k in sc)
    assert worst <= TOL, worst
    velocities = [k for k in sj if k.startswith(VELOCITY)]
    assert velocities and all(np.abs(sj[k]).max() > 0 for k in velocities)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.slow
def test_forward_modes_equal_the_c_mode(trained_pair, training):
    c, j, batches, _ = trained_pair
    x = batches[-1][0]
    ref, got = backend_logits(c, x, training), backend_logits(j, x, training)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)


@pytest.mark.slow
def test_float64_run_holds_float64_device_arrays(trained_pair):
    """Without jax_enable_x64 JAX would have run the float64 graph in float32."""
    _, j, batches, _ = trained_pair
    assert "float64" in j.device and "JAX" in j.device
    shared = list(j._params.values()) + list(j._velocities().values()) + [j._lr]
    for var in shared:
        value = resident(var)
        assert isinstance(value, jax.Array) and value.dtype == np.float64, var.name
    x, y = batches[0]
    lowered = jax_mode.linker_call(j._compile("train")).lower(x, y).as_text()
    assert "xf64>" in lowered and "xf32>" not in lowered


@pytest.mark.slow
def test_the_jax_step_returns_device_sums_without_a_host_copy(trained_pair):
    """The training loop reads the loss once per epoch: the step's outputs stay jax
    arrays (no host sync per step), while logits come back as numpy."""
    c, j, batches, _ = trained_pair
    x, y = batches[0]
    loss_sum, correct = j.step(x, y, 0.0)
    assert isinstance(loss_sum, jax.Array) and isinstance(correct, jax.Array)
    c_loss, c_correct = c.step(x, y, 0.0)
    assert abs(float(loss_sum) - float(c_loss)) <= TOL * len(y)
    assert float(correct) == float(c_correct)


@pytest.mark.slow
def test_shared_variables_and_device_copies_agree(trained_pair):
    """Theano's own get_value sees what the JAX calls wrote (one storage cell), and
    set_state / reset_velocity write through to the device."""
    c, j, batches, _ = trained_pair
    for var in list(j._params.values()) + list(j._velocities().values()):
        np.testing.assert_array_equal(np.asarray(var.get_value()), jax_mode.get_value(var))
    state = backend_state(j)
    j.reset_velocity()
    zeroed = backend_state(j)
    assert all(not zeroed[k].any() for k in zeroed if k.startswith(VELOCITY))
    backend_load(j, state)
    again = backend_state(j)
    assert all(np.array_equal(again[k], state[k]) for k in state)
    assert isinstance(resident(next(iter(j._params.values()))), jax.Array)


# --- devices ---------------------------------------------------------------------------

def test_cuda_without_a_cuda_jaxlib_is_one_line():
    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("this machine has a CUDA jaxlib and a GPU")
    cfg = E2E["resnet"]
    with pytest.raises(ConfigError) as info:
        TheanoBackend(cfg, TrainConfig(), device="cuda", theano_mode="jax")
    message = str(info.value)
    assert "\n" not in message and "requirements-gpu.txt" in message and "cpu" in message


def test_cuda_in_c_mode_points_to_jax_mode():
    if str(theano.config.device).startswith(("cuda", "gpu")):
        pytest.skip("Theano runs on a GPU here")
    with pytest.raises(ConfigError, match="--theano-mode jax"):
        TheanoBackend(E2E["resnet"], TrainConfig(), device="cuda")
    with pytest.raises(ConfigError, match="theano-mode"):
        TheanoBackend(E2E["resnet"], TrainConfig(), theano_mode="pypy")


def test_device_description_names_mode_version_and_precision():
    b = TheanoBackend(E2E["resnet"], TrainConfig(), theano_mode="jax")
    assert b.device == (f"cpu (Theano-PyMC {theano.__version__} via JAX {jax.__version__} "
                        f"cpu, float32 HIGHEST)")
