"""Conversions of Theano's abstract 2-d convolution and its gradients (transposes), which
reach the linker where no C compiler lets the ``CorrMM`` rewrites run."""
from __future__ import annotations

import functools

from theano.tensor.nnet.abstract_conv import (AbstractConv2d, AbstractConv2d_gradInputs,
                                              AbstractConv2d_gradWeights)

from original.jax_mode.dispatch import (check_shared, correlate, image_grad, jax_funcify,
                                        kernel_grad)


def convolve(op, img, kern):
    """(B, C, H, W), (F, C/groups, kH, kW) -> (B, F, H', W'), kernel flipped if filter_flip."""
    return correlate(op, img, kern[..., ::-1, ::-1] if op.filter_flip else kern)


@jax_funcify.register(AbstractConv2d)
def jax_funcify_AbstractConv2d(op):
    check_shared(op, "convolution")
    return functools.partial(convolve, op)


@jax_funcify.register(AbstractConv2d_gradWeights)
def jax_funcify_AbstractConv2d_gradWeights(op):
    """d(loss)/d(kernel), the kernel's spatial size the op's static ``shape`` input."""
    check_shared(op, "convolution")

    def abstract_conv2d_gradweights(img, topgrad, shape):
        return kernel_grad(convolve, op, img, topgrad, [int(s) for s in shape])
    return abstract_conv2d_gradweights


@jax_funcify.register(AbstractConv2d_gradInputs)
def jax_funcify_AbstractConv2d_gradInputs(op):
    """d(loss)/d(image), the image's spatial size the op's ``shape`` input (a stride drops
    rows the forward pass never read)."""
    check_shared(op, "convolution")

    def abstract_conv2d_gradinputs(kern, topgrad, shape):
        return image_grad(convolve, op, kern, topgrad, [int(s) for s in shape])
    return abstract_conv2d_gradinputs


#: rewrites the JAX mode leaves out: the legacy ``ConvOp`` lowering (no conversion) and the
#: check that would then refuse the abstract ops
EXCLUDED_REWRITES = ("local_conv2d_cpu", "local_conv2d_gradweight_cpu",
                     "local_conv2d_gradinputs_cpu", "AbstractConvCheck")
