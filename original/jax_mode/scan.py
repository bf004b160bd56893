"""``Scan`` (``theano.scan``, Lasagne's recurrent layers) and so its gradient, converted with
``Scan.perform``'s own bookkeeping: every output kept in a buffer the size Theano gave it
(circular where Theano saved memory), read at ``pos + tap`` and written at ``pos`` each
step; the gradient's many-taps outputs (``mit_mot``) written at ``pos + tap`` as Theano does.
Theano-PyMC's own conversion leaves those out.
"""
from __future__ import annotations

import numpy as np

import jax.numpy as jnp
from jax import lax

from theano.compile.mode import get_mode
from theano.graph.fg import FunctionGraph
from theano.scan.op import Scan

from original.jax_mode import conv
from original.jax_mode.dispatch import Unsupported, jax_funcify
from original.jax_mode.graph import convert_graph, evaluate


def _inner(op):
    """The inner graph, optimised as the JAX mode's outer graph is, and its conversions."""
    fgraph = FunctionGraph(op.inputs, op.outputs, clone=True)
    get_mode("JAX").excluding("inplace", *conv.EXCLUDED_REWRITES).optimizer.optimize(fgraph)
    return fgraph, convert_graph(fgraph, jax_funcify)


def _at(buffer, index):
    return lax.dynamic_index_in_dim(buffer, index, keepdims=False)


def _put(buffer, index, value):
    return lax.dynamic_update_index_in_dim(buffer, value.astype(buffer.dtype), index, 0)


@jax_funcify.register(Scan)
def jax_funcify_Scan(op):
    if op.as_while:
        raise Unsupported(f"no JAX conversion for a scan with a stopping condition ({op})")
    fgraph, conversions = _inner(op)
    n_seqs, n_mit_mot, n_outs = op.n_seqs, op.n_mit_mot, op.n_outs
    n_nit_sot, n_shared = op.n_nit_sot, op.n_shared_outs
    taps = [list(t) for t in op.tap_array]
    mit_mot_outs = [list(t) for t in op.mit_mot_out_slices]
    mintaps = [min(t) for t in taps] + [0] * n_nit_sot

    def inner(args):
        return evaluate(fgraph, conversions, args)

    def scan(n_steps, *outer):
        n_steps = int(n_steps)  # static: shapes are
        seqs = list(outer[:n_seqs])
        buffers = list(outer[n_seqs:n_seqs + n_outs])
        shared = list(outer[n_seqs + n_outs:n_seqs + n_outs + n_shared])
        sizes = [int(s) for s in outer[n_seqs + n_outs + n_shared:
                                       n_seqs + n_outs + n_shared + n_nit_sot]]
        others = list(outer[n_seqs + n_outs + n_shared + n_nit_sot:])
        store = [b.shape[0] for b in buffers] + sizes
        start = [(-m) % s for m, s in zip(mintaps, store)]

        def inputs(i, buffers, shared):
            pos = [(p + i) % s for p, s in zip(start, store)]
            args = [_at(seq, i) for seq in seqs]
            for k in range(n_outs):
                args += [_at(buffers[k], (pos[k] + t) % store[k]) for t in taps[k]]
            return args + list(shared) + others, pos

        if n_nit_sot:  # their buffers: the shapes of a first step's outputs
            import jax
            args, _ = inputs(0, buffers, shared)
            shapes = jax.eval_shape(lambda a: inner(a), args)
            first = sum(len(t) for t in mit_mot_outs) + n_outs - n_mit_mot
            for k in range(n_nit_sot):
                out = shapes[first + k]
                buffers.append(jnp.zeros((sizes[k],) + out.shape, out.dtype))

        def step(i, carry):
            buffers, shared = list(carry[0]), list(carry[1])
            args, pos = inputs(i, buffers, shared)
            outs = iter(inner(args))
            for j in range(n_mit_mot):
                for t in mit_mot_outs[j]:
                    buffers[j] = _put(buffers[j], pos[j] + t, next(outs))
            for j in range(n_mit_mot, n_outs + n_nit_sot):
                buffers[j] = _put(buffers[j], pos[j], next(outs))
            shared = [next(outs).astype(s.dtype) for s in shared]
            return tuple(buffers), tuple(shared)

        buffers, shared = lax.fori_loop(0, n_steps, step, (tuple(buffers), tuple(shared)))
        buffers = list(buffers)
        for j in range(n_mit_mot, n_outs + n_nit_sot):  # as perform's step 6
            pos, filled = (start[j] + n_steps) % store[j], n_steps - mintaps[j]
            if store[j] < filled and pos:
                buffers[j] = jnp.concatenate([buffers[j][pos:], buffers[j][:pos]])
            elif store[j] > filled:
                buffers[j] = buffers[j].at[filled:].set(0)
        outs = tuple(buffers) + tuple(shared)
        return outs[0] if len(outs) == 1 else outs
    return scan
