"""original.jax_mode changes nothing in the process at import; configure() applies what the
JAX mode needs (XLA_FLAGS, JAX's client memory option, jax_enable_x64), once, and Theano's
stock conversions stay stock.

Each case runs in a fresh interpreter: JAX reads XLA_FLAGS once, when its first backend
starts, and jax_enable_x64 is process-wide, so the test session itself cannot show them.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, os, sys
import original
import jax

def snapshot():
    return {"XLA_FLAGS": os.environ.get("XLA_FLAGS"),
            "PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
            "x64": bool(jax.config.jax_enable_x64)}

def stock_registry():
    # which module each of Theano's stock conversions comes from
    import theano.link.jax.jax_dispatch as stock
    return sorted({f.__module__ for f in stock.jax_funcify.registry.values()})

report = {"before": snapshot()}
if sys.argv[1] == "started":
    jax.devices()  # jax's platform started before the mode is configured
import original.jax_mode as jax_mode
import theano.link.jax.jax_dispatch as stock
from theano.scalar.basic import Add, Mul
report["imported"] = snapshot()
report["registry_after_import"] = stock_registry()
report["stock_add"] = stock.jax_funcify.dispatch(Add).__qualname__
report["ours_add"] = jax_mode.dispatch.jax_funcify.dispatch(Add).__qualname__
report["changed"] = jax_mode.configure()
report["configured"] = snapshot()
report["changed_again"] = jax_mode.configure()
report["configured_again"] = snapshot()

import numpy as np
import theano.tensor as T
a, b, c = T.vectors("a", "b", "c")
fn = jax_mode.function([a, b, c], a * b * c + a)  # variadic Mul, Add, Composite
report["result"] = fn(*[np.arange(3, dtype=a.dtype)] * 3).tolist()
report["registry_after_use"] = stock_registry()
report["stock_mul"] = stock.jax_funcify.dispatch(Mul).__qualname__
print(json.dumps(report))
"""

CASES = {
    # no user settings: configure() adds the CPU flag and turns on 64-bit values
    "clean": ({}, "fresh"),
    # the user's own settings: importing keeps them; configure() keeps the user's flag
    "user": ({"JAX_ENABLE_X64": "1", "XLA_FLAGS": "--xla_cpu_use_mkl_dnn=true",
              "XLA_PYTHON_CLIENT_PREALLOCATE": "true"}, "fresh"),
    # the user's own share of GPU memory: no preallocation setting is added over it
    "fraction": ({"XLA_PYTHON_CLIENT_MEM_FRACTION": ".5"}, "fresh"),
    # JAX started before configure(): JAX's public API cannot tell, so the settings are
    # added as in "clean" (they reach child processes; this one has read its flags already)
    "started": ({}, "started"),
}


def run_probe(case):
    extra, start = CASES[case]
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_ENABLE_X64") and not k.startswith("XLA_")}
    env.update(extra)
    out = subprocess.run([sys.executable, "-c", PROBE, start], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=sorted(CASES))
def probe(request):
    return request.param, run_probe(request.param)


def test_import_changes_no_process_setting(probe):
    _, report = probe
    assert report["imported"] == report["before"]


def test_stock_conversions_stay_stock(probe):
    """Theano's registry holds only Theano's conversions, before and after a JAX-mode
    function ran; our dispatcher resolves Add to ours (so the check is not vacuous)."""
    _, report = probe
    stock_module = ["theano.link.jax.jax_dispatch"]
    assert report["registry_after_import"] == stock_module
    assert report["registry_after_use"] == stock_module
    assert report["stock_add"] == report["stock_mul"] == "jax_funcify_ScalarOp"
    assert report["ours_add"] == "jax_funcify_Add"
    assert report["result"] == [0.0, 2.0, 10.0]


def test_configure_applies_the_settings_once(probe):
    case, report = probe
    flag = "--xla_cpu_use_mkl_dnn=false"
    configured = report["configured"]
    assert configured["x64"] is True
    if case in ("clean", "started"):
        assert report["before"] == {"XLA_FLAGS": None, "PREALLOCATE": None, "x64": False}
        assert configured["XLA_FLAGS"] == flag
        # JAX must not take 75 % of a GPU that torch shares in the same process
        assert configured["PREALLOCATE"] == "false"
        assert report["changed"] == {"XLA_FLAGS": flag, "jax_enable_x64": "True",
                                     "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    elif case == "user":
        assert report["before"]["x64"] is True
        assert configured["XLA_FLAGS"] == "--xla_cpu_use_mkl_dnn=true"
        assert configured["PREALLOCATE"] == "true"
        assert report["changed"] == {}
    else:  # fraction
        assert configured["PREALLOCATE"] is None
        assert report["changed"] == {"XLA_FLAGS": flag, "jax_enable_x64": "True"}
    assert report["changed_again"] == {}
    assert report["configured_again"] == configured
