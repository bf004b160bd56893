"""Conversions of Theano's abstract 2-d convolution and its two gradients.

Without a C compiler (the ``current`` environment) Theano would lower ``AbstractConv2d`` to
the legacy ``ConvOp`` or refuse it; :func:`original.jax_mode.jax_mode` excludes those
rewrites (:data:`EXCLUDED_REWRITES`) so the abstract ops reach the linker and are
converted here (with a compiler the ``CorrMM`` rewrites run first, as before). Gradients
are the transposes of the linear convolution, as for ``CorrMM``.
"""
from __future__ import annotations

import functools
from typing import Tuple

import jax
from theano.tensor.nnet.abstract_conv import (AbstractConv2d, AbstractConv2d_gradInputs,
                                              AbstractConv2d_gradWeights, border_mode_to_pad)

from original.jax_mode.dispatch import Unsupported, correlate, jax_funcify


def conv_padding(op, kshape) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """((top, bottom), (left, right)) zero padding of ``op``'s border mode for a kernel of
    spatial shape ``kshape`` (kH, kW), dilation included."""
    dilated = [(k - 1) * d + 1 for k, d in zip(kshape, op.filter_dilation)]
    return tuple(tuple(int(p) for p in pair)
                 for pair in border_mode_to_pad(op.border_mode, 2, dilated))


def _check(op):
    if op.unshared:
        raise Unsupported(f"no JAX conversion for unshared convolution {op}")


def _oriented(op, kern):
    """The kernel as correlated: flipped in both spatial axes when ``op.filter_flip``."""
    return kern[..., ::-1, ::-1] if op.filter_flip else kern


def convolve(op, img, kern):
    """(B, C, H, W), (F, C/groups, kH, kW) -> (B, F, H', W'): ``op``'s convolution, as the
    correlation of :mod:`original.jax_mode.dispatch` with the oriented kernel and the
    abstract op's padding."""
    kern = _oriented(op, kern)
    return correlate(op, img, kern, conv_padding(op, kern.shape[-2:]))


@jax_funcify.register(AbstractConv2d)
def jax_funcify_AbstractConv2d(op):
    _check(op)

    def abstract_conv2d(img, kern):
        return convolve(op, img, kern)

    return abstract_conv2d


@jax_funcify.register(AbstractConv2d_gradWeights)
def jax_funcify_AbstractConv2d_gradWeights(op):
    """d(loss)/d(kernel): the transpose of the convolution, linear in the kernel. The
    kernel's spatial size is the op's ``shape`` input (static under the linker)."""
    _check(op)

    def abstract_conv2d_gradweights(img, topgrad, shape):
        kh, kw = (int(s) for s in shape)
        kshape = (topgrad.shape[1], img.shape[1] // op.num_groups, kh, kw)
        transpose = jax.linear_transpose(functools.partial(convolve, op, img),
                                         jax.ShapeDtypeStruct(kshape, topgrad.dtype))
        return transpose(topgrad)[0]  # (F, C/groups, kH, kW)

    return abstract_conv2d_gradweights


@jax_funcify.register(AbstractConv2d_gradInputs)
def jax_funcify_AbstractConv2d_gradInputs(op):
    """d(loss)/d(image): the transpose of the convolution, linear in the image. The image's
    spatial size is the op's ``shape`` input (a stride drops rows the forward pass never
    read, so only the op knows it)."""
    _check(op)

    def abstract_conv2d_gradinputs(kern, topgrad, shape):
        hw = tuple(int(s) for s in shape)
        ishape = (topgrad.shape[0], kern.shape[1] * op.num_groups) + hw
        transpose = jax.linear_transpose(lambda x: convolve(op, x, kern),
                                         jax.ShapeDtypeStruct(ishape, topgrad.dtype))
        return transpose(topgrad)[0]  # (B, C, H, W)

    return abstract_conv2d_gradinputs


#: rewrites that the JAX mode leaves out: the legacy ``ConvOp`` lowering (no conversion;
#: reached only without a C compiler) and the check that would then refuse the abstract ops
EXCLUDED_REWRITES = ("local_conv2d_cpu", "local_conv2d_gradweight_cpu",
                     "local_conv2d_gradinputs_cpu", "AbstractConvCheck")
