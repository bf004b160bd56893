"""Float64 outputs of the pinned C mode, to which the JAX mode is held (numpy 2): per op
(:data:`OP_CASES`, outputs and gradients) and end to end (:data:`E2E_MODELS`, three SGD steps);
``scripts/make_references.py`` records them (:func:`record`)."""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

from original import compat
import lasagne
import theano
import theano.tensor as T
from theano.tensor.signal.pool import pool_2d

from crmn.config import ModelConfig, TrainConfig
from crmn.errors import ConfigError

REFERENCES = Path(__file__).resolve().parents[1] / "tests" / "references" / "theano_c_float64.npz"
#: the largest absolute difference the JAX mode may show against them (float64 rounding)
TOL = 1e-12
#: the end-to-end run: steps, batch size, learning rate, seed of the batches
E2E_STEPS, E2E_BATCH, E2E_LR, E2E_SEED = 3, 4, 0.1, 0
#: tiny networks: the LSTM's input weights (2048 x units per gate) dominate the file
E2E_MODELS = {
    "resnet": ModelConfig(n=1, k=0.5, classes=10, memory=False),
    **{f"crmn-{gate}": ModelConfig(n=1, k=0.5, classes=10, memory=True, outgate=gate,
                                   lstm_units=4) for gate in ("logistic", "tanh")},
}
E2E_TRAIN = TrainConfig(batch_size=E2E_BATCH, seed=3)


def _randn(*shape, seed):
    return np.random.RandomState(seed).randn(*shape)


# Each case returns (symbolic inputs, outputs, input values, shared variables, the op names
# that must be in the compiled graph: one set per backend that may compile it), built under
# floatX=float64; shared variables get their values from the references.

_CONV_OPS = ({"CorrMM", "CorrMM_gradWeights", "CorrMM_gradInputs"},
             {"AbstractConv2d", "AbstractConv2d_gradWeights", "AbstractConv2d_gradInputs"})


def _conv_case(border, stride):
    x, w, r = T.tensor4("x"), T.tensor4("w"), T.tensor4("r")
    conv = T.nnet.conv2d(x, w, border_mode=border, subsample=(stride, stride))
    gx, gw = T.grad((conv * r).sum(), [x, w])
    xv, wv = _randn(2, 3, 9, 9, seed=1), _randn(4, 3, 3, 3, seed=2)
    size = {"valid": 7, "half": 9, "full": 11}.get(border, 9)
    out = (size - 1) // stride + 1
    return [x, w, r], [conv, gx, gw], [xv, wv, _randn(2, 4, out, out, seed=3)], [], _CONV_OPS


def _pool_case(mode, ignore_border, size, grad):
    x = T.tensor4("x")
    pooled = pool_2d(x, (2, 2), ignore_border=ignore_border, stride=(2, 2), mode=mode)
    xv = _randn(2, 3, size, size, seed=4)
    if not grad:
        return [x], [pooled], [xv], [], ({"Pool"},)
    r = T.tensor4("r")
    gx = T.grad((pooled * r).sum(), x)
    out = size // 2 if ignore_border else (size + 1) // 2
    return [x, r], [pooled, gx], [xv, _randn(2, 3, out, out, seed=5)], [], \
        ({"Pool", "AveragePoolGrad"},)


def _lstm_case(outgate):
    from original.model import _lstm
    cfg = ModelConfig(n=1, k=0.5, classes=10, memory=True, outgate=outgate, lstm_units=7)
    x = T.tensor3("x")  # (B, steps, inputs)
    layer = _lstm(lasagne.layers.InputLayer((None, 3, 6), input_var=x), cfg)
    h = lasagne.layers.get_output(layer)  # (B, 3, 7)
    params = lasagne.layers.get_all_params(layer)
    r = T.tensor3("r")
    grads = T.grad((h * r).sum(), [x] + params)
    return [x, r], [h] + grads, [_randn(2, 3, 6, seed=20), _randn(2, 3, 7, seed=21)], \
        params, ({"Split", "Join"}, {"Join"})


def _softmax_case():
    h, w, b, y = T.matrix("h"), T.matrix("w"), T.vector("b"), T.lvector("y")
    logits = T.dot(h, w) + b
    ce = lasagne.objectives.categorical_crossentropy(T.nnet.softmax(logits), y).mean()
    acc = T.mean(T.eq(T.argmax(logits, axis=1), y))
    values = [_randn(6, 5, seed=9), _randn(5, 10, seed=10), _randn(10, seed=11),
              np.array([0, 3, 9, 3, 1, 7], dtype=np.int64)]
    return [h, w, b, y], [ce, acc] + T.grad(ce, [h, w, b]), values, [], \
        ({"CrossentropySoftmaxArgmax1HotWithBias", "CrossentropySoftmax1HotWithBiasDx",
          "Argmax"},)


OP_CASES: Dict[str, Callable] = {
    **{f"conv-{name}-s{stride}": partial(_conv_case, border, stride)
       for name, border in (("valid", "valid"), ("half", "half"), ("full", "full"),
                            ("pad1", (1, 1)))
       for stride in (1, 2)},
    "pool-average-tap": partial(_pool_case, "average_inc_pad", True, 8, grad=True),
    "pool-average-border": partial(_pool_case, "average_inc_pad", False, 7, grad=True),
    "pool-max": partial(_pool_case, "max", True, 8, grad=False),
    "lstm-logistic": partial(_lstm_case, "logistic"),
    "lstm-tanh": partial(_lstm_case, "tanh"),
    "softmax-crossentropy": _softmax_case,
}


def op_names(fn) -> set:
    """Op class names of a compiled function's graph, Elemwise's and Composite's included."""
    names, nodes = set(), list(fn.maker.fgraph.apply_nodes)
    while nodes:
        op = nodes.pop().op
        names.add(type(op).__name__)
        scalar = getattr(op, "scalar_op", None)
        if scalar is not None:
            names.add(type(scalar).__name__)
            nodes += getattr(getattr(scalar, "fgraph", None), "apply_nodes", [])
    return names


def run_op(name: str, mode: str, refs: Dict[str, np.ndarray],
           device: str = "cpu") -> List[np.ndarray]:
    """Case ``name``'s outputs compiled in ``mode``; ConfigError where the graph lacks its ops."""
    if mode not in ("c", "jax"):
        raise ConfigError(f"unknown Theano mode {mode!r} for the references: choose c or jax")
    with theano.config.change_flags(floatX="float64"), compat.graph_settings():
        inputs, outputs, _, shared, expect = OP_CASES[name]()
        values = [refs[f"op/{name}/in/{i}"] for i in range(len(inputs))]
        for i, var in enumerate(shared):
            var.set_value(np.asarray(refs[f"op/{name}/param/{i}"], dtype="float64"))
        if mode == "jax":
            from original import jax_mode
            fn = jax_mode.function(inputs, outputs, device=device)
        else:
            fn = theano.function(inputs, outputs)
        present = op_names(fn)
        if not any(ops <= present for ops in expect):
            raise ConfigError(f"reference case {name}: none of the op sets {expect} is in "
                              f"the compiled {mode} graph ({sorted(present)})")
        return [np.asarray(out) for out in fn(*values)]


def run_e2e(name: str, mode: str, device: str = "cpu") -> Dict[str, np.ndarray]:
    """Three float64 SGD steps of model ``name`` in ``mode``: ``{"final/<state name>",
    "losses" (steps, 2): mean cross-entropy and accuracy, "logits/train", "logits/eval"}``.
    Initial state and batches come from numpy's stable legacy ``RandomState``."""
    from original.backend import TheanoBackend
    backend = TheanoBackend(E2E_MODELS[name], E2E_TRAIN, device=device, dtype="float64",
                            theano_mode=mode)
    r = np.random.RandomState(E2E_SEED)
    losses = []
    for _ in range(E2E_STEPS):
        x, y = r.randn(E2E_BATCH, 3, 32, 32), r.randint(0, 10, E2E_BATCH).astype(np.int64)
        loss_sum, correct = backend.step(x, y, E2E_LR)  # sums over the batch
        losses.append((float(loss_sum) / len(y), float(correct) / len(y)))
    return {"losses": np.array(losses),
            **{f"final/{k}": np.asarray(v) for k, v in backend.get_state().items()},
            "logits/train": np.asarray(backend.logits(x, training=True)),
            "logits/eval": np.asarray(backend.logits(x, training=False))}


def record(path: Path = REFERENCES) -> Dict[str, np.ndarray]:
    """Compute every reference with the C mode and write them to ``path``."""
    ok, reason = compat.c_mode_available()
    if not ok:
        raise ConfigError(f"the references are recorded with Theano's C mode: {reason}")
    compat.check_compiled_backend()
    arrays: Dict[str, np.ndarray] = {}
    for name in OP_CASES:
        with theano.config.change_flags(floatX="float64"), compat.graph_settings():
            _, _, values, shared, _ = OP_CASES[name]()
        arrays.update({f"op/{name}/in/{i}": np.asarray(v) for i, v in enumerate(values)})
        arrays.update({f"op/{name}/param/{i}": _randn(*var.get_value().shape, seed=100 + i)
                       for i, var in enumerate(shared)})
        for i, out in enumerate(run_op(name, "c", arrays)):
            arrays[f"op/{name}/out/{i}"] = out
    for name in E2E_MODELS:
        arrays.update({f"e2e/{name}/{k}": v for k, v in run_e2e(name, "c").items()})
    import jax
    import scipy
    meta = {"theano": theano.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "jax": jax.__version__,
            "blas": theano.config.blas__ldflags, "tol": TOL}
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return arrays


def load(path: Path = REFERENCES) -> Dict[str, np.ndarray]:
    """The stored references as ``{key: array}``; ConfigError where unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the Theano references {path} ({err}): regenerate "
                          f"them with `python scripts/make_references.py` in the pinned "
                          f"environment") from None


def op_outputs(refs, name: str) -> List[np.ndarray]:
    count = sum(1 for k in refs if k.startswith(f"op/{name}/out/"))
    return [refs[f"op/{name}/out/{i}"] for i in range(count)]


def e2e_outputs(refs, name: str) -> Dict[str, np.ndarray]:
    """The stored end-to-end results of model ``name``, keyed as :func:`run_e2e`'s."""
    prefix = f"e2e/{name}/"
    return {k[len(prefix):]: v for k, v in refs.items() if k.startswith(prefix)}


def worst_difference(got: Dict[str, np.ndarray], want: Dict[str, np.ndarray]) -> Tuple[float, str]:
    """(largest absolute difference, its key); ConfigError where keys, shapes or dtypes differ."""
    if set(got) != set(want):
        raise ConfigError(f"results differ in their arrays: only computed "
                          f"{sorted(set(got) - set(want))}, only stored "
                          f"{sorted(set(want) - set(got))}")
    worst, where = 0.0, ""
    for key in sorted(want):
        a, b = np.asarray(got[key]), np.asarray(want[key])
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ConfigError(f"{key}: computed {a.dtype}{a.shape}, stored {b.dtype}{b.shape}")
        diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max(initial=0.0))
        if diff > worst or not where:
            worst, where = diff, key
    return worst, where


def check_jax(device: str = "cpu", refs: Dict[str, np.ndarray] = None) -> List[Tuple[str, float]]:
    """``[(case, largest difference)]`` of the JAX mode on every case; a pass is ``<= TOL``."""
    refs = load() if refs is None else refs
    rows = []
    for name in OP_CASES:
        got, want = run_op(name, "jax", refs, device), op_outputs(refs, name)
        rows.append((f"op/{name}", worst_difference(dict(enumerate(got)),
                                                    dict(enumerate(want)))[0]))
    for name in E2E_MODELS:
        worst, _ = worst_difference(run_e2e(name, "jax", device), e2e_outputs(refs, name))
        rows.append((f"e2e/{name}", worst))
    return rows
