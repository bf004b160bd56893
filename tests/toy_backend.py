"""A deterministic numpy Backend for testing the training driver (crmn/train.py) in seconds.

Softmax regression on flattened, centred images: logits = (x - m) W + b, where m is the
batch mean in training mode and a running average of it (a batch-norm-like state array) in
inference mode. It honours the whole :class:`crmn.backend.Backend` protocol with
canonical-looking names: ``fc.W (D, C)``, ``fc.b (C,)``, ``bn0.mean (D,)`` and the
velocities ``velocity.fc.W``, ``velocity.fc.b``; SGD with Lasagne's classical momentum
(``v <- mu v - lr g``, ``p <- p + v``) and L2 weight decay on ``fc.W`` only.

Hooks for fault tests: a :class:`CrashBudget` raises :class:`SimulatedCrash` at the start of
``train_epoch`` once its epochs are spent (a run killed between epochs), and ``sleep_s`` slows
each batch so that a subprocess can be killed mid-epoch. ``python tests/toy_backend.py
RUN_DIR [--resume] [--sleep S]`` runs the driver on :func:`toy_splits` (used by the SIGKILL
test).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np

if __name__ == "__main__":  # run as a script from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crmn.backend import EpochStats
from crmn.config import ModelConfig, TrainConfig
from crmn.errors import CheckpointError, DivergedError
from crmn.naming import BN_ALPHA, velocity_name

TRAINABLE = ("fc.W", "fc.b")


class SimulatedCrash(RuntimeError):
    """Stands for a killed process in in-process resume tests."""


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class ToyBackend:
    """Softmax regression over ``features`` inputs; see the module docstring.

    Parameters
    ----------
    model : ModelConfig
        Only ``classes`` is used.
    train : TrainConfig
        ``seed`` initialises ``fc.W``; ``momentum``, ``weight_decay``, ``nesterov`` (must
        be False) drive the update.
    features : int
        Flattened input size C·H·W of the images the backend will see.
    """

    name = "toy"

    def __init__(self, model: ModelConfig, train: TrainConfig, features: int,
                 dtype: str = "float64", crash_budget: Optional["CrashBudget"] = None,
                 sleep_s: float = 0.0):
        self.model, self.train, self.dtype = model, train, np.dtype(dtype)
        self.device = f"cpu (numpy {np.__version__})"
        self.crash_budget, self.sleep_s = crash_budget, sleep_s
        rng = np.random.default_rng(train.seed)
        d, c = features, model.classes
        self.p = {"fc.W": (0.01 * rng.standard_normal((d, c))).astype(self.dtype),
                  "fc.b": np.zeros(c, self.dtype),
                  "bn0.mean": np.zeros(d, self.dtype)}
        self.reset_velocity()

    # --- protocol ---------------------------------------------------------------------
    def param_count(self) -> int:
        return sum(self.p[n].size for n in TRAINABLE)

    def _logits(self, x: np.ndarray, training: bool) -> Tuple[np.ndarray, np.ndarray]:
        f = x.reshape(len(x), -1).astype(self.dtype)  # (B, D)
        mean = f.mean(axis=0) if training else self.p["bn0.mean"]
        xc = f - mean
        return xc @ self.p["fc.W"] + self.p["fc.b"], xc

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        return self._logits(x, training)[0]

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> Tuple[float, float]:
        with np.errstate(over="ignore", invalid="ignore"):
            z, xc = self._logits(x, training=True)
            logp = _log_softmax(z)
            loss = float(-logp[np.arange(len(y)), y].mean())
            acc = float((z.argmax(axis=1) == y).mean())
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
        return loss, acc

    def train_epoch(self, sampler, epoch: int, lr: float,
                    progress: Optional[Callable[[int, int, float], None]] = None) -> EpochStats:
        if self.crash_budget is not None:
            self.crash_budget.spend()
        t0 = time.perf_counter()
        losses, accs, images, total = [], [], 0, len(sampler)
        for i, (xb, yb) in enumerate(sampler.epoch(epoch)):
            loss, acc = self.train_step(xb, yb, lr)
            if not np.isfinite(loss):
                raise DivergedError(f"toy backend: loss {loss} at batch {i} of epoch {epoch}")
            losses.append(loss * len(yb))
            accs.append(acc * len(yb))
            images += len(yb)
            if progress is not None:
                progress(i + 1, total, sum(losses) / images)
            if self.sleep_s:
                time.sleep(self.sleep_s)
        return EpochStats(loss=sum(losses) / images, acc=sum(accs) / images, images=images,
                          seconds=time.perf_counter() - t0)

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int) -> Tuple[float, float]:
        loss = acc = 0.0
        with np.errstate(over="ignore", invalid="ignore"):
            for s in range(0, len(x), batch_size):
                z = self.forward(x[s:s + batch_size], training=False)
                yb = y[s:s + batch_size]
                loss += float(-_log_softmax(z)[np.arange(len(yb)), yb].sum())
                acc += float((z.argmax(axis=1) == yb).sum())
        return loss / len(x), acc / len(x)

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


def toy_splits(classes: int = 3, n_train: int = 60, n_test: int = 30, size: int = 6,
               seed: int = 0) -> dict:
    """Learnable blobs shaped like tiny images: ``{"search": Split, "final": Split}``.

    The search split holds out the last 10 % of the training images as validation, the
    final split trains on all of them and evaluates on a separate test set.
    """
    from crmn.data import Split

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, 3, size, size)).astype(np.float32)

    def draw(n):
        y = rng.integers(0, classes, n).astype(np.int64)
        x = centres[y] + 1.5 * rng.standard_normal((n, 3, size, size)).astype(np.float32)
        return x.astype(np.float32), y

    x, y = draw(n_train)
    xt, yt = draw(n_test)
    n_val = n_train // 10
    return {"search": Split(x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:], "val"),
            "final": Split(x, y, xt, yt, "test")}


TOY_MODEL = ModelConfig(n=1, k=1, classes=3, memory=False)
TOY_TRAIN = TrainConfig(batch_size=10, lr_stages=(0.1, 0.01), patience=2, max_epochs=4,
                        pad=1, seed=3)


class CrashBudget:
    """Epochs left before a simulated kill, shared by every backend one run builds."""

    def __init__(self, epochs: Optional[int]):
        self.left = epochs

    def spend(self) -> None:
        if self.left is not None:
            if self.left <= 0:
                raise SimulatedCrash("simulated kill between epochs")
            self.left -= 1


def run_toy(run_dir, *, resume=False, model=TOY_MODEL, train=TOY_TRAIN, crash_after=None,
            sleep_s=0.0, progress=False, dtype="float64", splits=None) -> dict:
    """Run :func:`crmn.train.run` on the toy backend and :func:`toy_splits`.

    ``crash_after=k`` lets k epochs run, then raises :class:`SimulatedCrash`.
    """
    from crmn import train as trainer

    splits = splits or toy_splits(classes=model.classes)
    features = splits["search"].train_x[0].size
    budget = CrashBudget(crash_after)

    def factory():
        return ToyBackend(model, train, features, dtype=dtype, crash_budget=budget,
                          sleep_s=sleep_s)

    return trainer.run(run_dir, model=model, train=train, dataset="toy", data_dir=None,
                       backend="toy", dtype=dtype, resume=resume, progress=progress,
                       splits=splits, backend_factory=factory)


if __name__ == "__main__":
    args = sys.argv[1:]
    sleep = float(args[args.index("--sleep") + 1]) if "--sleep" in args else 0.0
    run_toy(args[0], resume="--resume" in args, sleep_s=sleep, progress=True)
