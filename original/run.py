"""A Lasagne 0.1 script run unmodified (``bash run_experiments.sh lasagne SCRIPT [ARGS]``)
under the archive's bridges and :func:`~original.compat.graph_settings`, its functions compiled
in C or JAX mode; for tests, a seed, a limit on the training calls and their outputs kept."""
from __future__ import annotations

import inspect
import os
import runpy
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from crmn import runlog
from crmn.errors import ConfigError, UsageError


class StepLimit(KeyboardInterrupt):
    """The step limit was reached: a script that stops training on Ctrl-C (as Lasagne's
    examples/recurrent.py does) stops here the same way and finishes."""


def check_float_type(dtype: str) -> None:
    """ConfigError unless Theano's ``floatX`` (read once, at import) is ``dtype``."""
    import theano
    if theano.config.floatX != dtype:
        raise ConfigError(f"Theano was imported with floatX={theano.config.floatX}, not "
                          f"--dtype {dtype}: set floatX={dtype} in THEANO_FLAGS")


def _plain(value):
    """A function's output as JSON can hold it (arrays as nested lists, floats exact)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return np.asarray(value).tolist()


class _Training:
    """A training function (one with updates) that counts, keeps and limits its calls."""

    def __init__(self, fn, runner: "Runner"):
        self._fn, self._runner = fn, runner

    def __call__(self, *args, **kwargs):
        runner = self._runner
        if runner.steps is not None and len(runner.calls) >= runner.steps:
            raise StepLimit(f"--steps {runner.steps} reached")
        out = self._fn(*args, **kwargs)
        runner.calls.append(_plain(out))
        return out

    def __getattr__(self, name):  # the Theano Function's own attributes
        return getattr(self._fn, name)


class Runner:
    """One script in ``theano_mode`` on ``device``; ``calls``: the training calls' outputs."""

    def __init__(self, script: Path, theano_mode: str, device: str = "cpu",
                 steps: Optional[int] = None):
        self.script, self.theano_mode, self.device, self.steps = script, theano_mode, device, steps
        self.calls: List = []

    def _function(self, stock):
        signature = inspect.signature(stock)

        def function(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            if self.theano_mode == "jax" and bound.arguments.get("mode") is None:
                from original import jax_mode
                bound.arguments["mode"] = jax_mode.jax_mode(self.device)
            try:
                fn = stock(*bound.args, **bound.kwargs)
            except ConfigError as err:
                raise ConfigError(f"{err}{self._made_at(getattr(err, 'node', None))}") from None
            return _Training(fn, self) if bound.arguments.get("updates") else fn
        function.__doc__ = stock.__doc__
        return function

    def _made_at(self, node) -> str:
        """``"; made at mnist.py:170: ..."`` from ``node``'s ``tag.trace``, else ``""``."""
        if node is None:
            return ""
        script = os.path.realpath(self.script)
        for var in list(node.outputs) + list(node.inputs):
            for frames in getattr(var.tag, "trace", None) or []:
                for filename, line, _, code in reversed(frames):
                    if os.path.realpath(filename) == script:
                        return f"; made at {self.script.name}:{line}: {(code or '').strip()}"
        return ""

    def run(self, argv) -> float:
        """Run the script with ``argv``; its seconds."""
        import original  # noqa: F401  (the import bridges)
        from original import compat
        import theano
        stock, saved = theano.function, (sys.argv[:], sys.path[:])
        theano.function = self._function(stock)
        sys.argv = [str(self.script), *argv]
        sys.path.insert(0, str(self.script.parent))
        start = time.perf_counter()
        try:
            with compat.graph_settings():
                runpy.run_path(str(self.script), run_name="__main__")
        except StepLimit:
            pass  # the script did not catch it: it stops here, as asked
        finally:
            theano.function = stock
            sys.argv[:], sys.path[:] = saved
        return time.perf_counter() - start


def run(args) -> int:
    """``run_experiments.sh lasagne``: the options of :mod:`crmn.cli.parser`."""
    from crmn.registry import BackendOptions, AUTO, auto_device, probe
    script = Path(args.script)
    if args.record is not None and not Path(args.record).parent.is_dir():
        raise UsageError(f"run_experiments.sh lasagne: --record {args.record}: no folder "
                         f"{Path(args.record).parent}; give a path in an existing folder")
    check_float_type(args.dtype)
    mode, device, why = args.theano_mode, args.device, "--device " + args.device
    if device == AUTO:
        device, auto_mode, why = auto_device("theano", mode)
        mode, why = mode or auto_mode, f"auto: {why}"
    if mode is None:
        from original.backend import TheanoBackend
        mode = TheanoBackend.preferred_mode()
    options = BackendOptions(backend="theano", device=device, dtype=args.dtype, theano_mode=mode)
    probe(options)
    print(f"lasagne: {script.name} with Theano {mode} mode on {device} ({why}), floatX "
          f"{args.dtype}", flush=True)
    if mode == "jax":  # importing and starting jax 0.11 draws from numpy's global generator:
        from original import jax_mode  # before --seed, or the script's shuffles change
        jax_mode.jax_device(device)
    if args.seed is not None:
        np.random.seed(args.seed)
    runner = Runner(script, mode, device, args.steps)
    seconds = runner.run(args.script_args)
    last = runner.calls[-1] if runner.calls else None
    print(f"lasagne: {script.name} finished in {seconds:.1f} s; {len(runner.calls)} training "
          f"call(s), last output {last}", flush=True)
    if args.record is not None:
        runlog.write_json(args.record, {
            "script": str(script), "argv": args.script_args, "theano_mode": mode,
            "device": device, "dtype": args.dtype, "seed": args.seed, "seconds": seconds,
            "calls": runner.calls})
    return 0
