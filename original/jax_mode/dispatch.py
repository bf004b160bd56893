"""Op conversions of the JAX mode, on a dispatcher of our own whose fallback is Theano's
stock one (Theano's registry stays as it is). Added: ``CorrMM`` and its gradients,
pooling and its gradients, softmax cross-entropy, ``Argmax``, ``Split``, ``mrg_uniform``
(Theano's MRG31k3p random numbers, bit for bit); replaced: ``Add``, ``Mul``,
``IncSubtensor`` (stock ones call functions JAX removed), ``CAReduceDtype``.
"""
from __future__ import annotations

import functools
from typing import Tuple

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax

from theano.scalar.basic import Add, Composite, Mul
from theano.tensor.basic import Argmax, Split
from theano.tensor.elemwise import CAReduceDtype, Elemwise
from theano.tensor.opt import Assert
from theano.tensor.nnet.abstract_conv import border_mode_to_pad
from theano.tensor.nnet.corr import CorrMM, CorrMM_gradInputs, CorrMM_gradWeights
from theano.tensor.nnet.nnet import (CrossentropySoftmax1HotWithBiasDx,
                                     CrossentropySoftmaxArgmax1HotWithBias)
from theano.sandbox.rng_mrg import mrg_uniform
from theano.tensor.signal.pool import AveragePoolGrad, MaxPoolGrad, Pool
from theano.tensor.subtensor import AdvancedIncSubtensor, AdvancedIncSubtensor1, IncSubtensor

from original.jax_mode.graph import Unsupported, convert_graph, evaluate


def _import_stock_dispatch():
    """Theano's stock dispatch module; importing it sets ``jax_enable_x64``: put it back."""
    before = jax.config.jax_enable_x64
    from theano.link.jax import jax_dispatch
    jax.config.update("jax_enable_x64", before)
    return jax_dispatch


_stock = _import_stock_dispatch()


@functools.singledispatch
def jax_funcify(op):
    """The JAX function of ``op``: ours, else Theano's stock one, else :class:`Unsupported`."""
    try:
        return _stock.jax_funcify(op)
    except (NotImplementedError, AttributeError, TypeError) as err:
        detail = str(err).splitlines()[0] if str(err) else ""
        raise Unsupported(f"no JAX conversion for op {op} ({type(err).__name__}: "
                          f"{detail})") from None


@jax_funcify.register(Elemwise)
def jax_funcify_Elemwise(op):
    """The scalar op through this dispatcher (the stock one would miss ``Add``, ``Mul``)."""
    return jax_funcify(op.scalar_op)


@jax_funcify.register(Composite)
def jax_funcify_Composite(op):
    """A fused elementwise subgraph, traced once for all its outputs (not once per output)."""
    conversions = convert_graph(op.fgraph, jax_funcify)

    def composite(*args):
        outs = evaluate(op.fgraph, conversions, args)
        return outs[0] if len(outs) == 1 else tuple(outs)
    return composite


@jax_funcify.register(Add)
@jax_funcify.register(Mul)
def jax_funcify_Add(op):
    """n-ary ``Add`` / ``Mul`` left to right like Theano's C loop (the stock ``Mul`` calls
    ``jnp.product``, gone from JAX)."""
    binary = jnp.add if isinstance(op, Add) else jnp.multiply
    return lambda *args: functools.reduce(binary, args)


def _forward_slices(x, idx, y):
    """``(idx, y)`` with each static slice of negative step turned forward and ``y``
    flipped to match: jaxlib 0.11's XLA:CPU aborts compiling the gradient of a reversed
    slice (``scan(go_backwards=True)``) written as a scatter into a reversed slice."""
    backward = [isinstance(i, slice) and not any(map(_is_tracer, (i.start, i.stop, i.step)))
                and (i.step or 0) < 0 for i in idx]
    if not any(backward):
        return idx, y
    y = jnp.broadcast_to(y, jnp.asarray(x)[idx].shape)
    out, flips, axis = [], [], 0
    for dim, (i, back) in enumerate(zip(idx, backward)):
        if back and len(range(x.shape[dim])[i]):
            kept = range(x.shape[dim])[i]
            out.append(slice(kept[-1], kept[0] + 1, -i.step))
            flips.append(axis)
        else:
            out.append(i)
        axis += isinstance(i, slice)
    return tuple(out), jnp.flip(y, flips)


def _is_tracer(value):
    return isinstance(value, jax.core.Tracer)


@jax_funcify.register(IncSubtensor)
@jax_funcify.register(AdvancedIncSubtensor1)
@jax_funcify.register(AdvancedIncSubtensor)
def jax_funcify_IncSubtensor(op):
    """``x[idx] = y`` or ``x[idx] += y``: a block by an update of the slice, else ``x.at``."""
    setting = getattr(op, "set_instead_of_inc", False)

    def incsubtensor(x, y, *ilist):
        idx = tuple(ilist)  # the advanced ops: the index arrays themselves
        if isinstance(op, IncSubtensor):  # static slices and integers, indices popped in turn
            ilist = list(ilist)
            idx = tuple(_stock.convert_indices(ilist, entry) for entry in op.idx_list)
        idx, y = _forward_slices(x, idx, y)
        x = jnp.asarray(x)
        starts = _window(x, idx)
        if starts is not None:
            part = x[idx]
            new = jnp.broadcast_to(y, part.shape) if setting else part + y
            return lax.dynamic_update_slice(x, new.astype(x.dtype), starts)
        ref = x.at[idx]
        return ref.set(y) if setting else ref.add(y)
    return incsubtensor


def _window(x, idx):
    """The start of each axis where ``idx`` is static slices of step 1, else None (the same
    jaxlib aborts on some scatters into such blocks, which scan's gradient makes)."""
    starts = []
    for size, i in zip(x.shape, idx):
        if not isinstance(i, slice) or i.step not in (None, 1) or \
                any(map(_is_tracer, (i.start, i.stop))):
            return None
        starts.append(min(range(size)[i].start, size))
    return starts + [0] * (x.ndim - len(starts))


@jax_funcify.register(CAReduceDtype)
def jax_funcify_CAReduceDtype(op):
    """``Sum`` / ``Prod`` accumulated in ``op.acc_dtype`` as Theano's C code (not x's dtype)."""
    reducer = {Add: jnp.sum, Mul: jnp.prod}.get(type(op.scalar_op))
    if reducer is None:
        raise Unsupported(f"no JAX conversion for the reduction {op}")
    return lambda x: reducer(x, axis=op.axis, dtype=op.acc_dtype).astype(op.dtype)


def corr_padding(op, kshape) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """((top, bottom), (left, right)) padding of ``op`` for a (kH, kW) kernel, as Theano's."""
    dilated = [(k - 1) * d + 1 for k, d in zip(kshape, op.filter_dilation)]
    return tuple(tuple(int(p) for p in pair)
                 for pair in border_mode_to_pad(op.border_mode, 2, dilated))


def transpose(linear, shape, cotangent):
    """The transpose of ``linear`` (on arrays of ``shape``) at ``cotangent``: a gradient."""
    return jax.linear_transpose(linear, jax.ShapeDtypeStruct(shape, cotangent.dtype))(
        cotangent)[0]


def check_shared(op, what: str):
    if op.unshared:
        raise Unsupported(f"no JAX conversion for unshared {what} {op}")


def conv_grad(forward, op, other, topgrad, hw, of_kernel: bool):
    """d(loss)/d(kernel) (``other`` the image) or d(loss)/d(image) (``other`` the kernel) of
    ``forward(op, image, kernel)`` at ``topgrad``, for a ``hw`` kernel or image."""
    if of_kernel:
        kshape = (topgrad.shape[1], other.shape[1] // op.num_groups) + tuple(hw)
        return transpose(functools.partial(forward, op, other), kshape, topgrad)
    ishape = (topgrad.shape[0], other.shape[1] * op.num_groups) + tuple(hw)
    return transpose(lambda x: forward(op, x, other), ishape, topgrad)


def correlate(op, img, kern):
    """(B, C, H, W) ⋆ (F, C/groups, kH, kW) -> (B, F, H', W'), no kernel flip."""
    padding = corr_padding(op, kern.shape[-2:])
    if img.dtype == np.float64 and op.num_groups == 1:
        return _correlate_im2col(img, kern, op.subsample, padding, op.filter_dilation)
    return lax.conv_general_dilated(
        img, kern, window_strides=op.subsample, padding=padding, rhs_dilation=op.filter_dilation,
        dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=op.num_groups)


def _correlate_im2col(img, kern, stride, padding, dilation):
    """:func:`correlate` as ``CorrMM``'s C code computes it, patches then one product: XLA's
    own float64 convolution on the CPU is a slow path (its gradient 10-20 times float32's)."""
    img = jnp.pad(img, ((0, 0), (0, 0)) + tuple(padding))
    kh, kw = kern.shape[-2:]
    out = [(size - (k - 1) * d - 1) // s + 1 for size, k, d, s in
           zip(img.shape[-2:], (kh, kw), dilation, stride)]
    patches = jnp.stack([
        img[:, :, i * dilation[0]: i * dilation[0] + (out[0] - 1) * stride[0] + 1: stride[0],
            j * dilation[1]: j * dilation[1] + (out[1] - 1) * stride[1] + 1: stride[1]]
        for i in range(kh) for j in range(kw)], axis=2)  # (B, C, kh·kw, H', W')
    return jnp.einsum("bckhw,fck->bfhw", patches, kern.reshape(kern.shape[:2] + (-1,)),
                      precision=lax.Precision.HIGHEST)


@jax_funcify.register(CorrMM)
def jax_funcify_CorrMM(op):
    check_shared(op, "correlation")
    return functools.partial(correlate, op)


def _grad_hw(op, other_hw, top_hw, of_kernel: bool):
    """The kernel's (``other`` the image) or the image's (``other`` the kernel) spatial size,
    inferred as Theano does where the op has no ``shape`` input."""
    if not of_kernel:
        dilated = [(k - 1) * d + 1 for k, d in zip(other_hw, op.filter_dilation)]
        return [(t - 1) * s + k - sum(p) for t, s, k, p in
                zip(top_hw, op.subsample, dilated, corr_padding(op, other_hw))]
    if op.border_mode == "full":  # out = h + dilated - 1
        dilated = [t - h + 1 for h, t in zip(other_hw, top_hw)]
    else:  # explicit or valid: out = h + pads - dilated + 1
        dilated = [h + sum(p) - (t - 1) * s for h, t, p, s in
                   zip(other_hw, top_hw, corr_padding(op, (1, 1)), op.subsample)]
    return [(n - 1) // d + 1 for n, d in zip(dilated, op.filter_dilation)]


@jax_funcify.register(CorrMM_gradWeights)
@jax_funcify.register(CorrMM_gradInputs)
def jax_funcify_CorrMM_grad(op):
    """d(loss)/d(kernel) or d(loss)/d(image), its spatial size the op's ``shape`` input or
    inferred (:func:`_grad_hw`)."""
    check_shared(op, "correlation")
    of_kernel = isinstance(op, CorrMM_gradWeights)

    def corrmm_grad(other, topgrad, *shape):  # other: the image, or the kernel
        hw = [int(s) for s in shape] or _grad_hw(op, other.shape[-2:], topgrad.shape[-2:],
                                                 of_kernel)
        return conv_grad(correlate, op, other, topgrad, hw, of_kernel)
    return corrmm_grad


def _pool_geometry(op, shape, ws, stride, pad):
    """(window, strides, padding, element counts) of ``op`` over the last ``len(ws)`` axes,
    as ``Pool.out_shape`` sizes and ``Pool.perform`` averages them."""
    nd = len(ws)
    out = Pool.out_shape(shape, ws, op.ignore_border, stride, pad, nd)[-nd:]
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
        low, high = (p, size + p) if op.mode == "average_exc_pad" else (0, padded)  # counted
        counts = np.multiply.outer(counts, np.minimum(end, high) - np.maximum(start, low))
    window = (1,) * lead + tuple(int(w) for w in ws)
    strides = (1,) * lead + tuple(int(s) for s in stride)
    return window, strides, padding, counts


def _check_pool(op, pad):
    if op.mode == "max" and max(pad, default=0):
        raise Unsupported(f"no JAX conversion for {op} with padding {tuple(pad)}")


def _pool(op, x, ws, stride, pad):
    """(..., H, W) -> (..., H', W') pooling of ``x`` over the last ``len(ws)`` axes."""
    _check_pool(op, pad)
    window, strides, padding, counts = _pool_geometry(op, x.shape, ws, stride, pad)
    if op.mode == "max":
        lowest = np.array(-np.inf, dtype=x.dtype)
        return lax.reduce_window(x, lowest, lax.max, window, strides, padding)
    summed = lax.reduce_window(x, np.zeros((), dtype=x.dtype), lax.add, window, strides,
                               padding)
    return summed if op.mode == "sum" else summed / counts.astype(x.dtype)


@jax_funcify.register(Pool)
def jax_funcify_Pool(op):
    """Pooling over the last ``op.ndim`` axes (:func:`_pool`)."""
    return functools.partial(_pool, op)


@jax_funcify.register(AveragePoolGrad)
def jax_funcify_AveragePoolGrad(op):
    """Gradient of sum / average pooling: the transpose of the pooling, at ``gz``."""
    def average_pool_grad(x, gz, ws, stride, pad):
        if op.mode == "average_exc_pad" and max(pad, default=0):
            raise Unsupported(f"no JAX conversion for {op} with padding {tuple(pad)}: "
                              f"Theano's C code refuses it too")
        return transpose(lambda v: _pool(op, v, ws, stride, pad), x.shape, gz)
    return average_pool_grad


@jax_funcify.register(MaxPoolGrad)
def jax_funcify_MaxPoolGrad(op):
    """Gradient of max pooling as Theano's: every input equal to its window's maximum gets
    the window's gradient (ties all get it; jax's own gradient picks one)."""
    def max_pool_grad(x, maxout, gz, ws, stride, pad):
        _check_pool(op, pad)
        nd = len(ws)
        _, _, padding, _ = _pool_geometry(op, x.shape, ws, stride, pad)
        lowest = np.array(-np.inf, dtype=x.dtype)  # a partial window's padding never wins
        padded = jnp.pad(x, padding, constant_values=lowest)
        grad = jnp.zeros(padded.shape, dtype=gz.dtype)
        out = maxout.shape[-nd:]
        lead = (slice(None),) * (x.ndim - nd)
        for offset in np.ndindex(*(int(w) for w in ws)):  # one strided view per window cell
            at = lead + tuple(slice(o, o + (n - 1) * int(s) + 1, int(s))
                              for o, n, s in zip(offset, out, stride))
            grad = grad.at[at].add(jnp.where(padded[at] == maxout, gz, 0))
        return grad[lead + tuple(slice(lo, lo + n) for (lo, _), n in
                                 zip(padding[-nd:], x.shape[-nd:]))]
    return max_pool_grad


#: MRG31k3p's constants as ``mrg_uniform``'s C code has them
_M1, _M2 = np.int32(2147483647), np.int32(2147462579)
_MRG_NORM = {"float32": np.float32(4.6566126e-10),
             "float64": np.float64(4.656612873077392578125e-10)}


def _mrg_wrap(y, modulus):
    return jnp.where((y < 0) | (y >= modulus), y - modulus, y)


def mrg_next(state):
    """(streams, 6) int32 states -> (next states, the integer each draws), in int32
    arithmetic that wraps on overflow as the C code's does."""
    x11, x12, x13, x21, x22, x23 = (state[:, k] for k in range(6))
    i32 = np.int32
    y1 = (((x12 & i32(511)) << i32(22)) + (x12 >> i32(9)) + ((x13 & i32(16777215)) << i32(7))
          + (x13 >> i32(24)))
    y1 = _mrg_wrap(_mrg_wrap(y1, _M1) + x13, _M1)
    x13, x12, x11 = x12, x11, y1
    y1 = _mrg_wrap(((x21 & i32(65535)) << i32(15)) + i32(21069) * (x21 >> i32(16)), _M2)
    y2 = _mrg_wrap(((x23 & i32(65535)) << i32(15)) + i32(21069) * (x23 >> i32(16)), _M2)
    y2 = _mrg_wrap(_mrg_wrap(y2 + x23, _M2) + y1, _M2)
    x23, x22, x21 = x22, x21, y2
    drawn = jnp.where(x11 <= x21, x11 - x21 + _M1, x11 - x21)
    return jnp.stack([x11, x12, x13, x21, x22, x23], axis=1), drawn


@jax_funcify.register(mrg_uniform)
def jax_funcify_mrg_uniform(op):
    """(rstate (streams, 6), size) -> (next rstate, uniform samples of ``size``): sample i
    from stream i mod streams, each stream stepped in turn, as ``mrg_uniform``'s C code."""
    dtype = op.output_type.dtype
    if dtype not in _MRG_NORM:
        raise Unsupported(f"no JAX conversion for {op} in {dtype}")

    def mrg_uniform_sample(rstate, size):
        if _is_tracer(size):
            raise Unsupported(f"no JAX conversion for {op} of a size known only at run time")
        shape = tuple(int(s) for s in np.asarray(size))
        n, streams = int(np.prod(shape, dtype=np.int64)), rstate.shape[0]
        index = jnp.arange(streams)

        def step(state, first):  # first: the sample index of stream 0 in this round
            new, drawn = mrg_next(state)
            live = (first + index < n)[:, None]  # the last round may leave streams idle
            return jnp.where(live, new, state), drawn

        rounds = -(-n // streams)
        state, drawn = lax.scan(step, rstate, jnp.arange(rounds) * streams)
        # the int-to-float conversion, then one multiply, in the output's dtype
        sample = drawn.reshape(-1)[:n].astype(dtype) * _MRG_NORM[dtype]
        return state, sample.reshape(shape)
    return mrg_uniform_sample


@jax_funcify.register(CrossentropySoftmaxArgmax1HotWithBias)
def jax_funcify_CrossentropySoftmaxArgmax1HotWithBias(op):
    """(x (B, K), b (K,), y (B,)) -> (nll, softmax, argmax), with the arithmetic of the
    op's ``perform`` (row max m, ``sm = exp(z - m) / Σ``, ``nll = -z[y] + m + log Σ``)."""
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
    """int64 argmax over ``op.axis`` (several axes flattened, as ``Argmax.perform``)."""
    def argmax(x):
        axes = tuple(range(x.ndim)) if op.axis is None else tuple(op.axis)
        keep = tuple(i for i in range(x.ndim) if i not in axes)
        moved = jnp.transpose(x, keep + axes)
        flat = jnp.reshape(moved, moved.shape[:len(keep)] + (-1,))
        return jnp.argmax(flat, axis=-1).astype("int64")
    return argmax


@jax_funcify.register(Assert)
def jax_funcify_Assert(op):
    """The value, its conditions checked where they are known when traced (shapes, which
    Theano's scan gradient asserts); a traced condition cannot stop a jitted function."""
    def assert_(value, *conditions):
        if any(not _is_tracer(c) and not np.all(c) for c in conditions):
            raise ValueError(f"{op.msg} (Theano's Assert, while tracing)")
        return value
    return assert_


@jax_funcify.register(Split)
def jax_funcify_Split(op):
    """x -> ``op.len_splits`` pieces along a static axis at static sizes."""
    def split(x, axis, splits):
        bounds = np.cumsum(np.asarray(splits))[:-1]
        return tuple(jnp.split(x, bounds, axis=int(axis)))
    return split
