"""The JAX mode's linker: the whole optimised graph, outputs and updates, traced once into
one ``jax.jit`` (Theano-PyMC's ``JAXLinker`` jits every output separately), with static
shapes and donated update buffers.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np

import jax

from theano.compile.sharedvalue import SharedVariable
from theano.link.basic import Container, PerformLinker
from theano.link.utils import map_storage

from original import compat
from original.jax_mode.dispatch import jax_funcify
from original.jax_mode.graph import convert_graph, evaluate

#: ``jax.default_matmul_precision`` values by ``allow_tf32``, and their description
PRECISIONS = {False: ("float32", "HIGHEST"), True: ("tensorfloat32", "TF32")}


class _Call:
    """The thunk of :class:`FusedJAXLinker`: runs the compiled graph, leaving updates in their
    cells as device arrays (``need_update_inputs = False``: no host copy by Theano)."""
    need_update_inputs = False
    allow_gc = True
    lazy = False

    def __init__(self, fgraph, conversions, input_storage, output_storage, device,
                 precision):
        self.fgraph, self.device, self.precision = fgraph, device, precision
        self.compile_seconds = 0.0  # tracing + XLA compilation, all input signatures
        self.host_outputs = True  # False: outputs stay device arrays (no host sync)
        self.inputs, self.outputs = input_storage, output_storage
        self.updates = dict(getattr(fgraph, "update_mapping", None) or {})  # out -> in
        # one argument per distinct storage cell (a shared variable and its clone share one)
        self.cells = list({id(cell): cell for cell in input_storage}.values())
        arg_of = {id(cell): k for k, cell in enumerate(self.cells)}
        self.arg_of_input = [arg_of[id(cell)] for cell in input_storage]
        shared = {arg for var, arg in zip(fgraph.inputs, self.arg_of_input)
                  if isinstance(var, SharedVariable)}
        self._shared = [k in shared for k in range(len(self.cells))]
        donated = sorted({self.arg_of_input[i] for i in self.updates.values()})

        def run(*args):
            return evaluate(fgraph, conversions, [args[a] for a in self.arg_of_input])

        self.jitted = jax.jit(run, donate_argnums=tuple(donated))
        self._compiled = {}

    def _argument(self, k):
        value = self.cells[k][0]
        if isinstance(value, jax.Array):
            return value
        value = jax.device_put(np.asarray(value), self.device)
        if self._shared[k]:
            self.cells[k][0] = value  # stays on the device for the next calls
        return value

    def lower(self, *values):
        """The lowered computation for ``values`` of the explicit inputs and the shared
        variables' current values (to check dtypes and precision)."""
        values = iter(values)
        args = [self._argument(k) if self._shared[k]
                else jax.device_put(np.asarray(next(values)), self.device)
                for k in range(len(self.cells))]
        with jax.default_matmul_precision(self.precision), compat.graph_settings():
            return self.jitted.lower(*args)

    def __call__(self):
        args = [self._argument(k) for k in range(len(self.cells))]
        key = tuple((a.shape, a.dtype) for a in args)
        compiled = self._compiled.get(key)
        if compiled is None:
            start = time.perf_counter()
            with jax.default_matmul_precision(self.precision), compat.graph_settings():
                compiled = self.jitted.lower(*args).compile()
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
    """A Theano linker compiling the whole ``FunctionGraph`` into one ``jax.jit`` on
    ``device``; ``allow_tf32`` lets float32 products use TensorFloat-32."""

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
        conversions = convert_graph(fgraph, jax_funcify)
        self.call = _Call(fgraph, conversions, input_storage, output_storage, self.device,
                          PRECISIONS[self.allow_tf32][0])
        return (self.call,
                [Container(var, cell) for var, cell in zip(fgraph.inputs, input_storage)],
                [Container(var, cell, readonly=True)
                 for var, cell in zip(fgraph.outputs, output_storage)],
                [self.call], order)
