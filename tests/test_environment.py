"""requirements.txt and environment.yml carry the same pins (SPEC §3)."""
import re
from pathlib import Path

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
