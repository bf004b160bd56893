"""Record the float64 references of the Theano backend from the pinned C mode.

    CRMN_VENV=... bash -c 'source scripts/ensure_env.sh && PYTHONPATH=. "$CRMN_PY" scripts/make_references.py'
    # or simply, in the pinned environment:  PYTHONPATH=. .venv/bin/python scripts/make_references.py

Writes tests/references/theano_c_float64.npz (see original/references.py for what it holds);
refuses in one line where Theano's C mode cannot run (the current environment). Run it
again after a change to the cases or to the networks, then commit the file.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crmn.errors import CRMNError  # noqa: E402


def main() -> int:
    from original import references

    start = time.perf_counter()
    try:
        arrays = references.record()
    except CRMNError as err:
        print(f"make_references: {err}", file=sys.stderr)
        return 1
    size = references.REFERENCES.stat().st_size
    print(f"make_references: {len(arrays)} arrays, {size / 1e6:.2f} MB in "
          f"{references.REFERENCES} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
