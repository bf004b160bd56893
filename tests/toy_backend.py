"""A deterministic numpy backend for testing the training loop (crmn/train.py) in seconds.

Softmax regression on flattened, centred images: logits = (x - m) W + b, where m is the
batch mean in training mode and a running average of it (a batch-norm-like state array) in
inference mode. It honours the whole :class:`crmn.backend.Backend` contract with
canonical-looking names: ``fc.W (D, C)``, ``fc.b (C,)``, ``bn0.mean (D,)`` and the
velocities ``velocity.fc.W``, ``velocity.fc.b``; SGD with Lasagne's classical momentum
(``v <- mu v - lr g``, ``p <- p + v``) and L2 weight decay on ``fc.W`` only.

It trains on small fake CIFAR-10 files (:func:`toy_data_dir`, written once by
``crmn.data.write_fake``), read through the real loader. Hooks for fault tests:
:func:`run_toy` ``crash_after=k`` wraps :func:`crmn.train.train_epoch` so that the
(k+1)-th epoch raises :class:`SimulatedCrash` (a run killed between epochs), and
``sleep_s`` slows each step so that a subprocess can be killed mid-epoch. ``python
tests/toy_backend.py RUN_DIR [--resume] [--sleep S]`` runs the loop (the SIGKILL test).
"""
from __future__ import annotations

import contextlib
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

if __name__ == "__main__":  # run as a script from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crmn.config import ModelConfig, TrainConfig
from crmn.errors import CheckpointError
from crmn.naming import BN_ALPHA, velocity_name

TRAINABLE = ("fc.W", "fc.b")
#: the toy data: fake CIFAR-10 in the official format, the same bytes on every call, with a
#: share of the training labels replaced at random so that validation results go up and down
TOY_DATA = dict(name="cifar10", n_train=100, n_test=40, seed=0)
LABEL_NOISE = 0.3
FEATURES = 3 * 32 * 32


class SimulatedCrash(RuntimeError):
    """Stands for a killed process in in-process resume tests."""


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class ToyBackend:
    """Softmax regression over flattened 3x32x32 images; see the module docstring.

    Parameters
    ----------
    model : ModelConfig
        Only ``classes`` is used.
    train : TrainConfig
        ``seed`` initialises ``fc.W``; ``momentum``, ``weight_decay``, ``nesterov`` (must
        be False) drive the update.
    """

    name = "toy"

    def __init__(self, model: ModelConfig, train: TrainConfig, dtype: str = "float64",
                 sleep_s: float = 0.0):
        self.model, self.train, self.dtype = model, train, np.dtype(dtype)
        self.device = f"cpu (numpy {np.__version__})"
        self.sleep_s = sleep_s
        rng = np.random.default_rng(train.seed)
        d, c = FEATURES, model.classes
        self.p = {"fc.W": (0.01 * rng.standard_normal((d, c))).astype(self.dtype),
                  "fc.b": np.zeros(c, self.dtype),
                  "bn0.mean": np.zeros(d, self.dtype)}
        self.reset_velocity()

    # --- contract -------------------------------------------------------------------------
    def param_count(self) -> int:
        return sum(self.p[n].size for n in TRAINABLE)

    def _logits(self, x: np.ndarray, training: bool) -> Tuple[np.ndarray, np.ndarray]:
        f = x.reshape(len(x), -1).astype(self.dtype)  # (B, D)
        mean = f.mean(axis=0) if training else self.p["bn0.mean"]
        xc = f - mean
        return xc @ self.p["fc.W"] + self.p["fc.b"], xc

    def logits(self, x: np.ndarray, training: bool) -> np.ndarray:
        return self._logits(np.asarray(x), training)[0]

    def step(self, x: np.ndarray, y: np.ndarray, lr: float) -> Tuple[float, int]:
        with np.errstate(over="ignore", invalid="ignore"):
            z, xc = self._logits(x, training=True)
            logp = _log_softmax(z)
            loss_sum = float(-logp[np.arange(len(y)), y].sum())
            correct = int((z.argmax(axis=1) == y).sum())
            g = np.exp(logp)
            g[np.arange(len(y)), y] -= 1
            g /= len(y)  # d loss / d logits, (B, C)
            grads = {"fc.W": xc.T @ g + self.train.weight_decay * self.p["fc.W"],
                     "fc.b": g.sum(axis=0)}
            mu = self.train.momentum
            for n in TRAINABLE:
                v = self.v[n] = mu * self.v[n] - lr * grads[n]
                self.p[n] = self.p[n] + v
        batch_mean = x.reshape(len(x), -1).mean(axis=0)
        self.p["bn0.mean"] = (1 - BN_ALPHA) * self.p["bn0.mean"] + BN_ALPHA * batch_mean
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return loss_sum, correct

    def get_state(self) -> Dict[str, np.ndarray]:
        state = {n: a.copy() for n, a in self.p.items()}
        state.update({velocity_name(n): self.v[n].copy() for n in TRAINABLE})
        return state

    def set_state(self, state: Dict[str, np.ndarray]) -> None:
        want = {n: a.shape for n, a in self.get_state().items()}
        for n, shape in want.items():
            if n not in state or state[n].shape != shape:
                got = None if n not in state else state[n].shape
                raise CheckpointError(f"toy backend: array {n} has shape {got}, "
                                      f"expected {shape}")
        self.p = {n: np.array(state[n], dtype=self.dtype) for n in self.p}
        self.v = {n: np.array(state[velocity_name(n)], dtype=self.dtype) for n in TRAINABLE}

    def reset_velocity(self) -> None:
        self.v = {n: np.zeros_like(self.p[n]) for n in TRAINABLE}


def toy_data_dir() -> Path:
    """The toy data (:data:`TOY_DATA`), written once per machine into the temp folder."""
    from crmn import data

    root = Path(tempfile.gettempdir()) / "crmn-toy-data-v3"
    if not (root / data.dataset_info(TOY_DATA["name"]).folder).is_dir():
        tmp = Path(tempfile.mkdtemp(prefix="crmn-toy-data-"))
        folder = data.write_fake(TOY_DATA["name"], tmp, TOY_DATA["n_train"],
                                 TOY_DATA["n_test"], seed=TOY_DATA["seed"])
        rng = np.random.default_rng(TOY_DATA["seed"])
        for f in sorted(folder.glob("data_batch_*")):  # training images only
            with open(f, "rb") as fh:
                batch = pickle.load(fh)
            labels = np.array(batch[b"labels"])
            noisy = rng.random(len(labels)) < LABEL_NOISE
            labels[noisy] = rng.integers(0, 10, int(noisy.sum()))
            batch[b"labels"] = labels.tolist()
            with open(f, "wb") as fh:
                pickle.dump(batch, fh, protocol=2)
        try:
            tmp.rename(root)  # another process may have won the race: its files are equal
        except OSError:
            pass
    return root


TOY_MODEL = ModelConfig(n=1, k=1, classes=10, memory=False)
TOY_TRAIN = TrainConfig(batch_size=10, lr_stages=(0.1, 0.01), patience=2, epochs_cap=4,
                        pad=1, seed=3)


@contextlib.contextmanager
def epoch_hook(hook):
    """Call ``hook(backend, epoch, stats)`` after every :func:`crmn.train.train_epoch` of the
    loop (it may raise, or return replacement stats)."""
    from crmn import train as trainer

    real = trainer.train_epoch

    def wrapped(backend, sampler, epoch, lr, **kw):
        stats = real(backend, sampler, epoch, lr, **kw)
        replaced = hook(backend, epoch, stats)
        return stats if replaced is None else replaced

    trainer.train_epoch = wrapped
    try:
        yield
    finally:
        trainer.train_epoch = real


def crash_hook(epochs: int):
    """A hook for :func:`epoch_hook`: the (epochs+1)-th epoch dies before it is logged."""
    seen = [0]

    def hook(backend, epoch, stats):
        if seen[0] >= epochs:
            raise SimulatedCrash("simulated kill between epochs")
        seen[0] += 1

    return hook


def toy_spec(model=TOY_MODEL, train=TOY_TRAIN, dtype="float64"):
    from crmn import registry
    from crmn.plan import RunSpec

    # the toy backend is a registered backend for the tests only (built through a factory)
    registry.REGISTRY.setdefault("toy", "toy_backend:ToyBackend")
    registry.BACKEND_DTYPES.setdefault("toy", ("float32", "float64"))
    return RunSpec(model=model, train=train, dataset=TOY_DATA["name"],
                   data_dir=toy_data_dir(),
                   backend_options=registry.BackendOptions(backend="toy", dtype=dtype))


def run_toy(run_dir, *, resume=False, model=TOY_MODEL, train=TOY_TRAIN, crash_after=None,
            sleep_s=0.0, progress=False, dtype="float64", backend=None) -> dict:
    """Run :func:`crmn.train.run` on the toy backend (``backend``, or a fresh one).

    ``crash_after=k`` lets k epochs run, then raises :class:`SimulatedCrash`.
    """
    from crmn import train as trainer

    def factory():
        return backend or ToyBackend(model, train, dtype=dtype, sleep_s=sleep_s)

    hooked = epoch_hook(crash_hook(crash_after)) if crash_after is not None \
        else contextlib.nullcontext()
    with hooked:
        return trainer.run(run_dir, toy_spec(model, train, dtype), factory, resume=resume,
                           progress=progress)


if __name__ == "__main__":
    args = sys.argv[1:]
    sleep = float(args[args.index("--sleep") + 1]) if "--sleep" in args else 0.0
    run_toy(args[0], resume="--resume" in args, sleep_s=sleep, progress=True)
