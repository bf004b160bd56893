"""The JAX mode's compile cache (issue #23): a graph compiled once per machine.

Where the time goes before a JAX-mode training step (``t1-crmn32x4``, 2-core CPU, see
REPRODUCING.md): building the Lasagne graph and its gradient (a few seconds), Theano's
graph optimisation inside ``theano.function`` (a quarter of the compile), tracing and
lowering to StableHLO (seconds) and XLA's compilation (most of the rest). A cache hit skips
the optimisation, the tracing and XLA's compilation:

* the key (:func:`graph_text`, :meth:`CachedFunction._key`) is a sha256 of a canonical text
  of the *unoptimised* graph (inputs, outputs and updates; shared variables by their
  position in the graph, with their name, type and shape, never their values or ids), of
  the input shapes of the call, and of every setting that changes what is compiled: the
  stack's settings, precision, device kind, the Theano flags read by the optimiser,
  ``XLA_FLAGS``, the versions of Python, numpy, theano-pymc, Lasagne, jax and jaxlib, and
  a hash of this mode's own source files;
* the entry (:class:`crmn.compile_cache.CompileCache`, kind ``jax``) is the step lowered
  by ``jax.export`` -- its StableHLO module (MLIR bytecode: data) as the payload, and as
  the header the rest of the ``Exported`` record in JSON plus the layout: which argument
  is which explicit input or shared variable, which result is an output or which shared
  variable's update;
* XLA's compilation of that module is cached by JAX's own persistent compilation cache,
  pointed at ``<cache>/xla`` (:func:`use_xla_cache`) with its size and time thresholds at
  zero, so every step is kept.

A miss builds the Theano function as before (optimisation, :class:`FusedJAXLinker`),
exports its jitted walk, stores the entry, and then runs the module read back from the
stored bytes, exactly as a hit does: cached and uncached processes run one computation.
``--no-compile-cache`` runs the Theano function's own ``jax.jit`` (the same StableHLO, see
``tests/test_compile_cache.py`` for the bit-identical state).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import sys
import time
import types
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

import jax

import theano
from theano.compile.sharedvalue import SharedVariable
from theano.graph.basic import Constant

from crmn import compile_cache
from crmn.compile_cache import HIT, MISS

#: the entries' kind (sub-folder of the cache)
KIND = "jax"
#: the code that turns a graph into an entry or reads one back: a change to any of these
#: files makes earlier entries foreign
_SOURCES = sorted(Path(__file__).parent.glob("*.py")) + [
    Path(__file__).parent.parent / "compat.py",
    Path(compile_cache.__file__)]
#: their hash, taken once at import: the code this process runs, whatever is edited later
_SOURCE_HASH = compile_cache.source_hash(_SOURCES)
#: Theano flags that change the optimised graph or its numerics
_THEANO_FLAGS = ("floatX", "optimizer", "optimizer_excluding", "optimizer_including",
                 "optimizer_requiring", "cast_policy", "deterministic",
                 "tensor__cmp_sloppy", "on_opt_error", "compute_test_value")


class Uncacheable(Exception):
    """This graph or export cannot be cached faithfully (the function runs uncached)."""


def _export_module():
    """``jax.export``. Its jax 0.4.30 release imports ``absl.logging`` for two debug log
    calls, and the pinned environment has no absl: a stand-in (Python's logging) is in
    ``sys.modules`` for that import only, then removed."""
    if "jax.export" in sys.modules:
        return sys.modules["jax.export"]
    try:
        import jax.export as export
        return export
    except ModuleNotFoundError as exc:
        if exc.name != "absl":
            raise
    log = logging.getLogger("jax.export")
    absl = types.ModuleType("absl")
    absl.logging = types.ModuleType("absl.logging")
    absl.logging.vlog_is_on = lambda level: False
    absl.logging.info = log.info
    sys.modules.update({"absl": absl, "absl.logging": absl.logging})
    try:
        import jax.export as export
    finally:
        del sys.modules["absl"], sys.modules["absl.logging"]
    return export


def use_xla_cache(root: Path) -> None:
    """Point JAX's persistent compilation cache at ``root/xla`` for this process, keeping
    every entry (JAX's defaults skip compilations under a second and small entries)."""
    from jax._src import compilation_cache as jax_cc

    path = str(root / "xla")
    if jax.config.jax_compilation_cache_dir != path:
        if jax_cc.is_initialized():  # it reads the folder once: start it again
            jax_cc.reset_cache()
        jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# --- the canonical text of a graph -------------------------------------------------------

def _canon(obj, depth: int = 0) -> str:
    """A text that two processes give the same object (no ids, no addresses)."""
    if depth > 12:
        raise Uncacheable("nested too deeply")
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return repr(obj)
    if isinstance(obj, (np.generic, np.dtype)):
        return f"{np.dtype(getattr(obj, 'dtype', obj))}:{obj!r}"
    if isinstance(obj, np.ndarray):
        data = np.ascontiguousarray(obj)
        return f"array({data.dtype},{data.shape},{hashlib.sha256(data.tobytes()).hexdigest()})"
    if isinstance(obj, (tuple, list, frozenset, set)):
        items = [_canon(o, depth + 1) for o in obj]
        return "(" + ",".join(sorted(items) if isinstance(obj, (set, frozenset)) else items) + ")"
    if isinstance(obj, dict):
        return "{" + ",".join(sorted(f"{_canon(k, depth + 1)}:{_canon(v, depth + 1)}"
                                     for k, v in obj.items())) + "}"
    if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
        return f"{obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, functools.partial):
        return f"partial({_canon(obj.func, depth + 1)},{_canon(obj.args, depth + 1)})"
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    props = getattr(obj, "__props__", None)
    if props is not None:
        return name + "{" + ",".join(f"{p}={_canon(getattr(obj, p), depth + 1)}"
                                     for p in props) + "}"
    text = str(obj)
    if " at 0x" in text:
        raise Uncacheable(f"{name} has no stable description")
    return f"{name}<{text}>"


def graph_text(inputs: Sequence, outputs: Sequence, updates: Sequence[Tuple]
               ) -> Tuple[str, List]:
    """(canonical text of the unoptimised graph, its shared variables in graph order).

    ``updates``: ``(shared variable, new value)`` pairs. Variables are numbered as a
    depth-first walk from the outputs, then the update values, first meets them; an
    explicit input is named by its position in ``inputs``, a shared variable by its
    position among the graph's shared variables (with its name, type and value's shape and
    dtype), a constant by its type and a hash of its data.
    """
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
        stack = [(root, False)]
        while stack:  # iterative: a ResNet-134 gradient is deeper than Python's recursion
            var, ready = stack.pop()
            if id(var) in number:
                continue
            node = var.owner
            if node is None or id(var) in position:
                number[id(var)] = len(number)
                lines.append(f"v{number[id(var)]} = {leaf(var)}")
                continue
            if not ready:
                stack.append((var, True))
                stack.extend((v, False) for v in reversed(node.inputs))
                continue
            args = " ".join(f"v{number[id(v)]}" for v in node.inputs)
            outs = []
            for out in node.outputs:
                number[id(out)] = len(number)
                outs.append(f"v{number[id(out)]}:{_canon(out.type)}")
            lines.append(f"{' '.join(outs)} = {_canon(node.op)}({args})")

    for var in inputs:
        visit(var)
    for var in outputs:
        visit(var)
    for target, value in updates:
        visit(value)
        visit(target)
    lines.append("outputs " + " ".join(f"v{number[id(v)]}" for v in outputs))
    lines.append("updates " + " ".join(f"v{number[id(t)]}<-v{number[id(v)]}"
                                       for t, v in updates))
    return "\n".join(lines), shared


def settings_text(device, precision: str, context: Dict) -> str:
    """The settings of the key: everything besides the graph that changes the module."""
    versions = {"python": platform.python_version(), "numpy": np.__version__,
                "theano": theano.__version__, "jax": jax.__version__}
    for dist in ("jaxlib", "Lasagne"):
        versions[dist] = metadata.version(dist)
    flags = {name: str(getattr(theano.config, name, None)) for name in _THEANO_FLAGS}
    return json.dumps({"context": context, "precision": precision,
                       "platform": device.platform,
                       "device_kind": getattr(device, "device_kind", "?"),
                       "x64": bool(jax.config.jax_enable_x64),
                       "xla_flags": os.environ.get("XLA_FLAGS", ""), "theano_flags": flags,
                       "versions": versions,
                       "sources": _SOURCE_HASH}, sort_keys=True)


# --- an Exported record as JSON + bytes ----------------------------------------------------

def _avals(avals) -> List:
    return [[list(a.shape), str(a.dtype)] for a in avals]


def _to_header(exp) -> Dict:
    """The fields of ``exp`` (a ``jax.export.Exported``) as JSON, without the module bytes;
    Uncacheable where a field holds something this format does not keep faithfully."""
    out = {}
    for field in dataclasses.fields(exp):
        name, value = field.name, getattr(exp, field.name)
        if name == "mlir_module_serialized":
            continue
        if name in ("in_tree", "out_tree"):
            out[name] = str(value)
        elif name in ("in_avals", "out_avals"):
            out[name] = _avals(value)
        elif name.endswith("shardings") or name.endswith("shardings_hlo"):
            if any(v is not None for v in value):
                raise Uncacheable(f"{name} holds shardings")
            out[name] = len(value)
        elif name in ("ordered_effects", "unordered_effects", "disabled_safety_checks"):
            if len(value):
                raise Uncacheable(f"{name} is not empty")
            out[name] = []
        elif name == "_get_vjp":
            out[name] = None
        elif isinstance(value, (bool, int, str)) or value is None:
            out[name] = value
        elif isinstance(value, (tuple, list)) and all(isinstance(v, (int, str)) for v in value):
            out[name] = list(value)
        else:
            raise Uncacheable(f"field {name} of type {type(value).__name__}")
    return out


def _trees(n_in: int, n_out: int):
    """The argument and result structures of the linker's walk: ``run(*args) -> list``."""
    return (jax.tree_util.tree_structure(((0,) * n_in, {})),
            jax.tree_util.tree_structure([0] * n_out))


def _from_header(fields: Dict, payload: bytes):
    """An ``Exported`` from :func:`_to_header`'s JSON and the module bytes; KeyError /
    ValueError / TypeError where the header does not fit this jax's record."""
    export = _export_module()
    from jax._src import core

    in_tree, out_tree = _trees(len(fields["in_avals"]), len(fields["out_avals"]))
    if str(in_tree) != fields["in_tree"] or str(out_tree) != fields["out_tree"]:
        raise ValueError("argument or result structure")
    kwargs = {}
    for field in dataclasses.fields(export.Exported):
        name = field.name
        if name == "mlir_module_serialized":
            kwargs[name] = bytes(payload)
        elif name == "in_tree":
            kwargs[name] = in_tree
        elif name == "out_tree":
            kwargs[name] = out_tree
        elif name in ("in_avals", "out_avals"):
            kwargs[name] = tuple(core.ShapedArray(tuple(shape), np.dtype(dtype))
                                 for shape, dtype in fields[name])
        elif name.endswith("shardings") or name.endswith("shardings_hlo"):
            kwargs[name] = (None,) * int(fields[name])
        elif name in ("ordered_effects", "unordered_effects", "disabled_safety_checks"):
            kwargs[name] = ()
        elif isinstance(fields[name], list):
            kwargs[name] = tuple(fields[name])
        else:
            kwargs[name] = fields[name]
    return export.Exported(**kwargs)


# --- the cached function ---------------------------------------------------------------

@dataclasses.dataclass
class _Runner:
    """One compiled signature: the executable and where its arguments come from and its
    results go (``("input", k)``, ``("shared", n)``; ``("output", k)``, ``("update", n)``)."""

    compiled: object
    args: List[Tuple[str, int]]
    results: List[Tuple[str, int]]


class CachedFunction:
    """A drop-in for the JAX mode's ``theano.function(inputs, outputs, updates=...)`` that
    looks its compiled step up in the cache at its first call with each input signature
    (see the module docstring).

    Parameters
    ----------
    inputs, outputs, updates, name
        As ``theano.function``; ``updates`` a list of ``(shared, new value)`` pairs.
    cache : crmn.compile_cache.CompileCache
    build : callable
        ``build() -> theano function`` compiled by :func:`original.jax_mode.function`
        (the miss path; called at most once).
    device : jax.Device
    precision : str
        ``jax.default_matmul_precision`` of the lowering (part of the key).
    context : dict
        The stack's settings for the key (network, batch, dtype, mode).
    """

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
        self._graph = None  # (text, shared variables), computed once
        self._runners: Dict[Tuple, _Runner] = {}

    def theano_function(self):
        """The Theano function of the miss path (built on first use)."""
        if self._theano_fn is None:
            self._theano_fn = self._build()
        return self._theano_fn

    def _key(self, values) -> str:
        if self._graph is None:
            self._graph = graph_text(self.inputs, self.outputs, self.updates)
        signature = _canon([(np.shape(v), str(np.asarray(v).dtype)) for v in values])
        return compile_cache.fingerprint(
            self._graph[0], signature,
            settings_text(self.device, self.precision, dict(self.context, name=self.name)))

    def _check(self, header: Dict) -> Optional[str]:
        """Why a stored header does not fit this function (None: it does)."""
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
        """The miss path: Theano's function, its jitted walk exported for ``values``."""
        fn = self.theano_function()
        call = fn.maker.linker.call  # the FusedJAXLinker's _Call
        shared = self._graph[1]
        by_id = {id(v): n for n, v in enumerate(shared)}
        inputs = {id(v): k for k, v in enumerate(self.inputs)}
        origin = [i.variable for i in fn.maker.inputs]  # the variables behind the cells
        args = []
        for k in range(len(call._cells)):
            var = origin[call._arg_of_input.index(k)]
            if id(var) in inputs:
                args.append(("input", inputs[id(var)]))
            elif id(var) in by_id:
                args.append(("shared", by_id[id(var)]))
            else:
                raise Uncacheable(f"argument {var} is not in the graph")
        results = []
        for k in range(len(fn.maker.fgraph.outputs)):
            if k in call.updates:
                var = origin[call.updates[k]]
                results.append(("update", by_id[id(var)]))
            else:
                results.append(("output", k))
        # shapes and dtypes only: an argument placed on a device would give the module a
        # sharding, which the entry does not keep
        specs = [jax.ShapeDtypeStruct(np.shape(v), v.dtype) for v in
                 self._arguments(args, values)]
        with jax.default_matmul_precision(self.precision):
            exp = _export_module().export(call._jitted, platforms=[self.device.platform])(
                *specs)
        header = {"exported": _to_header(exp), "layout": {"args": args, "results": results},
                  "name": self.name, "theano": theano.__version__, "jax": jax.__version__}
        return header, bytes(exp.mlir_module_serialized)

    def _prepare(self, values) -> _Runner:
        key = self._key(values)
        entry = self.cache.load(KIND, key, self._check)
        state = HIT
        if entry is not None:
            try:
                runner = self._runner(*entry)
            except (KeyError, ValueError, TypeError) as exc:
                compile_cache.warn(f"{self.cache.path(KIND, key)}: does not fit this jax "
                                   f"({type(exc).__name__}: {exc}); compiling afresh")
                entry = None
        if entry is None:
            state = MISS
            header, payload = self._export(values)
            self.cache.store(KIND, key, header, payload)
            runner = self._runner(header, payload)  # the stored bytes, as a hit runs them
        self.states.append(state)
        return runner

    def _runner(self, header: Dict, payload: bytes) -> _Runner:
        exp = _from_header(header["exported"], payload)
        layout = header["layout"]
        args = [tuple(a) for a in layout["args"]]
        results = [tuple(r) for r in layout["results"]]
        values = self._arguments(args, None, exp)
        # no donated buffers: jaxlib 0.4.30's XLA:CPU executables read back from the
        # persistent cache aliased donated arguments wrongly (a float64 step then gave
        # garbage state); the price is one more copy of the updated state during a step
        compiled = jax.jit(exp.call).lower(*values).compile()  # XLA's cache answers a hit
        return _Runner(compiled, args, results)

    def _arguments(self, layout, values, exp=None) -> List:
        """The call's arguments: explicit inputs checked by their Theano type (as
        ``theano.function`` does), shared variables from their containers (moved to the
        device once, where they stay); ``values`` None: shape stand-ins from ``exp``."""
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
                runner = self._prepare(values)
            except Uncacheable as exc:  # the graph runs, just not from the cache
                compile_cache.warn(f"{self.name}: cannot cache this graph ({exc}); "
                                   f"compiling it uncached")
                runner = self.theano_function()
                self.states.append(MISS)
            finally:
                self.compile_seconds += time.perf_counter() - start
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
        """The Theano function itself (a graph the cache cannot keep); its XLA compile
        time joins this function's."""
        call = fn.maker.linker.call
        before = call.compile_seconds
        call.host_outputs = self.host_outputs
        out = fn(*values)
        self.compile_seconds += call.compile_seconds - before
        return out
