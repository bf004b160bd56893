"""requirements.txt and environment.yml carry the same pins (docs/spec.md §3)."""
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.current  # framework-free: runs in the current environment too

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines):
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip().lstrip("-").strip()
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*==\s*([^\s;]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_pip_and_conda_pins_agree():
    req = _pins((ROOT / "requirements.txt").read_text().splitlines())
    yml = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, l in enumerate(yml) if l.strip() == "- pip:")
    conda = _pins(yml[start + 1:])
    assert req, "requirements.txt pins nothing"
    assert req == conda
    assert any(l.strip() == "- python=3.11" for l in yml)


def test_the_pins_the_spec_names():
    req = _pins((ROOT / "requirements.txt").read_text().splitlines())
    assert req["numpy"] == "1.23.5"
    assert req["theano-pymc"] == "1.1.2"
    assert req["lasagne"] == "0.1"


# --- the current environment and CRMN_PYTHON (scripts/ensure_env.sh) ----------------------

def test_current_requirements_pin_todays_backend_without_torch():
    cur = _pins((ROOT / "requirements-current.txt").read_text().splitlines())
    assert cur["numpy"].startswith("2.")
    assert cur["jax"].startswith("0.11.") and cur["jaxlib"] == cur["jax"]
    assert cur["theano-pymc"] == "1.1.2" and cur["lasagne"] == "0.1"
    assert "torch" not in cur and "setuptools" not in cur  # compat stands in for both uses


def _source_env(env, tmp_path):
    """Source ensure_env.sh in a clean shell with ``env`` added; (exit code, $CRMN_PY,
    stderr)."""
    import os
    import subprocess

    full = {k: v for k, v in os.environ.items()
            if k not in ("CRMN_PROFILE", "CRMN_PYTHON", "CRMN_VENV", "CRMN_NEEDS")}
    full.update(env)
    out = subprocess.run(["bash", "-c", 'source scripts/ensure_env.sh; echo "$CRMN_PY"'],
                         cwd=ROOT, env=full, capture_output=True, text=True, timeout=120)
    return out.returncode, out.stdout.strip(), out.stderr.strip()


def test_crmn_python_is_used_as_it_is(tmp_path):
    import sys

    code, py, err = _source_env({"CRMN_PYTHON": sys.executable, "CRMN_NEEDS": "pytest"},
                                tmp_path)
    assert (code, py) == (0, sys.executable), err


def test_crmn_python_lacking_packages_is_one_line_with_the_pip_commands(tmp_path):
    import subprocess
    import sys

    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True,
                   timeout=120)
    code, py, err = _source_env({"CRMN_PYTHON": str(bare / "bin" / "python"),
                                 "CRMN_NEEDS": "pytest"}, tmp_path)
    assert code == 1 and py == ""
    assert len(err.splitlines()) == 1, err
    assert f"CRMN_PYTHON={bare / 'bin' / 'python'} lacks numpy," in err
    assert "pytest" in err and "theano-pymc==1.1.2, Lasagne==0.1" in err
    assert f"`{bare / 'bin' / 'python'} -m pip install numpy " in err
    assert "pip wheel --no-deps -w WHEELS theano-pymc==1.1.2 Lasagne==0.1" in err


def test_unknown_profile_and_missing_interpreter_are_one_line(tmp_path):
    code, _, err = _source_env({"CRMN_PROFILE": "newest"}, tmp_path)
    assert code == 1 and err == ("ensure_env: CRMN_PROFILE=newest is not an environment: "
                                 "choose pinned (the default) or current")
    code, _, err = _source_env({"CRMN_PYTHON": str(tmp_path / "no-python")}, tmp_path)
    assert code == 1 and err == ("ensure_env: CRMN_PYTHON is not an executable Python "
                                 "interpreter; point it at a python binary")
