"""Lasagne 0.1's own examples, unmodified, through ``run_experiments.sh lasagne``.

examples/mnist.py (mlp, cnn, custom_mlp) and examples/recurrent.py come from Lasagne 0.1's
source archive, fetched with pip into $CRMN_WHEELS as scripts/lasagne_tests.sh does (PyPI is
the one place CI reaches). mnist.py reads a mnist.pkl.gz written here (10,000 training and
500 validation and test images: 20 steps of 500, one epoch); recurrent.py makes its own data
and stops at ``--steps``. In float64 with numpy seeded alike, each training call's loss in
JAX mode equals the C backend's to 1e-10 relative, dropout included: ``mrg_uniform``'s JAX
conversion draws the C backend's numbers bit for bit (checked apart, float32 and float64).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_cli
from crmn import gpucheck_child

TOL = 1e-10
STEPS = 20
EXAMPLES = ("mnist.py", "recurrent.py")
#: (script, arguments) of each example
RUNS = {"mlp": ("mnist.py", ["mlp", "1"]), "cnn": ("mnist.py", ["cnn", "1"]),
        "custom_mlp": ("mnist.py", ["custom_mlp:2,300,0.2,0.5", "1"]),
        "recurrent": ("recurrent.py", [])}


def lasagne_sdist() -> Path:
    """Lasagne 0.1's source archive in $CRMN_WHEELS, fetched with pip where missing."""
    wheels = Path(os.environ.get("CRMN_WHEELS", ROOT / ".whl"))
    if not (wheels / gpucheck_child.LASAGNE_SDIST).is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q",
                        "--disable-pip-version-check", "--no-deps", "--no-binary", ":all:",
                        "-d", str(wheels), "Lasagne==0.1"], check=True)
    return wheels / gpucheck_child.LASAGNE_SDIST


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    """A folder with the two examples, byte for byte from the archive, and mnist.pkl.gz."""
    folder = tmp_path_factory.mktemp("lasagne-examples")
    lasagne_sdist()
    for name in EXAMPLES:
        gpucheck_child.lasagne_example(name, folder)
    gpucheck_child.write_mnist(folder / "mnist.pkl.gz")
    return folder


def run_example(folder: Path, name: str, mode: str, dtype: str = "float64", steps=STEPS,
                say=print):
    """(training losses, stdout) of example ``name`` in ``mode``; the run must succeed."""
    script, args = RUNS[name]
    record = folder / f"{name}-{mode}-{dtype}.json"
    result = run_cli(["lasagne", "--theano-mode", mode, "--device", "cpu", "--dtype", dtype,
                      "--seed", "0", "--steps", steps, "--record", record, script, *args],
                     cwd=folder, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    recorded = json.loads(record.read_text())
    losses = np.array(recorded["calls"], dtype=np.float64)
    say(f"lasagne example {name}, {mode} mode, {dtype}, numpy {np.__version__}: "
        f"{len(losses)} steps, last loss {losses[-1]:.6f}, {recorded['seconds']:.1f} s")
    return losses, result.stdout


def shown(capsys):
    """``print`` past pytest's capture: the CI log lists every run."""
    def say(line):
        with capsys.disabled():
            print(f"\n{line}", flush=True)
    return say


def final_loss(stdout: str, name: str) -> float:
    """mnist.py's printed test loss; for recurrent.py (stopped before its first validation)
    the runner's last training output."""
    key = "test loss:" if RUNS[name][0] == "mnist.py" else "last output"
    line = next(line for line in stdout.splitlines() if key in line)
    return float(line.split(key)[1].split()[0].rstrip(";"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_example_jax_equals_c(examples, name, capsys):
    """The pinned environment: C mode and JAX mode, the first 20 losses at 1e-10."""
    say, steps = shown(capsys), STEPS
    c, _ = run_example(examples, name, "c", steps=steps, say=say)
    jax, _ = run_example(examples, name, "jax", steps=steps, say=say)
    assert len(c) == len(jax) == steps and np.isfinite(c).all()
    worst = float(np.max(np.abs(jax - c) / np.abs(c)))
    say(f"lasagne example {name}: JAX vs C, {steps} float64 losses, max relative "
        f"difference {worst:.3g}")
    assert worst <= TOL


@pytest.mark.slow
@pytest.mark.current
@pytest.mark.skipif(int(np.__version__.split(".")[0]) < 2, reason="the pinned environment runs the examples "
                    "in both modes in float64 (test_example_jax_equals_c)")
@pytest.mark.parametrize("name", list(RUNS))
def test_example_jax_mode(examples, name, capsys):
    """The current environment (numpy 2, Python 3.12), JAX mode, float32: the example runs
    to its end (mnist.py: one epoch, its test loss printed), finite losses."""
    losses, out = run_example(examples, name, "jax", "float32", say=shown(capsys))
    assert len(losses) == STEPS and np.isfinite(losses).all()
    assert math.isfinite(final_loss(out, name))


MISSING_OP = """\
import theano
import theano.tensor as T
from theano.tensor.nnet.neighbours import images2neibs
x = T.tensor4("x")
patches = images2neibs(x, (2, 2))
f = theano.function([x], patches.sum())
"""


@pytest.mark.current
def test_missing_op_is_one_line(tmp_path):
    """An op JAX mode lacks: one line naming it and the script's line that made it, exit 1."""
    script = tmp_path / "uses_neibs.py"
    script.write_text(MISSING_OP)
    result = run_cli(["lasagne", "--theano-mode", "jax", "--device", "cpu", script],
                     cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "Images2Neibs" in lines[0]
    assert "made at uses_neibs.py:5: patches = images2neibs(x, (2, 2))" in lines[0]


@pytest.mark.parametrize("argv, says", [(["nothing.py"], "no script"),
                                        (["--dtype", "bfloat16", "here.py"], "torch only")])
def test_bad_options_are_usage_errors(tmp_path, run_main, argv, says):
    (tmp_path / "here.py").write_text("")
    rc, _, err = run_main(["lasagne", *[str(tmp_path / a) if a.endswith(".py") else a
                                        for a in argv]])
    assert rc == 2 and says in err and len(err.strip().splitlines()) == 1


def _random_graph(dtype, x):
    """Outputs drawn as Lasagne's dropout draws them, from three streams of one seed: a
    static size (166 streams), a size known at run time (15,360 streams, most idle) and 7
    explicit streams (many rounds each)."""
    from theano.sandbox.rng_mrg import MRG_RandomStream
    srng = MRG_RandomStream(1234)
    return [srng.uniform((1000,), dtype=dtype),
            srng.binomial(x.shape, p=0.8, dtype=dtype),
            srng.uniform((10, 100), dtype=dtype, nstreams=7)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dropout_masks_bit_equal(dtype):
    """``mrg_uniform`` in JAX mode: the C backend's numbers, bit for bit, over successive
    calls (each 1,000 or more draws per stream set)."""
    import original  # noqa: F401  (the bridges)
    import theano
    import theano.tensor as T
    from original import jax_mode
    x = T.matrix("x", dtype=dtype)
    c_fn = theano.function([x], _random_graph(dtype, x))
    jax_fn = jax_mode.function([x], _random_graph(dtype, x))
    ops = {type(n.op).__name__ for n in jax_fn.maker.fgraph.toposort()}
    assert "mrg_uniform" in ops
    data = np.ones((40, 50), dtype=dtype)
    for _ in range(3):
        for c, j in zip(c_fn(data), jax_fn(data)):
            assert c.dtype == j.dtype == dtype and c.size >= 1000
            assert c.tobytes() == j.tobytes()


@pytest.mark.slow
@pytest.mark.parametrize("ws, stride, ignore_border", [((2, 2), None, True),
                                                       ((3, 3), (2, 2), False),
                                                       ((2, 3), (1, 2), True)])
def test_max_pool_grad_ties(ws, stride, ignore_border):
    """Max-pooling's gradient as Theano's: with many tied maxima, every tie gets it."""
    import original  # noqa: F401
    import theano
    import theano.tensor as T
    from theano.tensor.signal.pool import pool_2d
    from original import jax_mode
    x = T.tensor4("x", dtype="float64")
    pooled = pool_2d(x, ws=ws, stride=stride, ignore_border=ignore_border, mode="max")
    grad = T.grad((pooled ** 2).sum(), x)
    c_fn = theano.function([x], grad)
    jax_fn = jax_mode.function([x], grad)
    assert "MaxPoolGrad" in {type(n.op).__name__ for n in jax_fn.maker.fgraph.toposort()}
    data = np.random.RandomState(0).randint(0, 3, (2, 3, 9, 9)).astype("float64")
    expected = c_fn(data)
    assert (expected != 0).sum() > (expected.size // 4)  # ties: many inputs get a share
    np.testing.assert_array_equal(jax_fn(data), expected)


@pytest.mark.slow
@pytest.mark.parametrize("backwards", [False, True])
def test_scan_with_taps_and_its_gradient(backwards):
    """``Scan`` with two output taps, a sequence, a non-sequence and a nit_sot output; its
    gradient (a scan with many-taps outputs, ``mit_mot``) in float64 against the C backend."""
    import original  # noqa: F401
    import theano
    import theano.tensor as T
    from original import compat, jax_mode
    x, w, h0 = T.matrix("x", "float64"), T.matrix("w", "float64"), T.matrix("h0", "float64")

    def step(x_t, h_2, h_1, w):
        h = T.tanh(T.dot(h_1, w) + 0.5 * h_2 + x_t)
        return h, (h ** 2).sum()

    (h, sq), _ = theano.scan(step, sequences=x, outputs_info=[dict(initial=h0, taps=[-2, -1]),
                                                              None],
                             non_sequences=w, go_backwards=backwards)
    cost = h[-1].sum() + sq.sum()
    outputs = [cost] + T.grad(cost, [w, h0, x])
    with compat.graph_settings():  # scan's Python loop (its Cython module fails to build)
        c_fn = theano.function([x, w, h0], outputs)
    jax_fn = jax_mode.function([x, w, h0], outputs)
    scans = [n.op for n in jax_fn.maker.fgraph.toposort() if type(n.op).__name__ == "Scan"]
    assert any(op.n_mit_mot for op in scans) and any(op.n_mit_sot for op in scans)
    rng = np.random.RandomState(0)
    values = [rng.randn(7, 4), rng.randn(4, 4) * 0.5, rng.randn(2, 4)]
    for c, j in zip(c_fn(*values), jax_fn(*values)):
        np.testing.assert_allclose(j, c, rtol=1e-12, atol=1e-12)
