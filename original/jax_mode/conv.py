"""Conversions of Theano's abstract 2-d convolution and its gradients (transposes), which
reach the linker where no C compiler lets the ``CorrMM`` rewrites run."""
from __future__ import annotations

import functools

from theano.tensor.nnet.abstract_conv import (AbstractConv2d, AbstractConv2d_gradInputs,
                                              AbstractConv2d_gradWeights)

from original.jax_mode.dispatch import check_shared, conv_grad, correlate, jax_funcify


def convolve(op, img, kern):
    """(B, C, H, W), (F, C/groups, kH, kW) -> (B, F, H', W'), kernel flipped if filter_flip."""
    return correlate(op, img, kern[..., ::-1, ::-1] if op.filter_flip else kern)


@jax_funcify.register(AbstractConv2d)
def jax_funcify_AbstractConv2d(op):
    check_shared(op, "convolution")
    return functools.partial(convolve, op)


@jax_funcify.register(AbstractConv2d_gradWeights)
@jax_funcify.register(AbstractConv2d_gradInputs)
def jax_funcify_AbstractConv2d_grad(op):
    """d(loss)/d(kernel) or d(loss)/d(image), its spatial size the op's static ``shape``
    input (for the image: a stride drops rows the forward pass never read)."""
    check_shared(op, "convolution")
    of_kernel = isinstance(op, AbstractConv2d_gradWeights)

    def abstract_conv2d_grad(other, topgrad, shape):  # other: the image, or the kernel
        return conv_grad(convolve, op, other, topgrad, [int(s) for s in shape], of_kernel)
    return abstract_conv2d_grad


#: rewrites the JAX mode leaves out: the legacy ``ConvOp`` lowering (no conversion) and the
#: check that would then refuse the abstract ops
EXCLUDED_REWRITES = ("local_conv2d_cpu", "local_conv2d_gradweight_cpu",
                     "local_conv2d_gradinputs_cpu", "AbstractConvCheck")
