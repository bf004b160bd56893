"""The bridges for today's Python and numpy (original/compat.py), in whichever environment
runs them: every test here holds in the pinned one (numpy 1.23, where most bridges stand
aside) and in the current one (numpy 2, Python 3.12). Graphs are built inside
``compat.graph_settings()``, as the archive builds them."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import original  # noqa: F401  (the bridges)
from original import compat

import theano  # noqa: E402
import theano.tensor as T  # noqa: E402
from theano.compile.mode import Mode  # noqa: E402
from theano.graph.basic import Constant, ancestors  # noqa: E402

pytestmark = pytest.mark.current
ROOT = Path(__file__).resolve().parents[1]
#: Theano's Python implementations, no optimiser: runs without a C compiler, in both envs
PY = Mode(linker="py", optimizer=None)


@pytest.fixture(autouse=True)
def graph_settings():
    with compat.graph_settings():
        yield


def _constants(var):
    return [v for v in ancestors([var]) if isinstance(v, Constant)]


def test_python_floats_stay_float64_in_float64_graphs():
    """numpy 2's comparison rules made Theano type 0.9 as a float32 constant (0.89999998)
    in float64 graphs, silently: a float64 run then drifts by ~1e-8 from the C mode."""
    with theano.config.change_flags(floatX="float64"):
        x = T.dvector("x")
        y = x * 0.9 + 0.1
        consts = _constants(y)
        assert consts and all(c.dtype == "float64" for c in consts), \
            [(c.dtype, c.data) for c in consts]
        assert sorted(float(c.data) for c in consts) == [0.1, 0.9]
        data = np.array([1.0, 3.0, -7.0])
        out = theano.function([x], y, mode=PY)(data)
        assert out.dtype == np.float64
        np.testing.assert_array_equal(out, data * 0.9 + 0.1)  # exact: no float32 rounding


def test_float32_graphs_keep_theanos_float32_constants():
    """Under floatX=float32 (the archive's default) Theano downcasts Python floats on
    purpose, in both environments."""
    with theano.config.change_flags(floatX="float32"):
        y = T.fvector("x") * 0.9
        assert y.dtype == "float32"
        assert [c.dtype for c in _constants(y)] == ["float32"]


@pytest.mark.parametrize("value, dtype", [(100, "int8"), (127, "int8"), (128, "int16"),
                                          (200, "int16"), (40000, "int32"),
                                          (2 ** 40, "int64"), (-129, "int16")])
def test_python_ints_get_the_smallest_signed_type(value, dtype):
    """numpy 2 made ints >= 128 uint64 constants (then "Shape must be integers")."""
    assert T.constant(value).dtype == dtype


def test_a_reshape_by_a_python_int_above_127():
    x = T.dvector("x")
    f = theano.function([x], x.reshape((2, 200)), mode=PY)
    assert f(np.arange(400.0)).shape == (2, 200)


def test_removed_numpy_names_that_theano_uses():
    # np.product is reached by Theano's scalar Mul.impl while shapes are worked out
    assert np.product([2, 3, 4]) == 24
    assert np.cast["float32"](np.arange(3)).dtype == np.float32
    assert np.sctype2char(np.float64) == "d"
    x = T.lscalar("x")
    assert theano.function([x], x * 3 * 4, mode=PY)(2) == 24


def test_c_mode_available_says_why_not_in_one_line():
    ok, reason = compat.c_mode_available()
    numpy_new = compat.numpy_too_new_for_c()
    assert numpy_new == (tuple(int(p) for p in np.__version__.split(".")[:2]) >= (1, 24))
    if numpy_new:
        assert not ok and np.__version__ in reason and "--theano-mode jax" in reason
    if not ok:
        assert reason and "\n" not in reason
    else:
        assert reason == "" and theano.config.cxx


def test_without_c_mode_theano_compiles_no_c():
    """Where numpy is too new for Theano's C code, Theano gets cxx= (unless the user set
    it), so that nothing tries to compile; the pinned environment keeps its compiler."""
    env = {"THEANO_FLAGS": "device=cpu"}
    added = compat.theano_flag_defaults(env)
    assert ("cxx" in added) == compat.numpy_too_new_for_c()
    assert compat.theano_flag_defaults({"THEANO_FLAGS": "cxx=g++"}).get("cxx") is None


def test_the_bridges_import_lasagne_in_a_clean_process():
    out = subprocess.run([sys.executable, "-c",
                          "import original, lasagne, theano, numpy; "
                          "print(lasagne.__version__, theano.__version__)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0.1", "1.1.2"]


def test_check_compiled_backend_names_numpy_where_it_is_too_new():
    from crmn.errors import ConfigError

    if not compat.numpy_too_new_for_c():
        pytest.skip("numpy < 1.24 here: the C mode's own checks apply")
    with pytest.raises(ConfigError) as err:
        compat.check_compiled_backend(probe=False)
    assert str(err.value) == compat.c_mode_available()[1]


def test_xla_option_name_follows_the_jaxlib_release():
    from original import jax_mode

    assert jax_mode.xla_cpu_option("0.4.30") == "xla_cpu_use_mkl_dnn"
    assert jax_mode.xla_cpu_option("0.11.2") == "xla_cpu_use_onednn"
    assert jax_mode.xla_cpu_option("0.7.1") is None  # not measured: XLA's default


def test_the_jax_mode_settings_start_jax_in_a_clean_process():
    """An XLA flag unknown to the installed jaxlib aborts the process at JAX's start."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    code = ("from original import jax_mode\nchanged = jax_mode.configure()\n"
            "import jax.numpy as jnp\nprint(changed.get('XLA_FLAGS'), float(jnp.ones(3).sum()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    from original import jax_mode

    assert out.stdout.split() == [str(jax_mode.XLA_CPU_FLAG), "3.0"]
