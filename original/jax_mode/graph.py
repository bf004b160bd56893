"""The JAX mode's graph walker: a Theano ``FunctionGraph`` evaluated node by node in
topological order with each node's conversion (the linker's and ``Composite``'s).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Callable, Dict, List

import numpy as np

import jax

from theano.compile.sharedvalue import SharedVariable
from theano.graph.basic import NoParams
from theano.graph.utils import MethodNotDefined

from crmn.errors import ConfigError


class Unsupported(ConfigError):
    """An op, or an option of an op, that ``--theano-mode jax`` cannot convert."""


def _is_traced(value) -> bool:
    return isinstance(value, (jax.core.Tracer, jax.Array))


def _integral(var) -> bool:
    dtype = getattr(var.type, "dtype", None)
    return dtype is not None and (dtype.startswith(("int", "uint")) or dtype == "bool")


def _conform(value, var):
    """``value`` in ``var``'s dtype: a cast for JAX values, numpy for static ones."""
    dtype = getattr(var.type, "dtype", None)
    if dtype is None:
        return value  # slices, None
    if _is_traced(value):
        return value if value.dtype == dtype else value.astype(dtype)
    return np.asarray(value, dtype=dtype)


def _perform_static(node, args):
    """Run ``node``'s own numpy ``perform`` on static inputs; None where it has none."""
    storage = [[None] for _ in node.outputs]
    if len(node.inputs) > 31:  # numpy's ufuncs take 31 operands: Elemwise's perform fails
        return None
    params = node.run_params()
    try:
        node.op.prepare_node(node, None, None, "py")  # a Composite's scalar functions
        node.op.perform(node, args, storage, *(() if params is NoParams else (params,)))
    except (MethodNotDefined, NotImplementedError):
        return None
    return [cell[0] for cell in storage]


def convert_graph(fgraph, funcify: Callable) -> Dict:
    """``{Apply node: JAX function}`` from the dispatcher ``funcify``; ConfigError naming
    the first op without a conversion, where it came from, and the other ops lacking one."""
    conversions, missing = {}, {}
    for node in fgraph.toposort():
        try:
            conversions[node] = funcify(node.op)
        except Unsupported as err:
            missing.setdefault(type(node.op).__name__, (node, err))
    if missing:
        name, (node, err) = next(iter(missing.items()))
        others = sorted(set(missing) - {name})
        more = f"; {len(others)} more op type(s) lack one: {', '.join(others)}" if others else ""
        error = ConfigError(f"--theano-mode jax: {err} {_origin(node)}{more}")
        error.node = node  # for the script's line that made it (original.run)
        raise error
    return conversions


def _origin(node, limit: int = 2000) -> str:
    """Where ``node`` came from: the nearest Lasagne parameter (``s1b0.conv1.W``) among its
    ancestors, else the nearest named variable."""
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


def _call_conversion(node, fn, args) -> List:
    """``node``'s output values from its conversion ``fn``; an option found unsupported
    only now (a pooling's padding) is reported as in :func:`convert_graph`."""
    try:
        if isinstance(fn, Sequence):  # stock multi-output form: one function per output
            return [f(*args) for f in fn]
        outs = fn(*args)
    except Unsupported as err:
        raise ConfigError(f"--theano-mode jax: {err} {_origin(node)}") from None
    return [outs] if node.nout == 1 else list(outs)


def evaluate(fgraph, conversions: Dict, inputs: Sequence) -> List:
    """Values of ``fgraph.outputs`` for ``inputs``; integer nodes of static inputs (shape
    arithmetic) run their numpy ``perform`` at trace time, so shapes stay static."""
    values = {var: _conform(value, var) for var, value in zip(fgraph.inputs, inputs)}

    def value_of(var):  # the toposort gives every non-constant its value first
        return values[var] if var in values else var.data

    for node in fgraph.toposort():
        args = [value_of(var) for var in node.inputs]
        outs = None
        if all(map(_integral, node.outputs)) and not any(map(_is_traced, args)):
            outs = _perform_static(node, [_conform(a, v) for a, v in zip(args, node.inputs)])
        if outs is None:
            outs = _call_conversion(node, conversions[node], args)
        for var, value in zip(node.outputs, outs):
            values[var] = _conform(value, var)
    return [value_of(var) for var in fgraph.outputs]
