"""Each bridge of original/compat.py, on the real Theano-PyMC 1.1.2 and Lasagne 0.1."""
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import original  # noqa: F401  (the import bridges, before Lasagne is imported)
from original import compat

import lasagne  # noqa: E402
import theano  # noqa: E402
import theano.tensor as T  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_flag_defaults_added_without_overriding_the_user():
    env = {"THEANO_FLAGS": "floatX=float64,blas.ldflags=-lmyblas"}
    added = compat.theano_flag_defaults(env)
    assert added == {}
    assert env["THEANO_FLAGS"] == "floatX=float64,blas.ldflags=-lmyblas"

    env = {"THEANO_FLAGS": "device=cpu"}
    added = compat.theano_flag_defaults(env)
    assert added["floatX"] == "float32"
    flags = compat._parse_flags(env["THEANO_FLAGS"])
    assert flags["device"] == "cpu" and flags["floatX"] == "float32"
    if compat.find_openblas():
        assert flags["blas__ldflags"] == "-lopenblas"


def test_theano_imported_with_openblas_and_float32():
    if compat.find_openblas() is None:
        pytest.skip("no system OpenBLAS on this machine")
    assert theano.config.blas__ldflags.strip()
    # the test session itself may run with a user-set floatX; a clean process gets float32
    env = {k: v for k, v in os.environ.items() if k != "THEANO_FLAGS"}
    out = subprocess.run([sys.executable, "-c",
                          "import original, theano; print(theano.config.floatX, "
                          "theano.config.blas__ldflags)"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["float32", "-lopenblas"]


def test_mrg_random_streams_renamed():
    from theano.sandbox.rng_mrg import MRG_RandomStream, MRG_RandomStreams

    assert MRG_RandomStreams is MRG_RandomStream
    # Lasagne's DropoutLayer draws its mask from it
    layer = lasagne.layers.DropoutLayer((4, 1000), p=0.5)
    x = T.matrix("x", dtype="float64")
    f = theano.function([x], layer.get_output_for(x, deterministic=False))
    out = f(np.ones((4, 1000)))
    assert set(np.unique(out)) == {0.0, 2.0}  # kept units are rescaled by 1/(1-p)
    assert 0.4 < (out == 0).mean() < 0.6


def test_downsample_max_pool_2d_through_lasagne_pool_layers():
    x = T.tensor4("x", dtype="float64")
    data = np.random.RandomState(0).randn(2, 3, 6, 6)
    for mode, reduce in (("max", np.max), ("average_inc_pad", np.mean)):
        layer = lasagne.layers.Pool2DLayer((None, 3, 6, 6), pool_size=2, mode=mode)
        out = theano.function([x], layer.get_output_for(x))(data)
        expected = reduce(data.reshape(2, 3, 3, 2, 3, 2), axis=(3, 5))
        np.testing.assert_allclose(out, expected, rtol=1e-12)
        assert layer.output_shape == (None, 3, 3, 3)


def test_gof_variable_alias():
    assert theano.gof.Variable is theano.graph.basic.Variable
    # lasagne.utils.as_theano_expression relies on it
    v = T.matrix()
    assert lasagne.utils.as_theano_expression(v) is v


def test_pkg_resources_gives_lasagne_version():
    import pkg_resources

    assert pkg_resources.get_distribution("Lasagne").version == "0.1"
    assert lasagne.__version__ == "0.1"


def test_conv2d_image_shape_keyword_renamed_without_warning():
    # build and differentiate under floatX=float64: Lasagne's padding allocates floatX zeros
    with theano.config.change_flags(floatX="float64"), warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = lasagne.layers.Conv2DLayer((None, 2, 5, 5), 3, (3, 3), pad=1, b=None,
                                           nonlinearity=None)
        x = T.tensor4("x", dtype="float64")
        expr = layer.get_output_for(x)
    w = layer.W.get_value()
    assert w.dtype == np.float64
    data = np.random.RandomState(1).randn(1, 2, 5, 5)
    out = theano.function([x], expr)(data)
    # Theano's conv2d is a true convolution: the kernel is flipped
    padded = np.pad(data, ((0, 0), (0, 0), (1, 1), (1, 1)))
    wf = w[:, :, ::-1, ::-1]
    expected = np.zeros((1, 3, 5, 5))
    for i in range(3):
        for j in range(3):
            expected += np.einsum("bchw,oc->bohw", padded[:, :, i:i + 5, j:j + 5],
                                  wf[:, :, i, j])
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)


def test_scan_cython_import_fails_fast_and_scan_still_works():
    with compat.graph_settings():
        start = time.perf_counter()
        with pytest.raises(ImportError):
            from theano.scan import scan_perform_ext  # noqa: F401
        assert time.perf_counter() - start < 1.0
        v = T.vector("v", dtype="float64")
        out, _ = theano.scan(lambda a, acc: acc + a, sequences=v,
                             outputs_info=T.constant(np.float64(0)))
        f = theano.function([v], out)
        np.testing.assert_allclose(f(np.arange(5.0)), np.cumsum(np.arange(5.0)))
    assert "theano.scan.scan_perform_ext" not in sys.modules  # put back


def test_check_compiled_backend_passes_here():
    if compat.find_openblas() is None:
        pytest.skip("no system OpenBLAS on this machine")
    compat.check_compiled_backend(probe=True)


@pytest.mark.parametrize("flags, cause", [("blas__ldflags=", "BLAS"),
                                          ("cxx=", "C++ compiler")])
def test_check_compiled_backend_fails_loudly(flags, cause):
    code = ("import original\nfrom original.compat import check_compiled_backend\n"
            "from crmn.errors import ConfigError\n"
            "try:\n    check_compiled_backend(probe=False)\n"
            "except ConfigError as e:\n    print('ConfigError:', e)\n")
    env = dict(os.environ, THEANO_FLAGS=flags)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith("ConfigError:") and cause in line and "\n" not in line



def test_recursion_limit_raised_for_deep_graphs_and_put_back():
    # the unrolled 32-layer CRMN's gradient fails to compile with Python's default 1000
    before = sys.getrecursionlimit()
    with compat.graph_settings():
        with compat.graph_settings():  # re-entrant: the inner exit puts nothing back
            pass
        assert sys.getrecursionlimit() == max(before, compat.RECURSION_LIMIT)
    assert sys.getrecursionlimit() == before


def test_import_bridges_are_one_ordered_list():
    names = [bridge.__name__ for bridge in compat.IMPORT_BRIDGES]
    assert names.index("import_theano") < names.index("bridge_downsample")
    assert names.index("bridge_numpy_distutils") < names.index("import_theano")
    assert names[0] == "_flag_defaults_before_theano"  # Theano reads its flags at import


def test_a_wait_for_the_compile_lock_is_announced_with_its_holder(tmp_path, capsys,
                                                                  monkeypatch):
    """Another process holds Theano's compile lock: we say who and for how long, and the
    wait is counted (so that it can be kept out of an epoch's seconds)."""
    import subprocess
    import sys
    import time

    import theano.link.c.cmodule as cmodule

    monkeypatch.setattr(compat, "LOCK_REPORT_EVERY", 0.5)
    monkeypatch.setattr(compat, "LOCK_QUIET_WAIT", 0.3)
    assert not getattr(cmodule.lock_ctx, "announces", False)  # only while graphs compile
    with compat.graph_settings():
        assert getattr(cmodule.lock_ctx, "announces", False)  # Theano's own callers get it
        _wait_for_a_held_lock(tmp_path, capsys, cmodule)
    assert not getattr(cmodule.lock_ctx, "announces", False)


def test_the_announcing_compile_lock_is_reentrant(tmp_path, capsys):
    """Theano takes its compile lock again inside a compilation: the inner take neither
    waits for the outer one nor announces it, and the lock is free after."""
    import threading

    import theano.link.c.cmodule as cmodule

    def nested():
        with compat.graph_settings():
            with cmodule.lock_ctx(str(tmp_path)), cmodule.lock_ctx(str(tmp_path)):
                pass
            with cmodule.lock_ctx(str(tmp_path)):  # released by the outer exit: free again
                pass

    worker = threading.Thread(target=nested, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the inner take waits for the outer one"
    assert "waiting for the compile lock" not in capsys.readouterr().err


def _wait_for_a_held_lock(tmp_path, capsys, cmodule):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(tmp_path / '.lock')!r}, 'w')\n"
        "fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(2.5)\n")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    t0 = time.perf_counter()
    with cmodule.lock_ctx(str(tmp_path)):
        waited = time.perf_counter() - t0
    holder.wait()
    err = capsys.readouterr().err
    assert f"theano: waiting for the compile lock {tmp_path / '.lock'}, held by process " \
           f"{holder.pid} (0 s so far)" in err  # after the quiet 0.3 s
    assert err.count("waiting for the compile lock") >= 2  # repeated while it lasts
    assert waited > 1.0  # it waited for the holder to let go
    with cmodule.lock_ctx(str(tmp_path)):  # free now: silent
        pass
    assert "waiting" not in capsys.readouterr().err
