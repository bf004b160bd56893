"""Importing the archive changes nothing it need not change, and building and stepping a
network puts back what its graph needed (the recursion limit, numpy 1.x names, Theano's
autocaster and compile lock). Each case runs in a fresh interpreter."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.current  # pinned and current environments
ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib, json, sys
import numpy as np

NAMES = ("product", "cast", "complex", "int", "sctype2char", "AxisError", "ComplexWarning")


def snapshot():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        numpy_names = sorted(n for n in NAMES if hasattr(np, n))
    out = {"limit": sys.getrecursionlimit(), "numpy": numpy_names,
           "scan_ext_blocked": "theano.scan.scan_perform_ext" in sys.modules}
    if "theano" in sys.modules:
        import theano.compile.compilelock as compilelock
        import theano.link.c.cmodule as cmodule
        from theano.scalar.basic import NumpyAutocaster
        out["autocast_exact"] = getattr(NumpyAutocaster.__call__, "exact", False)
        out["lock_announces"] = [getattr(m.lock_ctx, "announces", False)
                                 for m in (compilelock, cmodule)]
    return out


modules, mode = sys.argv[1].split(","), sys.argv[2]
before = snapshot()
for name in modules:
    importlib.import_module(name)
report = {"before": before, "imported": snapshot()}
if mode != "none":
    from crmn.config import ModelConfig, TrainConfig
    from original import compat
    from original.backend import TheanoBackend

    backend = TheanoBackend(ModelConfig(n=1, k=0.25, classes=10, memory=True),
                            TrainConfig(seed=0), dtype="float64", theano_mode=mode,
                            compile_cache=False)
    x = np.random.RandomState(0).rand(4, 3, 32, 32)
    ce, correct = backend.step(x, np.array([0, 1, 2, 3]), 0.1)
    report["ce"] = float(ce)
    report["stepped"] = snapshot()
    with compat.graph_settings():  # what a graph gets while it is built (not vacuous)
        report["inside"] = snapshot()
    report["after"] = snapshot()
print(json.dumps(report))
"""


def _c_mode_works():
    from original import compat

    return compat.c_mode_available()[0]


def run_probe(modules, mode="none"):
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", PROBE, ",".join(modules), mode], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _modules():
    names = ["crmn", "crmn.train", "original", "original.model", "original.backend"]
    try:
        import torch  # noqa: F401
    except ImportError:
        return names  # the current environment has no torch, so no modern/
    return names + ["modern", "modern.backend"]


def test_importing_the_archive_changes_no_process_setting():
    report = run_probe(_modules())
    before, imported = report["before"], report["imported"]
    assert imported["limit"] == before["limit"] < 20000
    assert imported["numpy"] == before["numpy"]
    assert not imported["scan_ext_blocked"]
    assert imported["autocast_exact"] is False
    assert imported["lock_announces"] == [False, False]


def test_importing_crmn_alone_does_not_load_theano():
    report = run_probe(["crmn", "crmn.train"])
    assert report["imported"] == report["before"]
    assert "autocast_exact" not in report["imported"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["c", "jax"])
def test_building_and_stepping_a_network_puts_everything_back(mode):
    if mode == "c" and not _c_mode_works():
        pytest.skip("no Theano C mode in this environment (numpy 2)")
    report = run_probe(["original.backend"], mode)
    imported, stepped, inside = report["imported"], report["stepped"], report["inside"]
    assert report["ce"] > 0
    assert stepped == report["after"] == imported
    # inside the graph settings, the same process sees every one of them applied
    assert inside["limit"] == 20000 and inside["scan_ext_blocked"]
    assert inside["lock_announces"] == [True, True]
    import numpy as np

    if int(np.__version__.split(".")[0]) >= 2:
        assert inside["autocast_exact"] is True and "product" in inside["numpy"]
        assert "product" not in stepped["numpy"]
