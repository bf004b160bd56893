"""The command handlers: each makes its plan (:mod:`crmn.plan`), runs it, returns the exit code."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from crmn import (bench, cost, data, export, gpucheck, launch, paper, registry, replay, report,
                  roofline, schema, tables, verify)
from crmn import plan as plans, train as trainer
from crmn.config import ModelConfig, TrainConfig
from crmn.errors import ConfigError, StopRequested, UsageError
from crmn.launch import status
from crmn.naming import count_trainable
from crmn.plan import ROOT, SMOKE, TrainPlan
from crmn.registry import BackendOptions
from crmn.tools import profile, sampler_bench


_stop_signal: List[Optional[int]] = [None]  # the signal that asked the runs to stop, if any


def request_stop(signum: int, frame=None) -> None:
    """SIGUSR1 (a scheduler's warning, sbatch --signal=B:USR1@T) and a first Ctrl-C: finish
    the epoch, checkpoint it, stop (exit 3 / 130); a second Ctrl-C stops at once."""
    if signum == signal.SIGINT and _stop_signal[0] == signal.SIGINT:
        raise KeyboardInterrupt
    _stop_signal[0] = signum


def check_stop(where) -> None:
    """StopRequested if a signal asked for it (called where all is saved)."""
    signum = _stop_signal[0]
    if signum is not None:
        raise StopRequested(f"{where}: stopped by {signal.Signals(signum).name} after its "
                            f"last checkpoint; the same command with --resume continues it",
                            signum=signum)


def train_runs(plan: TrainPlan) -> List[Path]:
    print(f"backend {plan.backend_options.describe()} (requested); runs under {plan.exp_dir}",
          flush=True)
    signal.signal(signal.SIGUSR1, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    for key in dict.fromkeys((r.spec.dataset, r.spec.data_dir, r.spec.subset,
                              r.spec.unverified_data) for r in plan.runs):
        data.ready(*key, progress=plan.progress)  # refused before any run directory exists
    for run in plan.runs:
        check_stop(plan.exp_dir)
        print(f"== {run.label} seed {run.seed} -> {run.run_dir}", flush=True)
        trainer.run(run.run_dir, run.spec, resume=plan.resume, progress=plan.progress,
                    fresh=plan.fresh, stop=check_stop)
    return [run.run_dir for run in plan.runs]


def announce(plan: TrainPlan) -> bool:
    """Print the device and the cost (``--dry-run``: every run's line too); True: stop here."""
    print(plan.device_note, flush=True)
    if plan.dry_run:
        program = ["bash", str(ROOT / "run_experiments.sh")]
        for run in plan.runs:
            print(f"{run.label} seed {run.seed} on {run.spec.backend_options.device}: "
                  f"{shlex.join(plans.render_argv(plan, run, program, resume=plan.resume))}")
    print(cost.estimate(plan), flush=True)
    return plan.dry_run


def cmd_train(args) -> int:
    plan = plans.train_plan(args)
    if announce(plan):
        return 0
    if launch.wanted(plan):  # the grid as single runs: subprocesses or Slurm
        return launch.main(plan, ROOT / "run_experiments.sh")
    if args.n is not None or args.k is not None or args.batch_size is not None:
        print("note: --n/--k/--batch-size override the paper's rows; this is not the "
              "published configuration", flush=True)
    train_runs(plan)
    if plan.one_seed:  # one run of a grid: its launcher compares when all are done
        print(f"compare: bash run_experiments.sh compare {plan.exp_dir}")
        return 0
    report.compare(plan.exp_dir, plots=True)
    return 0


def cmd_params(args) -> int:
    """Per row: its parameter count in the backend, in the canonical layout, in the paper."""
    overrides = schema.values(plans.SECTIONS["model"], args, None)  # the interpretations
    try:  # a count depends on the backend only: built on the CPU in its default mode
        options = BackendOptions(args.backend, theano_mode=registry.default_theano_mode(
            args.backend))
        registry.probe(options)
    except ConfigError as exc:
        raise UsageError(f"{plans.PROG} params: {exc}") from None
    rows = []
    for row in paper.select(args.rows):
        model = ModelConfig.for_row(row, **overrides)
        params = int(registry.build(options, model, TrainConfig.for_row(row)).param_count())
        rows.append(dict(row=row.id, label=row.label, table=row.table, params=params,
                         canonical_params=count_trainable(model),
                         params_m=round(params / 1e6, 2), paper_params_m=row.paper_params_m))
    if args.json != "-":
        body = [[r["row"], r["label"], f"{r['params']:,}", f"{r['params_m']:.2f}",
                 "" if r["paper_params_m"] is None else f"{r['paper_params_m']:.2f}",
                 "" if r["params"] == r["canonical_params"]
                 else f"canonical layout says {r['canonical_params']:,}"] for r in rows]
        print(f"trainable parameters, {args.backend} backend (paper: Table 1; blank where the "
              "paper gives none)\n" + tables.markdown(["row", "model", "ours", "ours M",
                                                        "paper M", "note"], body, align="llrrrl"))
    _write_json(rows, args.json)
    return 0


def cmd_compare(args) -> int:
    report.compare(Path(args.dir), plots=args.plots)
    return status.check_complete(Path(args.dir))  # a launched grid: every run finished?


def _smoke_data(data_dir: Path) -> None:
    """smoke's fake CIFAR-100-format data, written once beside and moved into place."""
    if data.is_fake("cifar100", data_dir):
        return
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = data_dir.parent / f".data-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    data.write_fake("cifar100", tmp, SMOKE["n_train"], SMOKE["n_test"], seed=0)
    try:
        os.rename(tmp, data_dir)
    except OSError:  # another smoke moved its identical copy in first
        shutil.rmtree(tmp, ignore_errors=True)


def cmd_smoke(args) -> int:
    plan = plans.smoke_plan(args)
    if announce(plan):
        return 0
    data_dir = plan.runs[0].spec.data_dir
    t0 = time.time()
    _smoke_data(data_dir)
    print(f"smoke: fake CIFAR-100-format data ({SMOKE['n_train']} train, "
          f"{SMOKE['n_test']} test images) in {data_dir}", flush=True)
    run_dirs = train_runs(plan)
    report_md = report.compare(plan.exp_dir, plots=True)
    print(f"smoke: done in {time.time() - t0:.0f} s", flush=True)
    print(f"smoke: data       {data_dir}")
    for d in run_dirs:
        print(f"smoke: run        {d} (config.json, log.jsonl, checkpoint.h5, best.h5, "
              f"summary.json)")
    print(f"smoke: report     {report_md}")
    return 0


def cmd_verify(args) -> int:
    configs = [r.id for r in paper.select(args.rows)] if args.rows else None
    # a GPU run compares torch on it with torch on the CPU
    device = args.device if args.device == "cpu" else plans.resolve_backend(
        args, "torch")[0].device
    results = verify.verify(configs, device=device, tol=args.tol, lr=args.lr,
                            seed=args.seed, batch_size=args.batch_size)
    return 0 if all(r.passed for r in results) else 1


def cmd_bench(args) -> int:
    if args.sampler:
        return _bench_sampler(args)
    options = plans.resolve_backend(args)[0]
    if args.channels_last is not None and options.backend != "torch":
        raise UsageError("run_experiments.sh bench: --channels-last/--channels-first need "
                         "--backend torch")
    rows = paper.select(args.rows, "table1")
    print(f"# bench: {options.describe()}, {args.steps} timed steps per row; python "
          f"{platform.python_version()}, numpy {np.__version__}", flush=True)
    measured = roofline.measure_ceiling(options.device)
    print(f"# {bench.describe_ceiling(measured)}", flush=True)
    ceiling = roofline.best_ceiling(cost.read_ceiling(options.device), measured)
    if ceiling != measured:  # an earlier bench timed it higher: the truer figure
        print(f"# shares against the best kept here: {bench.describe_ceiling(ceiling)}",
              flush=True)
    timed = [options]  # the JAX mode is timed beside the C mode and the torch backend
    if options.backend == "theano" and options.theano_mode == "jax":
        timed += [dataclasses.replace(options, theano_mode="c"),
                  dataclasses.replace(options, backend="torch", compile_cache=True,
                                      theano_mode=registry.DEFAULT_THEANO_MODE)]
    results = []
    for row in rows:
        for opts in timed:
            r = bench.bench_row(row, opts, args.steps, warmup=args.warmup,
                                batch_size=args.batch_size, channels_last=args.channels_last,
                                ceiling=ceiling)
            warm = ("" if r["warm_compile_s"] is None
                    else f", warm compile {r['warm_compile_s']:.1f} s")
            print(f"# {row.id} {r['backend']}: {r['images_per_s']:.0f} img/s, "
                  f"{r['sec_per_epoch']:.2f} s per epoch on {r['device']}, {r['layout']}; "
                  f"cold compile {r['compile_s']:.1f} s (cache {r['cache_outcome'] or '-'})"
                  f"{warm}; {r['tflops']:.3g} TFLOP/s = "
                  f"{roofline.share(r['ceiling_fraction'])} of the ceiling", flush=True)
            results.append(r)
    if args.json != "-":
        print(bench.format_table(results))
    where = cost.record(results, timed * len(rows), ceiling=ceiling)
    print(f"# s/epoch and the ceiling recorded in {where} (the training commands' estimates)")
    ratios = bench.mode_ratios(results)
    if ratios:
        print(ratios)
    _write_json(results, args.json)
    return 0


def _write_json(obj, where: Optional[str]) -> None:
    if where == "-":
        print(json.dumps(obj, indent=1))
    elif where:
        Path(where).write_text(json.dumps(obj, indent=1) + "\n")


def _bench_sampler(args) -> int:
    r = sampler_bench.time_sampler(batch_size=args.batch_size or 100)
    print(f"# bench --sampler: {r['n']} CIFAR-shaped images, batch {r['batch_size']}, pad "
          f"{r['pad']}, {r['epochs']} epochs; numpy {r['numpy']}")
    for key in ("flip_off", "flip_on"):
        f = r[key]
        print(f"{key:8s} {f['images_per_s']:10.0f} images/s  {f['ms_per_batch']:6.2f} ms/batch")
    _write_json(r, args.json)
    return 0


def cmd_profile(args) -> int:
    variants = args.variants.split(",")
    for variant in variants:  # an unknown one: refused before anything runs
        profile.variant_options(variant)
    device = plans.resolve_backend(args, "torch")[0].device
    if device == "cpu" and not args.count_ops:
        raise UsageError(f"{plans.PROG} profile: timing the step needs a CUDA GPU (it times "
                         f"CUDA graphs) and {registry._torch_gpu()[1]} here; --count-ops "
                         "counts one step's operators on the CPU")
    rows = paper.select(args.rows or "t1-resnet32x1", None)
    failed = profile.profile(rows, variants, steps=args.steps,
                             kernels=args.kernels, count_ops=args.count_ops,
                             device=device, batch_size=args.batch_size)
    return 1 if failed else 0


def cmd_export(args) -> int:
    paths = export.export(args.run_dir, args.out_dir)
    print(paths["card"].read_text().splitlines()[0])
    for path in paths.values():
        print(f"export: {path}")
    return 0


def cmd_evaluate(args) -> int:
    options = plans.resolve_backend(args)[0]  # --device auto: decided as for training
    r = export.evaluate(args.weights, options.backend, options.device, args.dataset, args.data_dir,
                        dtype=args.dtype, theano_mode=options.theano_mode, subset=args.subset,
                        unverified=args.unverified_data)
    print(f"evaluate: {r['weights']}: test accuracy {100 * r['test_acc']:.2f} % "
          f"({round(r['test_acc'] * r['images'])} of {r['images']} {r['dataset']} test "
          f"images), loss {r['test_loss']:.6f}; {r['backend']}"
          + ("" if r["device"] == args.device else f"; {r['device']}"))
    return 0


def cmd_replay(args) -> int:
    plan = replay.plan(args.run_dir, args.out_dir)
    registry.probe(plan.backend_options)  # no GPU here, a backend missing: said before any file
    train_runs(plan)
    line, same = replay.verdict(args.run_dir, plan.runs[0].run_dir)
    print(line, flush=True)
    return 0 if same else 1


def cmd_test(argv: Sequence[str]) -> int:
    return subprocess.call(["bash", str(ROOT / "tests" / "run.sh"), *argv])


def cmd_lasagne(args) -> int:
    if not Path(args.script).is_file():
        raise UsageError(f"run_experiments.sh lasagne: no script {args.script!r}: give the "
                         f"path of a Python file")
    if args.dtype not in registry.BACKEND_DTYPES["theano"]:
        raise UsageError(f"run_experiments.sh lasagne: --dtype {args.dtype} is torch only; "
                         f"choose float32 or float64 (Theano's floatX)")
    # Theano reads floatX once, at its import, which ``import original`` makes
    flags = os.environ.get("THEANO_FLAGS")
    os.environ["THEANO_FLAGS"] = f"{flags},floatX={args.dtype}" if flags else f"floatX={args.dtype}"
    from original import run
    return run.run(args)


COMMANDS = {**{name: cmd_train for name in paper.EXPERIMENTS}, "params": cmd_params,
            "compare": cmd_compare, "status": lambda args: status.show(Path(args.dir)),
            "smoke": cmd_smoke, "verify": cmd_verify, "bench": cmd_bench, "profile": cmd_profile,
            "gpucheck": lambda args: gpucheck.run(gpucheck.plan_from_args(args)),
            "export": cmd_export, "evaluate": cmd_evaluate, "replay": cmd_replay,
            "lasagne": cmd_lasagne}
