"""The Theano training graph compiled through JAX (issue #12): one jitted function per graph.

Theano-PyMC 1.1.2 ships a JAX linker (``theano.link.jax``, mode ``"JAX"``) whose dispatch,
``jax_funcify``, turns each Theano ``Op`` into a JAX function. On our graphs it falls short:

* nine ops of the CRMN training graph have no conversion -- the JAX mode's optimiser still
  lowers ``conv2d`` to ``CorrMM`` and its two gradients, and Lasagne's tap pooling, the
  softmax cross-entropy, ``argmax`` and the LSTM gates' ``Split`` have none either;
* two conversions call functions that JAX has since removed: variadic ``Mul`` (``jnp.product``)
  and ``IncSubtensor`` (``jax.ops.index_update`` / ``index_add``);
* shape arithmetic (``Shape_i`` -> ``MakeVector`` -> ``Reshape``) becomes traced values, so
  reshapes and convolution gradients meet non-static shapes;
* the stock linker jits every output separately and re-traces shared subgraphs per consumer.

This module registers the missing conversions in Theano's own style (one
``@jax_funcify.register(Op)`` per op, returning a function of the op's inputs), fixes the two
broken ones, and replaces the linker by :class:`FusedJAXLinker`: the whole optimised
``FunctionGraph`` -- outputs *and* shared-variable updates -- is traced once, in topological
order, into ONE ``jax.jit``; integer values computable from static shapes are evaluated with
numpy at trace time (so every shape is static), and the updated shared variables' buffers are
donated. :func:`function` is the drop-in for ``theano.function``.

Shared variables (parameters, velocities, BN statistics, the learning rate) live in their
Theano containers as JAX device arrays between calls: a call reads them from the container
and writes the updated arrays back, with no host round trip. Read and write them with
:func:`get_value` / :func:`set_value`, which use that same container, so the Theano shared
variable and the device copy are one storage cell and cannot disagree. (A C-mode function
cannot read a device array: to hand a variable back to one, ``set_value(v, get_value(v))``.)

Precision: float32 matrix products and convolutions run at full float32 precision
(``jax.default_matmul_precision("float32")`` -> XLA ``HIGHEST``) unless ``allow_tf32=True``
(``"tensorfloat32"`` -> ``HIGH``). ``jax_enable_x64`` is switched on at import: Theano's
labels, shape values and float64 graphs are 64-bit, and without it JAX silently narrows them
to 32 bits (a float64 CRMN step drifted by 4.6e-7 that way). Every value is cast to the dtype
its Theano variable declares, so float32 graphs stay float32.
"""
from __future__ import annotations

import functools
import os
import time
from collections import deque
from collections.abc import Sequence
from typing import Dict, List, Optional, Tuple

import numpy as np

# XLA:CPU rewrites float32 matrix products to oneDNN custom calls by default; on the CRMN
# step (n=1, k=1, batch 100, 2-core CPU) that made the step 0.59 s instead of 0.39 s with
# XLA's own kernels. Read when the CPU backend starts, so it is set before any jax use;
# a user's own XLA_FLAGS setting of the option wins. (CPU only: GPUs do not read it.)
if "xla_cpu_use_mkl_dnn" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_use_mkl_dnn=false").strip()

import theano  # noqa: E402  (after XLA_FLAGS; the package installed the bridges)
# Theano-PyMC's dispatch registers the stock conversions; importing it also sets
# jax_enable_x64 from floatX, which we override just below.
from theano.link.jax.jax_dispatch import convert_indices, jax_funcify  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from theano.compile.mode import Mode, get_mode  # noqa: E402
from theano.compile.sharedvalue import SharedVariable  # noqa: E402
from theano.graph.basic import Constant, NoParams  # noqa: E402
from theano.graph.utils import MethodNotDefined  # noqa: E402
from theano.link.basic import Container, PerformLinker  # noqa: E402
from theano.link.utils import map_storage  # noqa: E402
from theano.scalar.basic import Add, Composite, Mul  # noqa: E402
from theano.tensor.basic import Argmax, Split  # noqa: E402
from theano.tensor.elemwise import CAReduceDtype  # noqa: E402
from theano.tensor.nnet.corr import CorrMM, CorrMM_gradInputs, CorrMM_gradWeights  # noqa: E402
from theano.tensor.nnet.nnet import (CrossentropySoftmax1HotWithBiasDx,  # noqa: E402
                                     CrossentropySoftmaxArgmax1HotWithBias)
from theano.tensor.signal.pool import AveragePoolGrad, Pool  # noqa: E402
from theano.tensor.subtensor import (AdvancedIncSubtensor, AdvancedIncSubtensor1,  # noqa: E402
                                     IncSubtensor)

from crmn.errors import ConfigError  # noqa: E402

jax.config.update("jax_enable_x64", True)

#: ``jax.default_matmul_precision`` values and how the device description names them
PRECISIONS = {False: ("float32", "HIGHEST"), True: ("tensorfloat32", "TF32")}

#: what to install where ``device="cuda"`` finds no CUDA jaxlib (requirements-gpu.txt)
GPU_INSTALL = "pip install -r requirements-gpu.txt"


# --- fixed stock conversions -----------------------------------------------------------

@jax_funcify.register(Add)
def jax_funcify_Add(op):
    """n-ary ``Add``, summed left to right like Theano's C loop (``a + b + c``)."""
    def add(*args):
        return functools.reduce(jnp.add, args)

    return add


@jax_funcify.register(Mul)
def jax_funcify_Mul(op):
    """n-ary ``Mul``; the stock conversion calls ``jnp.product``, gone from JAX."""
    def mul(*args):
        return functools.reduce(jnp.multiply, args)

    return mul


def _inc_subtensor(op, indices_of):
    """``x[idx] = y`` or ``x[idx] += y`` through ``x.at[idx]`` (replaces the removed
    ``jax.ops.index_update`` / ``index_add``); ``indices_of(ilist)`` builds ``idx``."""
    setting = getattr(op, "set_instead_of_inc", False)

    def incsubtensor(x, y, *ilist):
        ref = x.at[indices_of(list(ilist))]
        return ref.set(y) if setting else ref.add(y)

    return incsubtensor


@jax_funcify.register(IncSubtensor)
def jax_funcify_IncSubtensor(op):
    """Basic (slice / integer) set or increment; slice bounds are static scalars."""
    def indices(ilist):
        idx = tuple(convert_indices(ilist, entry) for entry in op.idx_list)
        return idx[0] if len(idx) == 1 else idx

    return _inc_subtensor(op, indices)


@jax_funcify.register(AdvancedIncSubtensor1)
def jax_funcify_AdvancedIncSubtensor1(op):
    """Set or increment rows ``x[ilist]`` (repeated indices accumulate, as in Theano)."""
    return _inc_subtensor(op, lambda ilist: ilist[0])


@jax_funcify.register(AdvancedIncSubtensor)
def jax_funcify_AdvancedIncSubtensor(op):
    """Set or increment ``x[i0, i1, ...]`` with integer index arrays."""
    return _inc_subtensor(op, tuple)


@jax_funcify.register(CAReduceDtype)
def jax_funcify_CAReduceDtype(op):
    """``Sum`` / ``Prod`` accumulated in ``op.acc_dtype`` and cast to ``op.dtype``.

    Theano's C code sums float32 in a float64 accumulator; the stock conversion sums in the
    input's dtype. Only the accumulator changes, so float32 graphs keep float32 values.
    """
    reducer = {Add: jnp.sum, Mul: jnp.prod}.get(type(op.scalar_op))
    if reducer is None:
        raise NotImplementedError(f"no JAX conversion for the reduction {op}")

    def careduce(x):
        return reducer(x, axis=op.axis, dtype=op.acc_dtype).astype(op.dtype)

    return careduce


@jax_funcify.register(Composite)
def jax_funcify_Composite(op):
    """A fused elementwise subgraph, traced once for all its outputs (the stock conversion
    re-traces the shared part per output)."""
    conversions = convert_graph(op.fgraph)

    def composite(*args):
        outs = evaluate(op.fgraph, conversions, args)
        return outs[0] if len(outs) == 1 else tuple(outs)

    return composite


# --- convolution: CorrMM and its gradients ---------------------------------------------

def _corr_padding(op, kshape) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """((top, bottom), (left, right)) zero padding of ``op``'s border mode for a kernel of
    spatial shape ``kshape`` (kH, kW), as ``BaseCorrMM``'s C code computes it."""
    dilated = [(k - 1) * d + 1 for k, d in zip(kshape, op.filter_dilation)]
    if op.border_mode == "valid":
        return ((0, 0), (0, 0))
    if op.border_mode == "full":
        return tuple((k - 1, k - 1) for k in dilated)
    if op.border_mode == "half":
        return tuple((k // 2, k // 2) for k in dilated)
    return tuple((int(lo), int(hi)) for lo, hi in op.border_mode)  # normalised pairs


def _check_corr(op):
    if op.unshared:
        raise NotImplementedError(f"no JAX conversion for unshared correlation {op}")


def _correlate(op, img, kern):
    """(B, C, H, W) ⋆ (F, C/groups, kH, kW) -> (B, F, H', W'): cross-correlation (no kernel
    flip; Theano flips ``conv2d``'s kernel before lowering it to ``CorrMM``)."""
    return lax.conv_general_dilated(
        img, kern, window_strides=op.subsample,
        padding=_corr_padding(op, kern.shape[-2:]), rhs_dilation=op.filter_dilation,
        dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=op.num_groups)


@jax_funcify.register(CorrMM)
def jax_funcify_CorrMM(op):
    _check_corr(op)

    def corrmm(img, kern):
        return _correlate(op, img, kern)

    return corrmm


@jax_funcify.register(CorrMM_gradWeights)
def jax_funcify_CorrMM_gradWeights(op):
    """d(loss)/d(kernel) as the transpose of the correlation, linear in the kernel.

    The kernel's spatial size is the op's ``shape`` input where given (always with stride
    > 1 or "half" borders, which make it ambiguous), else inferred as Theano infers it.
    """
    _check_corr(op)

    def kernel_size(img_hw, top_hw, shape):
        if shape:
            return tuple(int(s) for s in shape)
        pads = _corr_padding(op, (1, 1)) if op.border_mode != "full" else None
        sizes = []
        for axis, (h, t, d) in enumerate(zip(img_hw, top_hw, op.filter_dilation)):
            if pads is None:  # full: out = h + dilated - 1
                dilated = t - h + 1
            else:  # explicit or valid: out = h + pads - dilated + 1
                dilated = h + sum(pads[axis]) - (t - 1) * op.subsample[axis]
            sizes.append((dilated - 1) // d + 1)
        return tuple(sizes)

    def corrmm_gradweights(img, topgrad, *shape):
        kh, kw = kernel_size(img.shape[-2:], topgrad.shape[-2:], shape)
        kshape = (topgrad.shape[1], img.shape[1] // op.num_groups, kh, kw)
        transpose = jax.linear_transpose(functools.partial(_correlate, op, img),
                                         jax.ShapeDtypeStruct(kshape, topgrad.dtype))
        return transpose(topgrad)[0]  # (F, C/groups, kH, kW)

    return corrmm_gradweights


@jax_funcify.register(CorrMM_gradInputs)
def jax_funcify_CorrMM_gradInputs(op):
    """d(loss)/d(image) as the transpose of the correlation, linear in the image.

    The image's spatial size is the op's ``shape`` input where given (stride > 1 drops rows
    the forward pass never read, so only the op knows it), else inferred as Theano does.
    """
    _check_corr(op)

    def corrmm_gradinputs(kern, topgrad, *shape):
        pads = _corr_padding(op, kern.shape[-2:])
        if shape:
            hw = tuple(int(s) for s in shape)
        else:
            dilated = [(k - 1) * d + 1 for k, d in zip(kern.shape[-2:], op.filter_dilation)]
            hw = tuple((t - 1) * s + k - sum(p) for t, s, k, p in
                       zip(topgrad.shape[-2:], op.subsample, dilated, pads))
        ishape = (topgrad.shape[0], kern.shape[1] * op.num_groups) + hw
        transpose = jax.linear_transpose(lambda x: _correlate(op, x, kern),
                                         jax.ShapeDtypeStruct(ishape, topgrad.dtype))
        return transpose(topgrad)[0]  # (B, C, H, W)

    return corrmm_gradinputs


# --- pooling ---------------------------------------------------------------------------

def _pool_geometry(shape, ws, stride, pad, ignore_border, mode):
    """Static window geometry of ``Pool`` over the last ``len(ws)`` axes of ``shape``.

    Returns (reduce_window padding per axis, element counts per window or None): the output
    size is ``Pool.out_shape``'s; windows that run past the padded image (ignore_border=False)
    get extra padding at the end, and the averaging counts follow ``Pool.perform``:
    inclusive of the zero padding for "average_inc_pad", exclusive for "average_exc_pad",
    and clipped at the padded image's end in both.
    """
    nd = len(ws)
    out = Pool.out_shape(shape, ws, ignore_border, stride, pad, nd)[-nd:]
    lead = len(shape) - nd
    padding = [(0, 0)] * lead
    counts = np.ones((), dtype=np.float64)
    for axis in range(nd):
        size, w, s, p = shape[lead + axis], ws[axis], stride[axis], pad[axis]
        padded = size + 2 * p
        extra = max(0, (out[axis] - 1) * s + w - padded)
        padding.append((p, p + extra))
        start = np.arange(out[axis]) * s
        end = np.minimum(start + w, padded)
        if mode == "average_exc_pad":
            n = np.minimum(end, size + p) - np.maximum(start, p)
        else:
            n = end - start
        counts = np.multiply.outer(counts, n)
    window = (1,) * lead + tuple(int(w) for w in ws)
    strides = (1,) * lead + tuple(int(s) for s in stride)
    return window, strides, padding, counts


def _check_pool(op, pad):
    if op.mode == "max" and max(pad, default=0):
        raise NotImplementedError(f"no JAX conversion for {op} with padding {tuple(pad)}")


def _pool_linear(op, x, ws, stride, pad):
    """Sum or average pooling of ``x`` (linear in ``x``); ``ws``, ``stride``, ``pad`` are
    the op's static (nd,) inputs."""
    window, strides, padding, counts = _pool_geometry(
        x.shape, ws, stride, pad, op.ignore_border, op.mode)
    zero = np.zeros((), dtype=x.dtype)
    summed = lax.reduce_window(x, zero, lax.add, window, strides, padding)
    if op.mode == "sum":
        return summed
    return summed / counts.astype(x.dtype)


@jax_funcify.register(Pool)
def jax_funcify_Pool(op):
    """(..., H, W) -> (..., H', W') pooling over the last ``op.ndim`` axes (the CRMN tap's
    2x2 mean pool, stride 2: mode "average_inc_pad", ignore_border=True)."""
    def pool(x, ws, stride, pad):
        _check_pool(op, pad)
        if op.mode != "max":
            return _pool_linear(op, x, ws, stride, pad)
        window, strides, padding, _ = _pool_geometry(
            x.shape, ws, stride, pad, op.ignore_border, op.mode)
        lowest = np.array(-np.inf, dtype=x.dtype)
        return lax.reduce_window(x, lowest, lax.max, window, strides, padding)

    return pool


@jax_funcify.register(AveragePoolGrad)
def jax_funcify_AveragePoolGrad(op):
    """Gradient of sum / average pooling with respect to its input ``x``: the transpose of
    the (linear) pooling, evaluated at ``gz`` of the pooled shape."""
    def average_pool_grad(x, gz, ws, stride, pad):
        if op.mode == "average_exc_pad" and max(pad, default=0):
            raise ValueError("padding must be zero for average_exc_pad")  # as the C code
        transpose = jax.linear_transpose(
            lambda v: _pool_linear(op, v, ws, stride, pad),
            jax.ShapeDtypeStruct(x.shape, gz.dtype))
        return transpose(gz)[0]

    return average_pool_grad


# --- softmax cross-entropy, argmax, split ---------------------------------------------

@jax_funcify.register(CrossentropySoftmaxArgmax1HotWithBias)
def jax_funcify_CrossentropySoftmaxArgmax1HotWithBias(op):
    """(x (B, K), b (K,), y (B,)) -> (nll (B,), softmax (B, K), argmax (B,)).

    Same arithmetic as the op's ``perform``: row max m, ``sm = exp(z - m) * (1 / Σ)``,
    ``nll = -z[y] + m + log Σ`` with ``z = x + b``.
    """
    def crossentropy_softmax_argmax(x, b, y_idx):
        z = x + b  # (B, K)
        am = jnp.argmax(z, axis=1)  # (B,)
        m = jnp.max(z, axis=1)  # (B,)
        e = jnp.exp(z - m[:, None])
        total = jnp.sum(e, axis=1)  # (B,)
        sm = e * (1.0 / total)[:, None]
        z_y = jnp.take_along_axis(z, y_idx[:, None], axis=1)[:, 0]  # (B,)
        nll = -z_y + m + jnp.log(total)
        return nll, sm, am.astype(y_idx.dtype)

    return crossentropy_softmax_argmax


@jax_funcify.register(CrossentropySoftmax1HotWithBiasDx)
def jax_funcify_CrossentropySoftmax1HotWithBiasDx(op):
    """(dy (B,) or (), sm (B, K), y (B,)) -> dx (B, K) = dy·sm, minus dy at column y."""
    def crossentropy_softmax_dx(dy, sm, y_idx):
        dy = jnp.broadcast_to(jnp.reshape(dy, (-1,)), sm.shape[:1])[:, None]  # (B, 1)
        onehot = jax.nn.one_hot(y_idx, sm.shape[1], dtype=sm.dtype)  # (B, K)
        return dy * sm - dy * onehot

    return crossentropy_softmax_dx


@jax_funcify.register(Argmax)
def jax_funcify_Argmax(op):
    """int64 argmax over ``op.axis`` (all axes when None; several axes are flattened after
    the kept ones, as ``Argmax.perform`` does); ties go to the first index, as in numpy."""
    def argmax(x):
        axes = tuple(range(x.ndim)) if op.axis is None else tuple(op.axis)
        keep = tuple(i for i in range(x.ndim) if i not in axes)
        moved = jnp.transpose(x, keep + axes)
        flat = jnp.reshape(moved, moved.shape[:len(keep)] + (-1,))
        return jnp.argmax(flat, axis=-1).astype("int64")

    return argmax


@jax_funcify.register(Split)
def jax_funcify_Split(op):
    """x -> ``op.len_splits`` pieces along a static axis at static sizes (the LSTM's gate
    blocks; the gradient of ``Join``)."""
    def split(x, axis, splits):
        bounds = np.cumsum(np.asarray(splits))[:-1]
        return tuple(jnp.split(x, bounds, axis=int(axis)))

    return split


# --- the graph walker ------------------------------------------------------------------

def _is_traced(value) -> bool:
    return isinstance(value, (jax.core.Tracer, jax.Array))


def _integral(var) -> bool:
    dtype = getattr(var.type, "dtype", None)
    return dtype is not None and (dtype.startswith(("int", "uint")) or dtype == "bool")


def _conform(value, var):
    """``value`` as the dtype ``var`` declares: a cast for JAX values, numpy for static ones
    (Python ints from ``Shape_i`` become int64 arrays, never traced)."""
    dtype = getattr(var.type, "dtype", None)
    if dtype is None:
        return value  # slices, None
    if _is_traced(value):
        return value if value.dtype == dtype else value.astype(dtype)
    return np.asarray(value, dtype=dtype)


def _perform_static(node, args):
    """Run ``node``'s own numpy ``perform`` on static inputs; None where it has none."""
    storage = [[None] for _ in node.outputs]
    params = node.run_params()
    try:
        if params is NoParams:
            node.op.perform(node, args, storage)
        else:
            node.op.perform(node, args, storage, params)
    except (MethodNotDefined, NotImplementedError):
        return None
    return [cell[0] for cell in storage]


def convert_graph(fgraph) -> Dict:
    """``{Apply node: JAX function}`` for every node of ``fgraph``.

    Raises
    ------
    ConfigError
        One line naming the first op without a conversion and the Lasagne layer / variable
        it came from (and how many other op types lack one).
    """
    conversions, missing = {}, {}
    for node in fgraph.toposort():
        try:
            conversions[node] = jax_funcify(node.op)
        except (NotImplementedError, AttributeError) as err:
            missing.setdefault(type(node.op).__name__, (node, err))
    if missing:
        name, (node, err) = next(iter(missing.items()))
        others = sorted(set(missing) - {name})
        more = f"; {len(others)} more op type(s) lack one: {', '.join(others)}" if others else ""
        raise ConfigError(f"--theano-mode jax: no JAX conversion for op {node.op} "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}) "
                          f"{_origin(node)}{more}")
    return conversions


def _origin(node, limit: int = 2000) -> str:
    """Where ``node`` came from: the nearest Lasagne parameter among its ancestors (Lasagne
    names them ``layer.param``, e.g. ``s1b0.conv1.W``), else the nearest named variable --
    breadth first over the inputs."""
    seen, queue, named = set(), deque([node]), None
    while queue and len(seen) < limit:
        current = queue.popleft()
        for var in list(current.outputs) + list(current.inputs):
            if id(var) in seen:
                continue
            seen.add(id(var))
            if isinstance(var, SharedVariable) and var.name and "." in var.name:
                return (f"near Lasagne layer {var.name.rsplit('.', 1)[0]!r} "
                        f"(parameter {var.name!r})")
            if named is None and var.name:
                named = var.name
            if var.owner is not None and var.owner is not current:
                queue.append(var.owner)
    return f"near variable {named!r}" if named else "(no named variable nearby)"


def evaluate(fgraph, conversions: Dict, inputs: Sequence) -> List:
    """Values of ``fgraph.outputs`` for values of ``fgraph.inputs``, node by node in
    topological order (each node once, whatever its number of consumers).

    A node whose inputs are all static (numpy, not traced) and whose outputs are integers
    -- the shape arithmetic that feeds ``Reshape``, ``Alloc`` and the convolution gradients
    -- runs its numpy ``perform`` at trace time, so those shapes stay static under ``jit``.
    """
    values = {var: _conform(value, var) for var, value in zip(fgraph.inputs, inputs)}

    def value_of(var):
        if var in values:
            return values[var]
        if isinstance(var, Constant):
            return var.data
        raise KeyError(f"no value for {var}")  # pragma: no cover - toposort guarantees it

    for node in fgraph.toposort():
        args = [value_of(var) for var in node.inputs]
        outs = None
        if all(map(_integral, node.outputs)) and not any(map(_is_traced, args)):
            outs = _perform_static(node, [_conform(a, v) for a, v in zip(args, node.inputs)])
        if outs is None:
            fn = conversions[node]
            if isinstance(fn, Sequence):  # stock multi-output form: one function per output
                outs = [f(*args) for f in fn]
            else:
                outs = fn(*args)
                outs = [outs] if node.nout == 1 else list(outs)
        for var, value in zip(node.outputs, outs):
            values[var] = _conform(value, var)
    return [value_of(var) for var in fgraph.outputs]


# --- the linker and theano.function ----------------------------------------------------

def jax_device(device: str):
    """The JAX device for ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises
    ------
    ConfigError
        One line where jax has no CUDA backend (a CPU-only jaxlib or no NVIDIA GPU).
    """
    if device == "cpu":
        return jax.devices("cpu")[0]
    if device.startswith(("cuda", "gpu")):
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        try:
            gpus = jax.devices("cuda")
        except RuntimeError:
            found = ", ".join(sorted({d.platform for d in jax.devices()}))
            raise ConfigError(
                f"--device {device} with --theano-mode jax needs a CUDA build of jaxlib "
                f"{jax.__version__} and an NVIDIA GPU, but jax finds only: {found}; install "
                f"it with `{GPU_INSTALL}`") from None
        if index >= len(gpus):
            raise ConfigError(f"--device {device}: jax sees {len(gpus)} CUDA device(s)")
        return gpus[index]
    raise ConfigError(f"unknown device {device!r}: choose cpu or cuda")


class _Call:
    """The thunk of :class:`FusedJAXLinker`: gathers the input cells, runs the compiled
    graph, returns outputs as numpy and leaves updates as device arrays in their cells.

    Theano's ``Function`` calls it with no argument; ``need_update_inputs = False`` tells
    it that the updated shared values are already in place (Theano's own path would
    ``filter`` them through numpy, a host copy per step).
    """

    need_update_inputs = False
    allow_gc = True
    lazy = False

    def __init__(self, fgraph, conversions, input_storage, output_storage, device,
                 precision):
        self.fgraph = fgraph
        self.device = device
        self.precision = precision
        self.compile_seconds = 0.0  # tracing + XLA compilation, all input signatures
        # outputs as writable host copies, as theano.function gives them; False keeps them
        # as device arrays (the training step's loss sums: no host sync per step)
        self.host_outputs = True
        self.inputs = input_storage
        self.outputs = output_storage
        self.updates = dict(getattr(fgraph, "update_mapping", None) or {})  # out -> in
        # one argument per distinct storage cell (a shared variable and its clone share one)
        self._cells, self._arg_of_input = [], []
        for cell in input_storage:
            match = next((k for k, c in enumerate(self._cells) if c is cell), None)
            if match is None:
                self._cells.append(cell)
                match = len(self._cells) - 1
            self._arg_of_input.append(match)
        self._shared = [False] * len(self._cells)
        for var, arg in zip(fgraph.inputs, self._arg_of_input):
            self._shared[arg] = self._shared[arg] or isinstance(var, SharedVariable)
        donated = sorted({self._arg_of_input[i] for i in self.updates.values()})

        def run(*args):
            return evaluate(fgraph, conversions, [args[a] for a in self._arg_of_input])

        self._jitted = jax.jit(run, donate_argnums=tuple(donated))
        self._compiled = {}

    def _argument(self, k):
        value = self._cells[k][0]
        if isinstance(value, jax.Array):
            return value
        value = jax.device_put(np.asarray(value), self.device)
        if self._shared[k]:
            self._cells[k][0] = value  # stays on the device for the next calls
        return value

    def lower(self, *values):
        """The lowered computation (StableHLO text via ``.as_text()``) for ``values`` of
        the function's explicit inputs, in order, and the shared variables' current values:
        for checking dtypes and precision."""
        values = iter(values)
        args = [self._argument(k) if self._shared[k]
                else jax.device_put(np.asarray(next(values)), self.device)
                for k in range(len(self._cells))]
        with jax.default_matmul_precision(self.precision):
            return self._jitted.lower(*args)

    def __call__(self):
        args = [self._argument(k) for k in range(len(self._cells))]
        key = tuple((a.shape, a.dtype) for a in args)
        compiled = self._compiled.get(key)
        if compiled is None:
            start = time.perf_counter()
            with jax.default_matmul_precision(self.precision):
                compiled = self._jitted.lower(*args).compile()
            self.compile_seconds += time.perf_counter() - start
            self._compiled[key] = compiled
        results = compiled(*args)
        for k, (cell, value) in enumerate(zip(self.outputs, results)):
            if k in self.updates:
                self.inputs[self.updates[k]][0] = value
                cell[0] = None
            else:
                cell[0] = np.array(value) if self.host_outputs else value


class FusedJAXLinker(PerformLinker):
    """A Theano linker that compiles the whole ``FunctionGraph`` into one ``jax.jit``.

    Parameters
    ----------
    device : jax.Device
        Where arrays live and the graph runs.
    allow_tf32 : bool
        Let float32 matrix products and convolutions use TensorFloat-32 (``HIGH``);
        default full float32 (``HIGHEST``).
    """

    def __init__(self, device=None, allow_tf32: bool = False, allow_gc=None, schedule=None):
        super().__init__(allow_gc=allow_gc, schedule=schedule)
        self.device = jax.devices("cpu")[0] if device is None else device
        self.allow_tf32 = allow_tf32
        self.call: Optional[_Call] = None

    def accept(self, fgraph, no_recycling=None, profile=None):
        if self.fgraph is not None and self.fgraph is not fgraph:
            return type(self)(self.device, self.allow_tf32, self.allow_gc).accept(
                fgraph, no_recycling, profile)
        return super().accept(fgraph, no_recycling, profile)

    def make_all(self, input_storage=None, output_storage=None, storage_map=None):
        fgraph = self.fgraph
        order = fgraph.toposort()
        input_storage, output_storage, storage_map = map_storage(
            fgraph, order, input_storage, output_storage, storage_map)
        conversions = convert_graph(fgraph)
        self.call = _Call(fgraph, conversions, input_storage, output_storage, self.device,
                          PRECISIONS[self.allow_tf32][0])
        return (self.call,
                [Container(var, cell) for var, cell in zip(fgraph.inputs, input_storage)],
                [Container(var, cell, readonly=True)
                 for var, cell in zip(fgraph.outputs, output_storage)],
                [self.call], order)


def jax_mode(device="cpu", allow_tf32: bool = False) -> Mode:
    """Theano's "JAX" optimiser query without in-place rewrites (JAX arrays are immutable),
    linked by :class:`FusedJAXLinker` on ``device`` ("cpu", "cuda" or a jax.Device)."""
    if isinstance(device, str):
        device = jax_device(device)
    query = get_mode("JAX").excluding("inplace").provided_optimizer
    return Mode(FusedJAXLinker(device, allow_tf32), query)


def function(inputs, outputs=None, updates=None, name=None, device="cpu",
             allow_tf32: bool = False, **kwargs):
    """``theano.function`` compiled into one jitted JAX function (same call semantics:
    numpy in, numpy out, shared variables updated after each call).

    Shared variables stay device arrays in their containers between calls; the buffers of
    updated ones are donated to the call. ``kwargs`` go to ``theano.function``.
    """
    return theano.function(inputs, outputs, updates=updates, name=name,
                           mode=jax_mode(device, allow_tf32), **kwargs)


def linker_call(fn) -> _Call:
    """The :class:`_Call` behind a function made by :func:`function` (its compile seconds,
    precision, device, and ``lower()``)."""
    call = getattr(fn.maker.linker, "call", None)
    if call is None:
        raise ValueError(f"{fn} was not compiled by original.jax_mode.function")
    return call


def get_value(shared) -> np.ndarray:
    """A host copy (numpy) of ``shared``'s current value, wherever it lives."""
    return np.array(shared.container.storage[0])


def set_value(shared, value, device=None) -> None:
    """Set ``shared`` through Theano's own checks (dtype, ndim), then place it on ``device``
    (a device string or jax.Device) in the same storage cell; None leaves it on the host
    until the next call moves it."""
    shared.set_value(value)
    if device is not None:
        if isinstance(device, str):
            device = jax_device(device)
        cell = shared.container.storage
        cell[0] = jax.device_put(cell[0], device)


def device_array(shared):
    """The value in ``shared``'s storage cell as it is (a jax.Array once a JAX-mode call or
    :func:`set_value` with a device placed it): for checking dtype and placement."""
    return shared.container.storage[0]


def describe(device, dtype: str, allow_tf32: bool = False) -> str:
    """``"JAX 0.4.30 cpu, float32 HIGHEST"``: the version, backend and precision in use."""
    if isinstance(device, str):
        device = jax_device(device)
    precision = PRECISIONS[allow_tf32][1] if dtype == "float32" else dtype
    label = f"{dtype} {precision}" if dtype == "float32" else dtype
    return f"JAX {jax.__version__} {device.platform}, {label}"


__all__ = ["function", "jax_mode", "FusedJAXLinker", "convert_graph", "evaluate",
           "jax_device", "get_value", "set_value", "device_array", "describe",
           "linker_call", "PRECISIONS", "GPU_INSTALL"]
