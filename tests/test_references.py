"""The JAX mode against the float64 references recorded from the pinned Theano C mode
(original/references.py, tests/references/theano_c_float64.npz).

Marked ``current``: these run in both environments. Where Theano's C mode works (the
pinned environment) the references are also proven current: a fresh C run of every case
equals the stored arrays.
"""
import numpy as np
import pytest

import original  # noqa: F401  (compat bridges first)
from original import compat, references

pytestmark = pytest.mark.current

TOL = references.TOL
C_OK, C_WHY = compat.c_mode_available()
needs_c = pytest.mark.skipif(not C_OK, reason=f"no Theano C mode here: {C_WHY}")


@pytest.fixture(scope="module")
def refs():
    return references.load()


def _assert_close(got, want, what):
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what} output {i}"
        worst = float(np.abs(a - b).max(initial=0.0))
        assert worst <= TOL, f"{what} output {i}: {worst:.3g} > {TOL}"


def test_the_references_are_small_and_float64(refs):
    assert references.REFERENCES.stat().st_size < 5e6
    floats = [v for k, v in refs.items() if k != "meta" and v.dtype.kind == "f"]
    assert floats and all(v.dtype == np.float64 for v in floats)
    assert set(references.OP_CASES) == {k.split("/")[1] for k in refs if k.startswith("op/")}
    assert set(references.E2E_MODELS) == {k.split("/")[1] for k in refs
                                          if k.startswith("e2e/")}


@pytest.mark.parametrize("name", sorted(references.OP_CASES))
@pytest.mark.slow
def test_jax_mode_op_equals_the_reference(refs, name):
    got = references.run_op(name, "jax", refs)
    _assert_close(got, references.op_outputs(refs, name), name)


@pytest.fixture(scope="module", params=sorted(references.E2E_MODELS))
def e2e_jax(request):
    return request.param, references.run_e2e(request.param, "jax")


@pytest.mark.slow
def test_jax_mode_three_steps_equal_the_reference(refs, e2e_jax):
    name, got = e2e_jax
    want = references.e2e_outputs(refs, name)
    worst, where = references.worst_difference(got, want)
    assert worst <= TOL, f"{name}: {where} differs by {worst:.3g}"
    # the steps did something: the velocities moved away from zero
    assert all(np.abs(v).max() > 0 for k, v in want.items() if "velocity" in k)


@pytest.mark.slow
def test_a_perturbed_result_is_caught(refs, e2e_jax):
    """The comparison sees a difference of a float32 rounding (what a Python float turned
    float32 constant does to a float64 graph)."""
    name, got = e2e_jax
    want = references.e2e_outputs(refs, name)
    bad = dict(got)
    key = next(k for k in sorted(bad) if k.startswith("final/"))
    bad[key] = bad[key] * (1 + 6e-8)
    assert references.worst_difference(bad, want)[0] > TOL


@needs_c
@pytest.mark.parametrize("name", sorted(references.OP_CASES))
@pytest.mark.slow
def test_the_op_references_are_current(refs, name):
    _assert_close(references.run_op(name, "c", refs), references.op_outputs(refs, name), name)


@needs_c
@pytest.mark.parametrize("name", sorted(references.E2E_MODELS))
@pytest.mark.slow
def test_the_e2e_references_are_current(refs, name):
    worst, where = references.worst_difference(references.run_e2e(name, "c"),
                                               references.e2e_outputs(refs, name))
    assert worst <= TOL, f"{name}: {where} differs by {worst:.3g}"


def test_missing_references_are_one_line(tmp_path):
    from crmn.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        references.load(tmp_path / "none.npz")
    assert "make_references.py" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_check_jax_lists_every_case_within_tolerance(refs, monkeypatch):
    """The entry point for ``verify``: one row per case (the end-to-end runs replaced by
    the stored results here, to keep the test short; the tests above run them)."""
    monkeypatch.setattr(references, "run_e2e",
                        lambda name, mode, device: references.e2e_outputs(refs, name))
    rows = references.check_jax("cpu", refs)
    assert [r[0] for r in rows] == ([f"op/{n}" for n in references.OP_CASES]
                                    + [f"e2e/{n}" for n in references.E2E_MODELS])
    assert all(worst <= TOL for _, worst in rows), rows
