"""The backends compute the same function and take the same SGD step (docs/spec.md §6): for
each pair of torch, Theano's C mode and Theano through JAX (float64, CPU), the logits and
the state after one ``step`` as ``max|a - b| / max|b|`` per array, from one state. ``--device
cuda`` holds ``modern/`` on the GPU to the CPU."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from crmn import paper, registry
from crmn.config import ModelConfig, TrainConfig
from crmn.data import BatchSampler
from crmn.errors import ConfigError
from crmn.naming import STATE_ROLES, spec_dict
from crmn.registry import BackendOptions, check_device
from crmn.train import train_epoch

TOLERANCE = 1e-6
TOLERANCE_F32 = 1e-4  # float32 (GPU) logits and loss against float64, TF32 off
#: float32 state *change*: gradients through batch norm are near-cancelling sums
UPDATE_TOLERANCE_F32 = 1e-2
BATCH_SIZE = 8  # images per batch when ``--batch-size`` is not given
GRAPH_STEPS = 3  # steps through the CUDA graph and eagerly before the states are compared

Config = Tuple[str, ModelConfig, TrainConfig]
_SMALL_BATCH = TrainConfig(batch_size=BATCH_SIZE)
#: the default configurations: small, covering ResNet, CRMN and the non-default options
DEFAULT_CONFIGS: Tuple[Config, ...] = (
    ("resnet-n1-k0.5", ModelConfig(n=1, k=0.5, classes=10, memory=False), _SMALL_BATCH),
    ("crmn-n1-k0.5", ModelConfig(n=1, k=0.5, classes=10, memory=True), _SMALL_BATCH),
    ("crmn-n2-k0.5-tanh-nesterov-glorot",
     ModelConfig(n=2, k=0.5, classes=100, memory=True, outgate="tanh", dense_init="glorot"),
     TrainConfig(batch_size=BATCH_SIZE, nesterov=True)),
)


@dataclass
class Result:
    """Largest relative differences of one configuration, by what was compared."""

    name: str
    diffs: Dict[str, float] = field(default_factory=dict)  # "logits (training)": 3e-15, ...
    worst: Dict[str, str] = field(default_factory=dict)  # which array gave the figure
    tolerance: float = TOLERANCE
    key_tol: Dict[str, float] = field(default_factory=dict)  # per-figure overrides

    def put(self, label: str, diff: float, worst: str, tol: Optional[float] = None) -> None:
        self.diffs[label], self.worst[label] = diff, worst
        if tol is not None:
            self.key_tol[label] = tol

    def tol(self, label: str) -> float:
        return self.key_tol.get(label, self.tolerance)

    @property
    def passed(self) -> bool:
        return all(np.isfinite(v) and v <= self.tol(k) for k, v in self.diffs.items())


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """``max|a - b| / max|b|`` (absolute when ``b`` is all zeros); inf on shape mismatch."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    scale = float(np.abs(b).max()) if b.size else 0.0
    d = float(np.abs(a - b).max()) if b.size else 0.0
    return d / scale if scale > 0 else d


def _worst(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray], keep: Callable[[str], bool]):
    pairs = [(rel_diff(a[k], b[k]), k) for k in b if keep(k)]
    return max(pairs) if pairs else (0.0, "-")


def _batch(cfg: ModelConfig, batch_size: int, seed: int):
    rng = np.random.default_rng(seed)  # images first, then labels
    return (rng.standard_normal((batch_size, 3, 32, 32)),
            rng.integers(0, cfg.classes, batch_size).astype(np.int64))


def _global(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray], base: Dict[str, np.ndarray],
            keep: Callable[[str], bool]):
    """``‖a - b‖ / ‖b - base‖`` over all kept arrays together, and the array adding most."""
    keys = [k for k in b if keep(k)]
    if not keys:
        return 0.0, "-"
    err = {k: float(np.sum((np.asarray(a[k], np.float64) - b[k]) ** 2)) for k in keys}
    den = sum(float(np.sum((np.asarray(b[k], np.float64) - base[k]) ** 2)) for k in keys)
    num = np.sqrt(sum(err.values()))
    return (num / np.sqrt(den) if den > 0 else num), max(err, key=err.get)


def _step_loss(backend, x, y, lr: float) -> float:
    """One ``step``; the batch's mean cross-entropy before it."""
    return float(backend.step(x, y, lr)[0]) / len(y)


def _compare(name: str, ref, other, cfg: ModelConfig, batch_size: int, lr: float, seed: int,
             tol: float, steps: int = 1, global_norm: bool = False,
             update_tol: Optional[float] = None) -> Result:
    """Copy ``ref``'s state into ``other``, then compare logits and ``steps`` train steps;
    ``global_norm``: the state's change as one vector within ``update_tol``."""
    base = ref.get_state()
    other.set_state(base)
    res = Result(name, tolerance=tol)
    x, y = _batch(cfg, batch_size, seed)
    for training, label in ((True, "logits (training)"), (False, "logits (inference)")):
        res.put(label, rel_diff(other.logits(x, training), ref.logits(x, training)), "logits")
    batches = [_batch(cfg, batch_size, seed + 1 + s) for s in range(steps)]
    losses = [(_step_loss(other, x, y, lr), _step_loss(ref, x, y, lr)) for x, y in batches]
    res.put("loss", max(abs(a - b) / abs(b) for a, b in losses), "cross-entropy")
    sa, sb = other.get_state(), ref.get_state()
    specs = spec_dict(cfg)
    groups = {
        "params after step": lambda k: k in specs and specs[k].role not in STATE_ROLES,
        "velocities after step": lambda k: k.startswith("velocity."),
        "BN stats after step": lambda k: k in specs and specs[k].role in STATE_ROLES,
    }
    for label, keep in groups.items():
        figure = _global(sa, sb, base, keep) if global_norm else _worst(sa, sb, keep)
        res.put(label, *figure, update_tol)
    return res


#: the three ways to run the network that ``verify`` holds equal, pair by pair
VERIFIED_BACKENDS = (("torch", BackendOptions("torch", dtype="float64")),
                     ("theano-c", BackendOptions("theano", dtype="float64", theano_mode="c")),
                     ("theano-jax", BackendOptions("theano", dtype="float64", theano_mode="jax")))


def verify_backends(cfg: ModelConfig, train: TrainConfig, name: str, lr: float = 0.1,
                    seed: int = 0, tol: float = TOLERANCE,
                    backends=VERIFIED_BACKENDS) -> List[Result]:
    """Every pair of ``backends``; the first of each pair gives the state."""
    built = {label: registry.build(options, cfg, train) for label, options in backends}
    pairs = [(a, b) for i, (a, _) in enumerate(backends) for b, _ in backends[i + 1:]]
    return [_compare(f"{name} [{b} vs {a}]", built[a], built[b], cfg, train.batch_size,
                     lr, seed, tol) for a, b in pairs]


def verify_device(cfg: ModelConfig, train: TrainConfig, name: str, device: str = "cuda",
                  lr: float = 0.1, seed: int = 0, tol: float = TOLERANCE) -> List[Result]:
    """``modern/`` on ``device`` against the CPU, and its CUDA graph against eager steps: float64
    array by array within ``tol``, float32 (TF32 off) within TOLERANCE_F32, and a GPU epoch."""

    def built(where, dtype, graph=False):
        return registry.build(BackendOptions("torch", where, dtype), cfg, train,
                              graph=graph and device.startswith("cuda"), tf32=False)

    B, results = train.batch_size, []
    f32 = dict(global_norm=True, update_tol=UPDATE_TOLERANCE_F32)  # the change as one vector
    for dtype, t, opts in (("float64", tol, {}), ("float32", TOLERANCE_F32, f32)):
        results += [
            _compare(f"{name} [{device} {dtype} vs cpu float64]", built("cpu", "float64"),
                     built(device, dtype), cfg, B, lr, seed, t, **opts),
            _compare(f"{name} [{device} {dtype}: graph vs eager, {GRAPH_STEPS} steps]",
                     built(device, dtype), built(device, dtype, graph=True), cfg, B, lr, seed,
                     t, steps=GRAPH_STEPS, **opts)]
        if dtype == "float64":
            results.append(_verify_epoch(cfg, train, name, device, lr, seed, tol))
    return results


def verify_references(device: str = "cpu") -> Result:
    """Theano through JAX on ``device`` against the float64 outputs Theano's C mode recorded
    (:mod:`original.references`): the comparison with the C mode where it cannot run."""
    from original import references

    res = Result(f"theano-jax on {device} vs stored theano-c float64 references",
                 tolerance=references.TOL)
    for case, diff in references.check_jax(device):
        res.put(case, diff, "largest absolute difference")
    return res


def _verify_epoch(cfg: ModelConfig, train: TrainConfig, name: str, device: str, lr: float,
                  seed: int, tol: float) -> Result:
    """The GPU epoch path (float64) against the CPU sampler: the gathered batches bit-equal,
    and one fast-path epoch ending where eager steps over the sampler's batches end."""
    import torch

    from modern import gpu as gpu_data

    B = train.batch_size
    rng = np.random.default_rng(seed)
    n = 3 * B + B // 2  # three full batches and a dropped remainder
    x = rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, cfg.classes, n).astype(np.int64)
    sampler = BatchSampler(x, y, B, seed=seed, pad=train.pad, flip=True)
    res = Result(f"{name} [{device} float64 epoch: resident gather + graph vs sampler + "
                 "eager]", tolerance=tol)
    plan, m = sampler.plan(1), len(sampler) * B
    # float32 pixels: gather_epoch must copy them bit for bit
    data = gpu_data.make_resident(x, y, train.pad, torch.device(device), torch.float32)
    xe, ye = gpu_data.gather_epoch(data, plan.order[:m], plan.dy[:m], plan.dx[:m],
                                   plan.flip[:m])
    xs, ys = map(np.concatenate, zip(*sampler.epoch(1)))
    equal = np.array_equal(xe.cpu().numpy(), xs) and np.array_equal(ye.cpu().numpy(), ys)
    res.put("batches (bit-equal)", 0.0 if equal else float("inf"), "images and labels")
    options = BackendOptions("torch", device, "float64")
    graph = registry.build(options, cfg, train, graph=device.startswith("cuda"), tf32=False)
    eager = registry.build(options, cfg, train, graph=False, tf32=False)  # graph's first state
    stats = train_epoch(graph, sampler, 1, lr, fast=True)
    losses = [_step_loss(eager, xb, yb, lr) for xb, yb in sampler.epoch(1)]
    mean = float(np.mean(losses))
    res.put("epoch loss", abs(stats.loss - mean) / abs(mean), "mean cross-entropy")
    res.put("state after epoch", *_worst(graph.get_state(), eager.get_state(), lambda k: True))
    return res


def select_configs(configs: Optional[Sequence[Union[str, Config]]] = None,
                   batch_size: Optional[int] = None) -> List[Config]:
    """The ``(name, ModelConfig, TrainConfig)`` triples to verify, from row ids or triples
    (default :data:`DEFAULT_CONFIGS`); ``batch_size`` overrides every batch."""
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    items = []
    for c in (DEFAULT_CONFIGS if configs is None else configs):
        if isinstance(c, str):
            items += [(row.id, ModelConfig.for_row(row), _SMALL_BATCH) for row in paper.select(c)]
        else:
            items.append(c)
    if batch_size is None:
        return items
    return [(name, cfg, replace(train, batch_size=batch_size))
            for name, cfg, train in items]


def verify(configs: Optional[Sequence[Union[str, Config]]] = None,
           device: str = "cpu", tol: Optional[float] = None, lr: float = 0.1, seed: int = 0,
           batch_size: Optional[int] = None,
           out: Callable[[str], None] = print) -> List[Result]:
    """The comparisons (the backends on the CPU, else :func:`verify_device`), printed."""
    check_device(device)
    items = select_configs(configs, batch_size)
    missing = {}  # on the CPU: the backends this environment cannot build, and why
    for label, options in VERIFIED_BACKENDS if device == "cpu" else ():
        try:
            registry.probe(options)
        except ConfigError as exc:
            missing[label] = str(exc)
            out(f"{label}: not built here ({exc})")
    backends = tuple(b for b in VERIFIED_BACKENDS if b[0] not in missing)
    results = []

    def show(batch: List[Result]) -> None:
        for r in batch:
            out(f"{r.name}: {'PASS' if r.passed else 'FAIL'}")
            for label, v in r.diffs.items():
                out(f"  {label:24s} {v:10.3e} <= {r.tol(label):g}  ({r.worst[label]})")
        results.extend(batch)

    if "theano-c" in missing and "theano-jax" not in missing:
        show([verify_references()])  # the C mode's figures, as it recorded them
    for name, cfg, train in items:
        if device == "cpu":
            show(verify_backends(cfg, train, name, lr, seed, tol or TOLERANCE, backends))
        else:
            show(verify_device(cfg, train, name, device, lr, seed, tol or TOLERANCE))
    n_fail = sum(not r.passed for r in results)
    out(f"{len(results) - n_fail}/{len(results)} PASS" + (f", {n_fail} FAIL" if n_fail else ""))
    return results
