"""From parsed options to a checked plan (:mod:`crmn.plan`), before anything is created.

Every check of the command line's values that needs more than one value, or the machine,
lives here: the rows a ``--rows`` names, ``--seed`` against ``--seeds``, the launcher
options, whether the asked device exists (asked of the stack's framework, before any data
is read or downloaded), and the configurations each run will have. A fault is one
:class:`crmn.errors.UsageError` line (exit 2); nothing has been written when it is raised.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

from crmn import gpucheck, paper, registry
from crmn.cli.parser import SMOKE
from crmn.config import ModelConfig, TrainConfig
from crmn.errors import ConfigError, UsageError
from crmn.plan import LaunchOptions, Run, RunSpec, TrainPlan
from crmn.registry import StackOptions

PROG = "run_experiments.sh"


def stack_options(args, backend: Optional[str] = None) -> StackOptions:
    """The :class:`StackOptions` of a command's ``--backend --device --dtype --theano-mode
    --compile --no-compile-cache``, checked together and against the machine (:func:`registry.probe`).

    ``backend``: the stack of a command without ``--backend`` (verify and profile on a GPU
    run the torch stack)."""
    try:
        backend = backend or getattr(args, "backend", registry.DEFAULT_BACKEND)
        mode = getattr(args, "theano_mode", None) or registry.default_theano_mode(backend)
        options = StackOptions(backend=backend, device=args.device,
                               dtype=getattr(args, "dtype", registry.DEFAULT_DTYPE),
                               theano_mode=mode, compile=getattr(args, "compile", False),
                               compile_cache=getattr(args, "compile_cache", True))
        registry.probe(options)
    except UsageError:
        raise
    except ConfigError as exc:
        raise UsageError(f"{PROG} {args.command}: {exc}") from None
    return options


def select_rows(args, experiment: Optional[str], strict: bool = True) -> Tuple[paper.Row, ...]:
    """The rows of ``--rows`` (every row of ``experiment`` when not given)."""
    return paper.select(args.rows, experiment, strict=strict and experiment is not None)


def model_overrides(args) -> Dict:
    """ModelConfig fields set by the command line (SPEC §4 flags and expert overrides)."""
    over = dict(outgate=args.outgate, forget_bias=args.forget_bias, dense_init=args.dense_init)
    for name in ("n", "k"):
        if getattr(args, name, None) is not None:
            over[name] = getattr(args, name)
    return over


def configs_for(row: paper.Row, args, seed: int, dataset: Optional[str] = None):
    """(ModelConfig, TrainConfig) of one run of ``row`` with seed ``seed``; a value that
    contradicts the row (e.g. a ``--schedule`` of another length than the row's learning
    rates) is a :class:`UsageError`."""
    over = model_overrides(args)
    arch = {k: over.pop(k) for k in ("n", "k") if k in over}
    lr_stages = row.lr_stages
    if args.lr is not None:  # the first stage's rate; the later stages keep the ratios
        lr_stages = tuple(args.lr * (r / row.lr_stages[0]) for r in row.lr_stages)
    try:
        model = ModelConfig(n=arch.get("n", row.n), k=arch.get("k", row.k),
                            classes=paper.DATASET_CLASSES[dataset or row.dataset],
                            memory=row.memory, **over)
        train = TrainConfig(nesterov=args.nesterov, flip=args.flip, patience=args.patience,
                            epochs_cap=args.epochs_cap, schedule=args.schedule, seed=seed,
                            batch_size=args.batch_size or row.batch_size, lr_stages=lr_stages)
    except ConfigError as exc:
        raise UsageError(f"{PROG} {args.command}: {exc} (row {row.id})") from None
    return model, train


def _seeds(args, row: paper.Row):
    if args.seed is not None:
        return [args.seed]
    return range(args.seeds if getattr(args, "seeds", None) is not None else row.seeds)


def launch_options(args) -> LaunchOptions:
    return LaunchOptions(launcher=args.launcher, jobs=args.jobs,
                         max_parallel=args.max_parallel, slurm_args=args.slurm_args,
                         wait=args.wait, max_requeues=args.max_requeues)


def train_plan(args) -> TrainPlan:
    """The plan of ``table1``/``table2``/``table3``/``svhn``: every run checked, the device
    probed; nothing read, written or downloaded yet."""
    if args.seed is not None and (args.seed < 0 or args.seeds is not None):
        raise UsageError(f"{PROG}: --seed K wants K >= 0 and no --seeds")
    launch = launch_options(args)
    rows = select_rows(args, args.command)
    stack = stack_options(args)
    exp_dir = Path(args.out_dir) / args.command
    runs = []
    for row in rows:
        for k in _seeds(args, row):
            model, train = configs_for(row, args, k, args.dataset)
            spec = RunSpec(model=model, train=train, dataset=args.dataset or row.dataset,
                           data_dir=args.data_dir, stack=stack,
                           unverified_data=args.unverified_data, row=row.id,
                           experiment=args.command)
            runs.append(Run(spec, row.id, exp_dir / row.id / f"seed{k}"))
    return TrainPlan(command=args.command, runs=tuple(runs), out_dir=args.out_dir,
                     resume=args.resume, progress=args.progress, launch=launch,
                     one_seed=args.seed is not None)


def smoke_plan(args) -> TrainPlan:
    """smoke's one run: a tiny CRMN (its own ``--n --k``, defaults :data:`SMOKE`) on fake
    CIFAR-100-format data under ``<out-dir>/smoke/data``, started afresh unless
    ``--resume`` (the run folder is emptied under its lock)."""
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"{PROG} smoke: --seed K wants K >= 0")
    stack = stack_options(args)
    seed = args.seed or 0
    row = paper.row(SMOKE["row"])
    model, train = configs_for(row, args, seed, "cifar100")
    name = f"tiny-crmn-n{model.n}-k{model.k:g}"
    root = Path(args.out_dir) / "smoke"
    spec = RunSpec(model=model, train=train, dataset="cifar100", data_dir=root / "data",
                   stack=stack, row=None, experiment="smoke")
    return TrainPlan(command="smoke", runs=(Run(spec, name, root / name / f"seed{seed}"),),
                     out_dir=args.out_dir, resume=args.resume, progress=args.progress,
                     fresh=not args.resume)


def gpucheck_plan(args) -> gpucheck.GpucheckPlan:
    """gpucheck's plan: the device, ``--budget`` (seconds > 0) and the parts of ``--only``
    (names of :data:`crmn.gpucheck.PARTS`), checked before the output folder exists."""
    parts = gpucheck.PARTS if args.only is None else tuple(
        p.strip() for p in args.only.split(","))
    budget = gpucheck.DEFAULT_BUDGET if args.budget is None else args.budget
    try:
        return gpucheck.GpucheckPlan(device=args.device, quick=args.quick,
                                     out_dir=Path(args.out), budget=budget, parts=parts,
                                     real=args.real)
    except ConfigError as exc:
        raise UsageError(f"{PROG} gpucheck: {exc}") from None
