"""Conversions of Theano's abstract 2-d convolution and its gradients (transposes), which
reach the linker where no C compiler lets the ``CorrMM`` rewrites run."""
from __future__ import annotations

import functools
from typing import Tuple

from theano.tensor.nnet.abstract_conv import (AbstractConv2d, AbstractConv2d_gradInputs,
                                              AbstractConv2d_gradWeights, border_mode_to_pad)

from original.jax_mode.dispatch import Unsupported, correlate, jax_funcify, transpose


def conv_padding(op, kshape) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """((top, bottom), (left, right)) padding of ``op`` for a (kH, kW) kernel."""
    dilated = [(k - 1) * d + 1 for k, d in zip(kshape, op.filter_dilation)]
    return tuple(tuple(int(p) for p in pair)
                 for pair in border_mode_to_pad(op.border_mode, 2, dilated))


def _check(op):
    if op.unshared:
        raise Unsupported(f"no JAX conversion for unshared convolution {op}")


def convolve(op, img, kern):
    """(B, C, H, W), (F, C/groups, kH, kW) -> (B, F, H', W'): a correlation with the kernel
    flipped where ``op.filter_flip``."""
    kern = kern[..., ::-1, ::-1] if op.filter_flip else kern
    return correlate(op, img, kern, conv_padding(op, kern.shape[-2:]))


@jax_funcify.register(AbstractConv2d)
def jax_funcify_AbstractConv2d(op):
    _check(op)
    return functools.partial(convolve, op)


@jax_funcify.register(AbstractConv2d_gradWeights)
def jax_funcify_AbstractConv2d_gradWeights(op):
    """d(loss)/d(kernel), the kernel's spatial size the op's static ``shape`` input."""
    _check(op)

    def abstract_conv2d_gradweights(img, topgrad, shape):
        kh, kw = (int(s) for s in shape)
        kshape = (topgrad.shape[1], img.shape[1] // op.num_groups, kh, kw)
        return transpose(functools.partial(convolve, op, img), kshape, topgrad)
    return abstract_conv2d_gradweights


@jax_funcify.register(AbstractConv2d_gradInputs)
def jax_funcify_AbstractConv2d_gradInputs(op):
    """d(loss)/d(image), the image's spatial size the op's ``shape`` input (a stride drops
    rows the forward pass never read)."""
    _check(op)

    def abstract_conv2d_gradinputs(kern, topgrad, shape):
        hw = tuple(int(s) for s in shape)
        ishape = (topgrad.shape[0], kern.shape[1] * op.num_groups) + hw
        return transpose(lambda x: convolve(op, x, kern), ishape, topgrad)
    return abstract_conv2d_gradinputs


#: rewrites the JAX mode leaves out: the legacy ``ConvOp`` lowering (no conversion) and the
#: check that would then refuse the abstract ops

EXCLUDED_REWRITES = ("local_conv2d_cpu", "local_conv2d_gradweight_cpu",
                     "local_conv2d_gradinputs_cpu", "AbstractConvCheck")
