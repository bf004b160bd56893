"""The layers Lasagne 0.1 lacks: batch normalisation, He et al.'s option-A shortcut, the CRMN
tap (section 3.2), and ``LSTMLayer`` with the output-gate peephole inside σ_o (eq. 4)."""
from __future__ import annotations

import theano
import theano.tensor as T
from lasagne import init
from lasagne.layers import FlattenLayer, Layer, LSTMLayer, Pool2DLayer
from lasagne.utils import unroll_scan

from crmn.naming import BN_ALPHA, BN_EPS


class BatchNormLayer(Layer):
    r"""Batch normalisation (Ioffe & Szegedy 2015) over all axes but 1: y = γ (x − μ) inv_std
    + β; inference uses the running ``mean`` and ``inv_std``, which move as ``(1 - alpha)
    running + alpha batch`` in a graph built with ``batch_norm_update_averages=True``."""

    def __init__(self, incoming, epsilon=BN_EPS, alpha=BN_ALPHA,
                 beta=init.Constant(0.), gamma=init.Constant(1.),
                 mean=init.Constant(0.), inv_std=init.Constant(1.), **kwargs):
        super(BatchNormLayer, self).__init__(incoming, **kwargs)
        if len(self.input_shape) < 2 or self.input_shape[1] is None:
            raise ValueError(f"BatchNormLayer needs (B, C, ...) input with known C, got "
                             f"{self.input_shape}")
        if not 0 < alpha <= 1 or epsilon <= 0:
            raise ValueError(f"BatchNormLayer needs 0 < alpha <= 1 and epsilon > 0, got "
                             f"alpha={alpha}, epsilon={epsilon}")
        self.epsilon, self.alpha = epsilon, alpha
        self.axes = (0,) + tuple(range(2, len(self.input_shape)))
        for name, spec, trainable in (("beta", beta, True), ("gamma", gamma, True),
                                      ("mean", mean, False), ("inv_std", inv_std, False)):
            setattr(self, name, self.add_param(spec, (self.input_shape[1],), name,
                                               trainable=trainable, regularizable=False))

    def get_output_shape_for(self, input_shape):
        return input_shape

    def get_output_for(self, input, deterministic=False, batch_norm_update_averages=False,
                       **kwargs):
        if deterministic:
            mean, inv_std = self.mean, self.inv_std
        else:
            mean = input.mean(self.axes)  # (C,)
            var = input.var(self.axes)  # (C,), biased: divides by the count, not count - 1
            inv_std = T.inv(T.sqrt(var + self.epsilon))
            if batch_norm_update_averages:
                mean, inv_std = self._with_running_updates(mean, inv_std)
        pattern = ["x", 0] + ["x"] * (input.ndim - 2)  # (C,) -> (1, C, 1, 1)
        gamma, beta, mean, inv_std = (v.dimshuffle(pattern)
                                      for v in (self.gamma, self.beta, mean, inv_std))
        return (input - mean) * (gamma * inv_std) + beta

    def _with_running_updates(self, batch_mean, batch_inv_std):
        """The batch statistics with the running-average updates attached: a clone shares
        the storage, and ``0 * clone`` puts its update in the functions using this output."""
        a, out = self.alpha, []
        for running, batch in ((self.mean, batch_mean), (self.inv_std, batch_inv_std)):
            clone = theano.clone(running, share_inputs=False)
            clone.default_update = T.cast((1 - a) * clone + a * batch, running.dtype)
            out.append(batch + 0 * clone)
        return out


class ShortcutALayer(Layer):
    """He et al. (2015)'s "option A" shortcut: subsample, zero-pad the channels evenly
    before and after (as ``modern/``); (B, C, H, W) -> (B, F, ceil(H/s), ceil(W/s))."""

    def __init__(self, incoming, num_filters, stride=2, **kwargs):
        super(ShortcutALayer, self).__init__(incoming, **kwargs)
        c = self.input_shape[1]
        if num_filters < c or stride < 1:
            raise ValueError(f"ShortcutALayer cannot go from {c} to {num_filters} channels "
                             f"with stride {stride}")
        self.num_filters, self.stride = num_filters, stride

    def get_output_shape_for(self, input_shape):
        b, _, h, w = input_shape
        return (b, self.num_filters) + tuple(None if n is None else -(-n // self.stride)
                                             for n in (h, w))

    def get_output_for(self, input, **kwargs):
        s = self.stride
        x = input[:, :, ::s, ::s] if s > 1 else input  # (B, C, H/s, W/s)
        extra = self.num_filters - self.input_shape[1]
        if not extra:
            return x
        before, after = (T.zeros((x.shape[0], c, x.shape[2], x.shape[3]), dtype=x.dtype)
                         for c in (extra // 2, extra - extra // 2))
        return T.concatenate([before, x, after], axis=1)  # (B, F, H/s, W/s)


class PadFeaturesLayer(Layer):
    """Zero-pad (B, D) at the end to (B, num_units) (paper section 3.2)."""

    def __init__(self, incoming, num_units, **kwargs):
        super(PadFeaturesLayer, self).__init__(incoming, **kwargs)
        if len(self.input_shape) != 2 or self.input_shape[1] > num_units:
            raise ValueError(f"PadFeaturesLayer cannot pad {self.input_shape} to "
                             f"{num_units} features")
        self.num_units = num_units

    def get_output_shape_for(self, input_shape):
        return (input_shape[0], self.num_units)

    def get_output_for(self, input, **kwargs):
        extra = self.num_units - self.input_shape[1]
        if not extra:
            return input
        zeros = T.zeros((input.shape[0], extra), dtype=input.dtype)
        return T.concatenate([input, zeros], axis=1)  # (B, num_units)


def crmn_tap(incoming, num_units, name):
    """One block output -> one LSTM input vector (paper section 3.2, docs/spec.md §4):
    (B, C, S, S) -> 2x2 mean pool -> flatten -> zero-pad at the end -> (B, num_units)."""
    pooled = Pool2DLayer(incoming, pool_size=(2, 2), stride=(2, 2), ignore_border=True,
                         mode="average_inc_pad", name=name + ".pool")  # no padding: inc = exc
    flat = FlattenLayer(pooled, outdim=2, name=name + ".flat")
    return PadFeaturesLayer(flat, num_units, name=name)


class PeepholeLSTMLayer(LSTMLayer):
    r"""Lasagne 0.1's ``LSTMLayer`` computing eq. 4 as written, o = σ_o(... + w_co ⊙ c_l + b_o)
    (0.1 adds that peephole after σ_o); no masks, forward only: (B, T, I) -> (B, T, H)."""

    def __init__(self, incoming, num_units, **kwargs):
        if kwargs.get("mask_input") is not None or kwargs.get("backwards"):
            raise ValueError("PeepholeLSTMLayer supports neither mask_input nor backwards")
        if kwargs.get("grad_clipping") or not kwargs.get("precompute_input", True):
            raise ValueError("PeepholeLSTMLayer needs grad_clipping=False and "
                             "precompute_input=True")
        super(PeepholeLSTMLayer, self).__init__(incoming, num_units, **kwargs)

    def get_output_for(self, inputs, **kwargs):
        x = inputs[0].dimshuffle(1, 0, 2)  # (T, B, I): scan runs over the leading axis
        H = self.num_units
        gates = ("ingate", "forgetgate", "cell", "outgate")
        W_x = T.concatenate([getattr(self, "W_in_to_" + g) for g in gates], axis=1)  # (I, 4H)
        W_h = T.concatenate([getattr(self, "W_hid_to_" + g) for g in gates], axis=1)  # (H, 4H)
        b = T.concatenate([getattr(self, "b_" + g) for g in gates], axis=0)  # (4H,)
        x_proj = T.dot(x, W_x) + b  # (T, B, 4H): W_xg x_l + b_g for every step at once

        def step(x_n, c_prev, h_prev, *unused):
            pre = x_n + T.dot(h_prev, W_h)  # (B, 4H)
            i, f, s, o = (pre[:, k * H:(k + 1) * H] for k in range(4))
            if self.peepholes:
                i = i + c_prev * self.W_cell_to_ingate  # eq. 2
                f = f + c_prev * self.W_cell_to_forgetgate  # eq. 3
            i = self.nonlinearity_ingate(i)
            f = self.nonlinearity_forgetgate(f)
            s = self.nonlinearity_cell(s)  # eq. 6
            c = f * c_prev + i * s  # eq. 5
            if self.peepholes:
                o = o + c * self.W_cell_to_outgate  # eq. 4: peephole on the new cell ...
            o = self.nonlinearity_outgate(o)  # ... inside the nonlinearity
            h = o * self.nonlinearity(c)  # eq. 7
            return [c, h]

        ones = T.ones((x.shape[1], 1), dtype=x.dtype)  # (B, 1): broadcast learned inits
        c0, h0 = T.dot(ones, self.cell_init), T.dot(ones, self.hid_init)  # (B, H) each
        if self.unroll_scan:
            _, h_all = unroll_scan(fn=step, sequences=[x_proj], outputs_info=[c0, h0],
                                   go_backwards=False, non_sequences=[],
                                   n_steps=self.input_shapes[0][1])
        else:
            _, h_all = theano.scan(fn=step, sequences=x_proj, outputs_info=[c0, h0],
                                   truncate_gradient=self.gradient_steps)[0]
        return h_all.dimshuffle(1, 0, 2)  # (B, T, H)

