"""Does this Python have what the archive needs? (CRMN_PYTHON, see scripts/ensure_env.sh)

    /path/to/python scripts/check_python.py [EXTRA ...]

Exits 0 when every package is installed; else prints one line naming the missing ones and
the pip command that installs them, and exits 1. EXTRA names more distributions to require
(tests/run.sh adds pytest). Standard library only: it runs before anything is known about
the interpreter. torch is optional (the PyTorch backend is refused in one line without it).
"""
from __future__ import annotations

import sys
from importlib import metadata

#: distributions the Theano backend and the command line import, any version
REQUIRED = ("numpy", "scipy", "h5py", "matplotlib", "tqdm", "filelock", "jax", "jaxlib")
#: the archive's bridges are written for exactly these releases
EXACT = {"theano-pymc": "1.1.2", "Lasagne": "0.1"}
#: how to bring the two pure-Python wheels to a machine without a network
WHEEL_HINT = ("build their wheels once where there is a network with "
              "`python3.11 -m pip wheel --no-deps -w WHEELS theano-pymc==1.1.2 Lasagne==0.1` "
              "(theano-pymc's source does not build on Python 3.12) and copy WHEELS here")


def installed(name: str):
    """The installed version of distribution ``name``, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def missing(extra=()) -> tuple:
    """(plain packages missing, exact pins missing or of another version, as "name==v")."""
    plain = [name for name in tuple(REQUIRED) + tuple(extra) if installed(name) is None]
    exact = [f"{name}=={version}" for name, version in EXACT.items()
             if installed(name) != version]
    return plain, exact


def message(python: str, plain, exact) -> str:
    """The one line for what is missing (empty when nothing is)."""
    if not plain and not exact:
        return ""
    names = plain + exact
    parts = []
    if plain:
        parts.append(f"`{python} -m pip install {' '.join(plain)}`")
    if exact:
        parts.append(f"`{python} -m pip install --no-index --find-links WHEELS "
                     f"{' '.join(exact)}` ({WHEEL_HINT})")
    return (f"ensure_env: CRMN_PYTHON={python} lacks {', '.join(names)}: install with "
            + " and ".join(parts))


def main(argv) -> int:
    line = message(sys.executable, *missing(argv))
    if line:
        print(line, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
