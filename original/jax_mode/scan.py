"""``Scan`` (``theano.scan``, Lasagne's recurrent layers) and so its gradient, converted with
``Scan.perform``'s own bookkeeping: every output kept in a buffer the size Theano gave it
(circular where Theano saved memory), read at ``pos + tap`` and written at ``pos`` each
step; the gradient's many-taps outputs (``mit_mot``) written at ``pos + tap`` as Theano does.
Theano-PyMC's own conversion leaves those out.
"""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
from jax import lax

from theano.compile.mode import get_mode
from theano.graph.fg import FunctionGraph
from theano.scan.op import Scan

from original.jax_mode import conv
from original.jax_mode.dispatch import Unsupported, jax_funcify
from original.jax_mode.graph import convert_graph, evaluate


def _at(buffer, index):
    return lax.dynamic_index_in_dim(buffer, index, keepdims=False)


def _put(buffer, index, value):
    return lax.dynamic_update_index_in_dim(buffer, value.astype(buffer.dtype), index, 0)


@jax_funcify.register(Scan)
def jax_funcify_Scan(op):
    if op.as_while:
        raise Unsupported(f"no JAX conversion for a scan with a stopping condition ({op})")
    fgraph = FunctionGraph(op.inputs, op.outputs, clone=True)  # optimised as the outer one
    get_mode("JAX").excluding("inplace", *conv.EXCLUDED_REWRITES).optimizer.optimize(fgraph)
    inner = functools.partial(evaluate, fgraph, convert_graph(fgraph, jax_funcify))
    n_seqs, n_mit_mot, n_outs = op.n_seqs, op.n_mit_mot, op.n_outs
    n_nit_sot, n_shared = op.n_nit_sot, op.n_shared_outs
    taps = [list(t) for t in op.tap_array]
    mit_mot_outs = [list(t) for t in op.mit_mot_out_slices]
    mintaps = [min(t) for t in taps] + [0] * n_nit_sot

    def scan(n_steps, *outer):
        if isinstance(n_steps, jax.core.Tracer):
            raise Unsupported(f"no JAX conversion for {op} of a length known only at run time")
        n_steps = int(n_steps)
        rest = iter(outer)  # the outer inputs, in Scan's order
        seqs, buffers, shared, sizes = (list(itertools.islice(rest, n)) for n in
                                        (n_seqs, n_outs, n_shared, n_nit_sot))
        sizes, others = [int(s) for s in sizes], list(rest)
        store = [b.shape[0] for b in buffers] + sizes
        start = [(-m) % s for m, s in zip(mintaps, store)]

        def inputs(i, buffers, shared):
            pos = [(p + i) % s for p, s in zip(start, store)]
            args = [_at(seq, i) for seq in seqs]
            for k in range(n_outs):
                args += [_at(buffers[k], (pos[k] + t) % store[k]) for t in taps[k]]
            return args + list(shared) + others, pos

        if n_nit_sot:  # their buffers: the shapes of a first step's outputs
            args, _ = inputs(0, buffers, shared)
            shapes = jax.eval_shape(inner, args)
            first = sum(len(t) for t in mit_mot_outs) + n_outs - n_mit_mot
            buffers += [jnp.zeros((size,) + out.shape, out.dtype)
                        for size, out in zip(sizes, shapes[first:first + n_nit_sot])]

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
        outs = tuple(buffers[:n_mit_mot]) + tuple(
            _in_order(b, (p + n_steps) % s, n_steps - m) for b, p, s, m in
            zip(buffers[n_mit_mot:], start[n_mit_mot:], store[n_mit_mot:], mintaps[n_mit_mot:])
        ) + tuple(shared)
        return outs[0] if len(outs) == 1 else outs
    return scan


def _in_order(buffer, pos, filled):
    """A buffer after the loop as ``Scan.perform``'s step 6 leaves it: a circular one turned
    to start at its oldest entry, the rows past ``filled`` of a longer one zero."""
    if buffer.shape[0] < filled and pos:
        return jnp.concatenate([buffer[pos:], buffer[:pos]])
    if buffer.shape[0] > filled:
        return buffer.at[filled:].set(0)
    return buffer
