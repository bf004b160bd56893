"""The JAX mode's linker: a whole Theano graph traced once into one ``jax.jit``.

Laid out as Theano-PyMC's ``theano/link/jax/jax_linker.py`` apart from its dispatch. The
stock ``JAXLinker`` asks the stock dispatcher for each output's subgraph and jits every
output separately (shared subgraphs re-traced per consumer); :class:`FusedJAXLinker` asks
:func:`original.jax_mode.dispatch.jax_funcify` (ours) for every node, walks the optimised
``FunctionGraph`` -- outputs *and* shared-variable updates -- once in topological order
(:func:`evaluate`), and jits that walk as one function. Integer values computable from
static shapes are evaluated with numpy at trace time, so every shape is static; the buffers
of updated shared variables are donated.

Shared variables (parameters, velocities, BN statistics, the learning rate) live in their
Theano containers as JAX device arrays between calls: a call (:class:`_Call`) reads them
from the container and writes the updated arrays back, with no host round trip.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import Dict, List, Optional

import numpy as np

import jax

from theano.compile.sharedvalue import SharedVariable
from theano.graph.basic import Constant, NoParams
from theano.graph.utils import MethodNotDefined
from theano.link.basic import Container, PerformLinker
from theano.link.utils import map_storage

from crmn.errors import ConfigError
from original.jax_mode.dispatch import Unsupported, jax_funcify

#: ``jax.default_matmul_precision`` values and how the device description names them
PRECISIONS = {False: ("float32", "HIGHEST"), True: ("tensorfloat32", "TF32")}


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
        except Unsupported as err:
            missing.setdefault(type(node.op).__name__, (node, err))
    if missing:
        name, (node, err) = next(iter(missing.items()))
        others = sorted(set(missing) - {name})
        more = f"; {len(others)} more op type(s) lack one: {', '.join(others)}" if others else ""
        raise ConfigError(f"--theano-mode jax: {err} {_origin(node)}{more}")
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


def _call_conversion(node, fn, args) -> List:
    """``node``'s output values from its conversion ``fn``; an option found unsupported
    only now (it depends on a static input, e.g. a pooling's padding) is reported as in
    :func:`convert_graph`, naming the op and where it came from."""
    try:
        if isinstance(fn, Sequence):  # stock multi-output form: one function per output
            return [f(*args) for f in fn]
        outs = fn(*args)
    except Unsupported as err:
        raise ConfigError(f"--theano-mode jax: {err} {_origin(node)}") from None
    return [outs] if node.nout == 1 else list(outs)


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
            outs = _call_conversion(node, conversions[node], args)
        for var, value in zip(node.outputs, outs):
            values[var] = _conform(value, var)
    return [value_of(var) for var in fgraph.outputs]


# --- the linker ------------------------------------------------------------------------

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


