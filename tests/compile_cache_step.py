"""One SGD step of a tiny float64 CRMN in the JAX mode, in a fresh process, for the compile
cache's tests (tests/test_compile_cache.py)::

    python tests/compile_cache_step.py STATE.npz [--no-compile-cache]

Writes the state after the step (canonical names) to STATE.npz and prints one JSON line:
``{"cache": "hit" | "miss" | "off", "compile_seconds": ...}``. The cache folder is
``$CRMN_CACHE``.
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crmn import registry  # noqa: E402
from crmn.config import ModelConfig, TrainConfig  # noqa: E402
from crmn.registry import BackendOptions  # noqa: E402

#: the network: one CRMN block per stage, width 0.5 (the smoke test's), 10 classes
MODEL = ModelConfig(n=1, k=0.5, classes=10, memory=True)
TRAIN = TrainConfig(batch_size=4, lr_stages=(0.1,), seed=7)


def main(argv):
    out = Path(argv[0])
    options = BackendOptions("theano", dtype="float64", theano_mode="jax",
                           compile_cache="--no-compile-cache" not in argv)
    backend = registry.build(options, MODEL, TRAIN)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((TRAIN.batch_size, 3, 32, 32))
    y = rng.integers(0, MODEL.classes, TRAIN.batch_size)
    backend.step(x, y, 0.1)
    np.savez(out, **backend.get_state())
    print(json.dumps({"cache": backend.cache_outcome, "compile_seconds": backend.compile_seconds}))


if __name__ == "__main__":
    main(sys.argv[1:])
