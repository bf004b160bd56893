"""The JAX mode's compile cache: a hit skips Theano's optimisation, the tracing and XLA.

The key hashes the unoptimised graph (:func:`graph_text`), input shapes and settings; the
entry holds the ``jax.export``-serialized step. A miss runs the module read back from the
bytes it stored, as a hit does: one computation either way.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
import types
from importlib import metadata
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

import jax
import jax.export
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache

import theano
from theano.compile.sharedvalue import SharedVariable
from theano.graph.basic import Constant

from crmn import compile_cache
from crmn.compile_cache import HIT, MISS
from original import compat

KIND = "jax"  # the entries' sub-folder
#: the code that writes and reads entries (a change makes earlier entries foreign), hashed
#: at import: the code this process runs, whatever is edited later
_SOURCE_HASH = compile_cache.source_hash(sorted(Path(__file__).parent.glob("*.py")) + [
    Path(__file__).parent.parent / "compat.py", Path(compile_cache.__file__)])
#: Theano flags that change the optimised graph or its numerics
_THEANO_FLAGS = ("floatX", "optimizer", "optimizer_excluding", "optimizer_including",
                 "optimizer_requiring", "cast_policy", "deterministic",
                 "tensor__cmp_sloppy", "on_opt_error", "compute_test_value")


class Uncacheable(Exception):
    """This graph cannot be cached faithfully (the function runs uncached)."""


def use_xla_cache(root: Path) -> None:
    """Point JAX's persistent compilation cache at ``root/xla``, keeping every entry."""
    path = str(root / "xla")
    if jax.config.jax_compilation_cache_dir != path:
        jax_compilation_cache.reset_cache()  # JAX reads the folder once: start it again
        jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _canon(obj, depth: int = 0) -> str:
    """A text that two processes give the same object (no ids, no addresses)."""
    if depth > 12:
        raise Uncacheable("nested too deeply")
    sub = functools.partial(_canon, depth=depth + 1)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return repr(obj)
    if isinstance(obj, (np.generic, np.dtype)):
        return f"{np.dtype(getattr(obj, 'dtype', obj))}:{obj!r}"
    if isinstance(obj, np.ndarray):
        data = np.ascontiguousarray(obj)
        return f"array({data.dtype},{data.shape},{hashlib.sha256(data.tobytes()).hexdigest()})"
    if isinstance(obj, (tuple, list, frozenset, set)):
        items = [sub(o) for o in obj]
        return "(" + ",".join(sorted(items) if isinstance(obj, (set, frozenset)) else items) + ")"
    if isinstance(obj, dict):
        return "{" + ",".join(sorted(f"{sub(k)}:{sub(v)}" for k, v in obj.items())) + "}"
    if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
        return f"{obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, functools.partial):
        return f"partial({sub(obj.func)},{sub(obj.args)})"
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    props = getattr(obj, "__props__", None)
    if props is not None:
        return name + "{" + ",".join(f"{p}={sub(getattr(obj, p))}" for p in props) + "}"
    text = str(obj)
    if " at 0x" in text:
        raise Uncacheable(f"{name} has no stable description")
    return f"{name}<{text}>"


def graph_text(inputs: Sequence, outputs: Sequence, updates: Sequence[Tuple]
               ) -> Tuple[str, List]:
    """(canonical text of the graph, its shared variables in order): shared variables by
    position, name, type and shape (never values or ids), constants by a hash of their data."""
    number: Dict[int, int] = {}
    shared: List = []
    lines: List[str] = []
    position = {id(v): k for k, v in enumerate(inputs)}

    def leaf(var) -> str:
        if id(var) in position:
            return f"input {position[id(var)]} {_canon(var.type)}"
        if isinstance(var, SharedVariable):
            value = var.get_value(borrow=True, return_internal_type=True)
            shared.append(var)
            return (f"shared {len(shared) - 1} {var.name!r} {_canon(var.type)} "
                    f"{np.shape(value)} {getattr(value, 'dtype', type(value).__name__)}")
        if isinstance(var, Constant):
            return f"constant {_canon(var.type)} {_canon(var.data)}"
        raise Uncacheable(f"free variable {var}")

    def visit(root) -> None:
        todo = [(root, False)]
        while todo:  # iterative: a ResNet-134 gradient is deeper than Python's recursion
            var, ready = todo.pop()
            if id(var) in number:
                continue
            node = var.owner
            if node is None or id(var) in position:
                number[id(var)] = len(number)
                lines.append(f"v{number[id(var)]} = {leaf(var)}")
                continue
            if not ready:
                todo.append((var, True))
                todo.extend((v, False) for v in reversed(node.inputs))
                continue
            args = " ".join(f"v{number[id(v)]}" for v in node.inputs)
            for out in node.outputs:
                number[id(out)] = len(number)
            outs = " ".join(f"v{number[id(o)]}:{_canon(o.type)}" for o in node.outputs)
            lines.append(f"{outs} = {_canon(node.op)}({args})")

    for var in list(inputs) + list(outputs):
        visit(var)
    for target, value in updates:
        visit(value)
        visit(target)
    lines.append("outputs " + " ".join(f"v{number[id(v)]}" for v in outputs))
    lines.append("updates " + " ".join(f"v{number[id(t)]}<-v{number[id(v)]}"
                                       for t, v in updates))
    return "\n".join(lines), shared


def settings_text(device, precision: str, context: Dict) -> str:
    """Everything besides the graph that changes the module: settings, versions, sources."""
    versions = {"python": platform.python_version(), "numpy": np.__version__,
                "theano": theano.__version__, "jax": jax.__version__,
                "jaxlib": metadata.version("jaxlib"), "Lasagne": metadata.version("Lasagne")}
    flags = {name: str(getattr(theano.config, name, None)) for name in _THEANO_FLAGS}
    return json.dumps({"context": context, "precision": precision, "platform": device.platform,
                       "device_kind": getattr(device, "device_kind", "?"),
                       "x64": bool(jax.config.jax_enable_x64), "theano_flags": flags,
                       "xla_flags": os.environ.get("XLA_FLAGS", ""), "versions": versions,
                       "sources": _SOURCE_HASH}, sort_keys=True)


class _Runner(NamedTuple):
    """One compiled signature: the executable, its arguments' sources (``("input", k)``,
    ``("shared", n)``) and results' targets (``("output", k)``, ``("update", n)``)."""
    compiled: object
    args: List[Tuple[str, int]]
    results: List[Tuple[str, int]]


class CachedFunction:
    """A drop-in for the JAX mode's ``theano.function`` that looks its step up in the cache
    at its first call per input signature; ``build()`` gives the Theano function of a miss."""

    def __init__(self, inputs, outputs, updates, name: str, cache, build, device,
                 precision: str, context: Dict):
        self.inputs = list(inputs)
        self._single = not isinstance(outputs, (list, tuple))
        self.outputs = [outputs] if self._single else list(outputs)
        self.updates = list(updates.items() if isinstance(updates, dict) else updates or [])
        self.name, self.cache, self._build = name, cache, build
        self.device, self.precision, self.context = device, precision, context
        self.host_outputs = True
        self.compile_seconds = 0.0  # key, lookup, and on a miss optimisation + export + XLA
        self.states: List[str] = []  # HIT or MISS per signature compiled
        self._theano_fn = None
        self._runners: Dict[Tuple, _Runner] = {}

    def theano_function(self):
        if self._theano_fn is None:
            self._theano_fn = self._build()
        return self._theano_fn

    @functools.cached_property
    def _graph(self) -> Tuple[str, List]:
        return graph_text(self.inputs, self.outputs, self.updates)

    def _check(self, header: Dict) -> Optional[str]:
        """Why a stored header does not fit this function, or None."""
        layout = header.get("layout") or {}
        sizes = {"input": len(self.inputs), "shared": len(self._graph[1]),
                 "update": len(self._graph[1]), "output": len(self.outputs)}
        refs = layout.get("args", []) + layout.get("results", [])
        if not all(isinstance(ref, list) and len(ref) == 2 and ref[0] in sizes
                   and isinstance(ref[1], int) and 0 <= ref[1] < sizes[ref[0]]
                   for ref in refs):
            return "its layout names variables this graph lacks (foreign)"
        if sorted(k for kind, k in layout.get("results", []) if kind == "output") != \
                list(range(len(self.outputs))):
            return "its results are not this graph's outputs (foreign)"
        return None

    def _export(self, values) -> Tuple[Dict, bytes]:
        """The miss path: Theano's function, its jitted walk exported."""
        fn = self.theano_function()
        call = fn.maker.linker.call  # the FusedJAXLinker's _Call
        shared = self._graph[1]
        by_id = {id(v): n for n, v in enumerate(shared)}
        sources = {**{id(v): ("shared", n) for n, v in enumerate(shared)},
                   **{id(v): ("input", k) for k, v in enumerate(self.inputs)}}
        origin = [i.variable for i in fn.maker.inputs]  # the variables behind the cells
        args = []
        for k in range(len(call.cells)):
            var = origin[call.arg_of_input.index(k)]
            if id(var) not in sources:
                raise Uncacheable(f"argument {var} is not in the graph")
            args.append(sources[id(var)])
        results = [("update", by_id[id(origin[call.updates[k]])]) if k in call.updates
                   else ("output", k) for k in range(len(fn.maker.fgraph.outputs))]
        # shapes and dtypes only: the entry must not depend on where the arguments live
        specs = [jax.ShapeDtypeStruct(np.shape(v), v.dtype) for v in
                 self._arguments(args, values)]
        with jax.default_matmul_precision(self.precision):
            exp = jax.export.export(call.jitted, platforms=[self.device.platform])(*specs)
        header = {"layout": {"args": args, "results": results}, "name": self.name,
                  "theano": theano.__version__, "jax": jax.__version__}
        return header, bytes(exp.serialize())

    def _prepare(self, values, signature) -> Tuple[_Runner, str]:
        """(the runner of ``values``' input signature, HIT or MISS)."""
        settings = settings_text(self.device, self.precision, dict(self.context, name=self.name))
        key = compile_cache.fingerprint(self._graph[0], _canon(signature), settings)
        entry = self.cache.load(KIND, key, self._check)
        if entry is not None:
            try:
                return self._runner(*entry), HIT
            except Exception as exc:  # whatever jax raises on bytes it cannot read
                compile_cache.warn(f"{self.cache.path(KIND, key)}: does not fit this jax "
                                   f"({type(exc).__name__}: {exc}); compiling afresh")
        header, payload = self._export(values)
        self.cache.store(KIND, key, header, payload)
        return self._runner(header, payload), MISS  # the stored bytes, as a hit runs them

    def _runner(self, header: Dict, payload: bytes) -> _Runner:
        exp = jax.export.deserialize(bytearray(payload))
        args, results = ([tuple(ref) for ref in header["layout"][part]]
                         for part in ("args", "results"))
        values = self._arguments(args, None, exp)
        # no donated buffers: jaxlib 0.4.30's XLA:CPU executables read back from the
        # persistent cache aliased donated arguments wrongly (garbage state)
        compiled = jax.jit(exp.call).lower(*values).compile()  # XLA's cache answers a hit
        return _Runner(compiled, args, results)

    def _arguments(self, layout, values, exp=None) -> List:
        """The call's arguments: inputs checked by their Theano type, shared variables from
        their containers (moved to the device once); ``values`` None: stand-ins."""
        shared = self._graph[1]
        out = []
        for k, (kind, n) in enumerate(layout):
            if kind == "shared":
                cell = shared[n].container.storage
                if not isinstance(cell[0], jax.Array):
                    cell[0] = jax.device_put(np.asarray(cell[0]), self.device)
                out.append(cell[0])
            elif values is None:
                aval = exp.in_avals[k]
                out.append(jax.ShapeDtypeStruct(aval.shape, aval.dtype))
            else:
                value = self.inputs[n].type.filter(values[n])
                out.append(jax.device_put(value, self.device))
        return out

    def __call__(self, *values):
        if len(values) != len(self.inputs):
            raise TypeError(f"{self.name} takes {len(self.inputs)} inputs, got {len(values)}")
        signature = tuple((np.shape(v), str(np.asarray(v).dtype)) for v in values)
        runner = self._runners.get(signature)
        if runner is None:
            start = time.perf_counter()
            try:
                with compat.graph_settings():
                    runner, state = self._prepare(values, signature)
            except Uncacheable as exc:  # the graph runs, just not from the cache
                compile_cache.warn(f"{self.name}: cannot cache this graph ({exc}); "
                                   f"compiling it uncached")
                runner, state = self.theano_function(), MISS
            finally:
                self.compile_seconds += time.perf_counter() - start
            self.states.append(state)
            self._runners[signature] = runner
        if not isinstance(runner, _Runner):
            return self._call_uncached(runner, values)
        results = runner.compiled(*self._arguments(runner.args, values))
        shared = self._graph[1]
        outputs: List = [None] * len(self.outputs)
        for (kind, n), value in zip(runner.results, results):
            if kind == "update":
                shared[n].container.storage[0] = value
            else:
                outputs[n] = np.array(value) if self.host_outputs else value
        return outputs[0] if self._single else outputs

    def _call_uncached(self, fn, values):
        """The Theano function itself (a graph the cache cannot keep)."""
        call = fn.maker.linker.call
        before = call.compile_seconds
        call.host_outputs = self.host_outputs
        out = fn(*values)
        self.compile_seconds += call.compile_seconds - before
        return out
