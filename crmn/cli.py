"""The archive's one command line: ``bash run_experiments.sh <command> [options]`` (SPEC §1).

Commands
--------
``table1`` ``table2`` ``table3`` ``svhn``
    Train every selected row of that experiment of :mod:`crmn.paper` (section 4's protocol:
    search run with plateau schedule, then final run; SPEC §5), ``--seeds`` times each (or
    only ``--seed K``), into ``<out-dir>/<experiment>/<row>/seed<k>/`` (format:
    ``crmn/LOGS.md``), then print the comparison with the published table (:mod:`crmn.report`).
``params``
    Our trainable-parameter count for every row of Tables 1-3 and SVHN, built in the chosen
    stack, beside the paper's (Table 1 only publishes counts).
``compare DIR``
    Re-print the comparison from existing run directories; writes ``REPORT.md`` and plots.
    Where DIR holds a launcher's ``manifest.txt``, also lists its runs that did not finish
    and then exits 1.
``status DIR``
    Where every run of a launched grid stands (``--launcher local|slurm``; :mod:`crmn.launch`).
    Where DIR holds a launcher's ``manifest.txt``, also lists its runs that did not finish
    and then exits 1.
``status DIR``
    Where every run of a launched grid stands (``--launcher local|slurm``; :mod:`crmn.launch`).
``smoke``
    A minute-long end-to-end run on a tiny CRMN (n=1, k=0.5) and tiny fake CIFAR-100-format
    data written on the spot: loader, sampler, schedule search, training, checkpoints and
    report all run for real; nothing is downloaded.
``verify``
    The two stacks compute the same function and take the same step (:mod:`crmn.verify`).
``bench``
    Seconds per epoch of paper rows beside the paper's (:mod:`crmn.bench`).
``profile``
    The torch step under several settings, timed or its operators counted
    (:mod:`crmn.tools.profile`, a developer tool).
``test``
    Run the test suite (``tests/run.sh``), passing extra arguments to pytest.

This is the only argument parser of the archive: every command shares the spelling and the
default of the options it has in common (``--backend``, ``--device``, ``--dtype``,
``--rows``, ``--batch-size``). Every default shown by ``--help`` is read from
:class:`crmn.config.ModelConfig`, :class:`crmn.config.TrainConfig` or :mod:`crmn.stacks`, so
the help cannot disagree with what runs.

Expert options ``--n``, ``--k``, ``--batch-size`` replace the row's architecture or batch size
(the run then is *not* the paper's row; the run's ``config.json`` records what ran). They exist
so that tests and quick looks can push a real row's protocol through a tiny network.

Exit codes: 0 success; 1 a run-time error (a :class:`crmn.errors.CRMNError`, printed as
``error: <message>``) or a failed check; 2 a usage error (unknown command, option or row
id), one line on stderr; 3 stopped by SIGUSR1 after checkpointing the last finished epoch
(``--resume`` continues).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from crmn import bench, data, launch, paper, report, stacks, verify
from crmn import train as trainer
from crmn.config import ModelConfig, TrainConfig
from crmn.errors import EXIT_STOPPED, ConfigError, CRMNError, StopRequested, UsageError
from crmn.naming import count_trainable
from crmn.stack import check_device
from crmn.launch import status
from crmn.tools import profile, sampler_bench

ROOT = Path(__file__).resolve().parent.parent
TRAIN_COMMANDS = tuple(paper.EXPERIMENTS)  # table1, table2, table3, svhn

#: Smoke test: tiny CRMN, tiny fake CIFAR-100-format data, short plateau schedule.
SMOKE_MODEL = dict(n=1, k=0.5)
SMOKE_DATA = dict(n_train=500, n_test=200)
SMOKE_TRAIN = dict(batch_size=50, patience=1, max_epochs=2)


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line instead of usage + message."""

    def error(self, message):  # noqa: D401 - argparse hook
        raise UsageError(f"{self.prog}: {message}")


def _default(cls, name: str):
    """The declared default of a dataclass field (never retyped in help strings)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise AttributeError(f"{cls.__name__} has no field {name!r}")


# ---------------------------------------------------------------------------------------
# option types


def _schedule(text: str):
    try:
        epochs = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--schedule wants epochs per stage like 80,40,40, "
                                         f"got {text!r}") from None
    if any(e < 0 for e in epochs):
        raise argparse.ArgumentTypeError(f"--schedule epochs must be >= 0, got {text!r}")
    return epochs


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {v}")
    return v


def _device(text: str) -> str:
    try:
        return check_device(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ---------------------------------------------------------------------------------------
# option groups shared by the commands


def _stack_options(p: argparse.ArgumentParser, backend: bool = True) -> None:
    """Which stack, where, in which precision: one spelling and default for every command."""
    g = p.add_argument_group("stack")
    if backend:
        g.add_argument("--backend", choices=stacks.BACKENDS, default=stacks.DEFAULT_BACKEND,
                       help="stack that builds the network (default: %(default)s)")
    g.add_argument("--device", type=_device, default="cpu", metavar="DEV",
                   help="cpu, cuda or cuda:N (default: %(default)s)")
    if backend:
        g.add_argument("--dtype", choices=stacks.DTYPES, default=stacks.DEFAULT_DTYPE,
                       help="floating-point type of the network; bfloat16 (autocast, float32 "
                            "weights, channels-last) is torch only (default: %(default)s)")
        g.add_argument("--compile", action="store_true", default=False,
                       help="torch only: torch.compile behind the captured CUDA graph "
                            "(default: %(default)s)")
        g.add_argument("--theano-mode", choices=stacks.THEANO_MODES,
                       default=stacks.DEFAULT_THEANO_MODE,
                       help="theano only: compile the graph with Theano's C backend (the "
                            "reference) or through JAX, which also runs it on a current GPU "
                            "(--device cuda; default: %(default)s)")


def _rows_option(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument("--rows", metavar="ID[,ID]", default=None,
                   help=f"comma-separated row ids of crmn/paper.py (default: {default_help})")


def _batch_option(p: argparse.ArgumentParser, default_help: str = "the row's") -> None:
    p.add_argument("--batch-size", type=_positive, metavar="B", default=None,
                   help=f"images per batch (default: {default_help})")


def _run_options(p: argparse.ArgumentParser, data_dir: bool = True) -> None:
    """Options of the commands that train (SPEC §1); smoke writes its own data."""
    g = p.add_argument_group("runs (SPEC §1)")
    g.add_argument("--seeds", type=_positive, metavar="N", default=None,
                   help="repetitions per row, seeds 0..N-1 (default: the row's `seeds` in "
                        "crmn/paper.py: 5 for t2-crmn32x4, else 1)")
    g.add_argument("--seed", type=int, metavar="K", default=None,
                   help="train only seed K of each row (one run of a grid, e.g. one task "
                        "of a job array; default: seeds 0..N-1 of --seeds)")
    g.add_argument("--epochs-cap", type=_positive, metavar="N",
                   default=_default(TrainConfig, "max_epochs"),
                   help="at most N epochs per learning-rate stage (default: %(default)s = "
                        "no cap)")
    if data_dir:
        g.add_argument("--data-dir", type=Path, default=ROOT / "data", metavar="DIR",
                       help="datasets are read from / downloaded into DIR, or DIR is the "
                            "extracted folder itself (default: data/ of the archive; see "
                            "data/README.md)")
        g.add_argument("--unverified-data", action="store_true",
                       help="accept a dataset folder that differs from the official files "
                            "(checksums, image counts); such runs are marked not as "
                            "published (default: refuse it)")
    g.add_argument("--out-dir", type=Path, default=ROOT / "runs", metavar="DIR",
                   help="run directories go under DIR/<experiment>/ (default: runs/ of the "
                        "archive)")
    if data_dir:
        g.add_argument("--dataset", choices=tuple(paper.DATASET_CLASSES), default=None,
                       help="train the rows on this dataset instead of their own (e.g. "
                            "ResNet-32 on cifar10, the He et al. check); marked not as "
                            "published (default: the row's)")
    g.add_argument("--resume", action="store_true",
                   help="continue runs from their checkpoint.h5 (default: start afresh)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar or download bar, per-epoch lines only")


def _model_options(p: argparse.ArgumentParser) -> None:
    """The network's interpretations of points the paper leaves open (SPEC §4)."""
    i = p.add_argument_group("the network's interpretations (SPEC §4)")
    i.add_argument("--outgate", choices=("logistic", "tanh"),
                   default=_default(ModelConfig, "outgate"),
                   help="LSTM output-gate nonlinearity (default: %(default)s, eq. 4)")
    i.add_argument("--forget-bias", type=float, metavar="B",
                   default=_default(ModelConfig, "forget_bias"),
                   help="initial forget-gate bias (default: %(default)s)")
    i.add_argument("--dense-init", choices=("he", "glorot"),
                   default=_default(ModelConfig, "dense_init"),
                   help="softmax-layer weight init (default: %(default)s)")


def _protocol_options(p: argparse.ArgumentParser) -> None:
    """The protocol's interpretations (SPEC §4-5) and the expert overrides."""
    i = p.add_argument_group("the protocol's interpretations (SPEC §4-5)")
    i.add_argument("--nesterov", action="store_true",
                   default=_default(TrainConfig, "nesterov"),
                   help="Nesterov momentum instead of classical (default: %(default)s)")
    i.add_argument("--flip", action="store_true", default=_default(TrainConfig, "flip"),
                   help="random horizontal flips in augmentation (default: %(default)s)")
    i.add_argument("--patience", type=_positive, metavar="EPOCHS",
                   default=_default(TrainConfig, "patience"),
                   help="plateau patience beta in epochs (default: %(default)s)")
    i.add_argument("--lr", type=float, metavar="LR", default=None,
                   help="learning rate of the first stage; the later stages keep the row's "
                        "ratios (default: the row's, 0.1)")
    i.add_argument("--schedule", type=_schedule, metavar="E1,E2,...",
                   default=_default(TrainConfig, "schedule"),
                   help="fixed epochs per lr stage, skips the search run (default: "
                        "%(default)s = search)")
    e = p.add_argument_group("expert options (tests, quick looks: the run is then not the "
                             "paper's row)")
    e.add_argument("--n", type=_positive, default=None,
                   help="override the row's blocks per stage (default: the row's)")
    e.add_argument("--k", type=float, default=None,
                   help="override the row's width factor (default: the row's)")
    _batch_option(e, "the row's; overrides it")


def _train_parent() -> argparse.ArgumentParser:
    """Options of the training commands and smoke."""
    p = argparse.ArgumentParser(add_help=False)
    _stack_options(p)
    _rows_option(p, "every row of the experiment")
    _run_options(p)
    _model_options(p)
    _protocol_options(p)
    return p


def _add_tools(sub) -> None:
    """verify, bench and profile: the checks and timings, sharing the stack options."""
    sp = sub.add_parser("verify", help="the two stacks agree (float64), or the GPU agrees "
                                       "with the CPU (--device cuda)")
    _rows_option(sp, "three small configurations")
    sp.add_argument("--device", type=_device, default="cpu", metavar="DEV",
                    help="cpu: compare the stacks in float64; cuda or cuda:N: the torch "
                         "stack on the GPU against the CPU (default: %(default)s)")
    _batch_option(sp, "8, for --rows and the small configurations alike")
    sp.add_argument("--tol", type=float, default=None,
                    help="relative tolerance of the float64 checks (default: 1e-6)")
    sp.add_argument("--lr", type=float, default=0.1,
                    help="learning rate of the compared step (default: %(default)s)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the weights and batches "
                                                       "(default: %(default)s)")
    sp = sub.add_parser("bench", help="seconds per epoch of paper rows beside the paper's")
    _stack_options(sp)
    _rows_option(sp, "every Table 1 row")
    _batch_option(sp)
    sp.add_argument("--steps", type=_positive, default=50,
                    help="timed SGD steps per row (default: %(default)s)")
    sp.add_argument("--warmup", type=_positive, default=3,
                    help="steps of the warm-up epoch, timed apart (default: %(default)s)")
    layout = sp.add_mutually_exclusive_group()
    layout.add_argument("--channels-last", dest="channels_last", action="store_const",
                        const=True, default=None,
                        help="torch only: NHWC activations and filters (default: with "
                             "bfloat16 only)")
    layout.add_argument("--channels-first", dest="channels_last", action="store_const",
                        const=False, help="torch only: NCHW even with bfloat16")
    sp.add_argument("--json", default=None, metavar="PATH",
                    help="also write the results as JSON to PATH ('-' for stdout)")
    sp.add_argument("--sampler", action="store_true",
                    help="time the batch sampler (crops, flips; numpy) instead of a stack")
    sp = sub.add_parser("profile", help="developer tool: the torch step under several "
                                        "settings, timed on a GPU or its operators counted")
    _stack_options(sp, backend=False)
    _rows_option(sp, "t1-resnet32x1")
    _batch_option(sp, "the row's; with --count-ops only")
    sp.add_argument("--variants", default="fp32,bf16",
                    help="comma-separated variants, e.g. fp32,bf16-cl,bf16-percast "
                         "(default: %(default)s; see crmn/tools/profile.py)")
    sp.add_argument("--steps", type=_positive, default=100,
                    help="timed steps per variant (default: %(default)s)")
    sp.add_argument("--kernels", action="store_true",
                    help="also list the costliest kernels of one eager step")
    sp.add_argument("--count-ops", action="store_true",
                    help="count one eager step's operators instead of timing (CPU works)")


def build_parser() -> argparse.ArgumentParser:
    """The full parser; ``--help`` of each command lists its options with real defaults."""
    parser = _Parser(prog="run_experiments.sh",
                     description="Reproduce Moniz & Pal (2016), Convolutional Residual "
                                 "Memory Networks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    common = _train_parent()
    for name in TRAIN_COMMANDS:
        n_rows = len(paper.EXPERIMENTS[name])
        sp = sub.add_parser(name, parents=[common],
                            help=f"train the {n_rows} {name} row(s) and compare with the paper")
        launch.add_arguments(sp, _positive)
    sp = sub.add_parser("params", help="parameter count of every row beside the paper's "
                                       "(no data)")
    _stack_options(sp)
    _rows_option(sp, "every row")
    _model_options(sp)
    sp.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    sp = sub.add_parser("compare", help="re-print the comparison from run directories and "
                                        "write REPORT.md with plots")
    sp.add_argument("dir", metavar="DIR", help="e.g. runs/table1 (or runs/ for all)")
    sp.add_argument("--no-plots", dest="plots", action="store_false",
                    help="skip the PNG learning curves")
    sp = sub.add_parser("status", help="where every run of a grid started with --launcher "
                                       "stands: finished, running, waiting, failed")
    sp.add_argument("dir", metavar="DIR", help="e.g. runs/table1 (or runs/ for all)")
    sp = sub.add_parser("smoke", help="a minute-long end-to-end run on tiny fake data (no "
                                      "download)")
    _stack_options(sp)
    _run_options(sp, data_dir=False)
    _model_options(sp)
    _protocol_options(sp)
    _add_tools(sub)
    sp = sub.add_parser("test", add_help=False, help="run the test suite (extra args: pytest)")
    sp.add_argument("args", nargs=argparse.REMAINDER)
    return parser


# ---------------------------------------------------------------------------------------
# configuration from options


def select_rows(ids: Optional[str], experiment: Optional[str], strict: bool = True) -> tuple:
    """Rows of ``--rows`` (all of ``experiment`` if not given); a bad id is a UsageError."""
    try:
        return paper.select(ids, experiment, strict=strict and experiment is not None)
    except ConfigError as exc:
        raise UsageError(f"run_experiments.sh: {exc}") from None


def model_overrides(args) -> Dict:
    """ModelConfig fields set by the command line (SPEC §4 flags and expert overrides)."""
    over = dict(outgate=args.outgate, forget_bias=args.forget_bias, dense_init=args.dense_init)
    for name in ("n", "k"):
        if getattr(args, name, None) is not None:
            over[name] = getattr(args, name)
    return over


def configs_for(row: paper.Row, args, seed: int):
    """(ModelConfig, TrainConfig) of one run of ``row`` with seed ``seed``.

    Raises :class:`ConfigError` (one line) when the options contradict the row, e.g. a
    ``--schedule`` whose length differs from the row's number of learning rates.
    """
    over = model_overrides(args)
    arch = {k: over.pop(k) for k in ("n", "k") if k in over}
    lr_stages = row.lr_stages
    if args.lr is not None:  # the first stage's rate; the later stages keep the ratios
        lr_stages = tuple(args.lr * r / row.lr_stages[0] for r in row.lr_stages)
    t_over = dict(nesterov=args.nesterov, flip=args.flip, patience=args.patience,
                  max_epochs=args.epochs_cap, schedule=args.schedule, seed=seed,
                  batch_size=args.batch_size or row.batch_size, lr_stages=lr_stages)
    classes = paper.DATASET_CLASSES[getattr(args, "dataset", None) or row.dataset]
    try:
        model = ModelConfig(n=arch.get("n", row.n), k=arch.get("k", row.k),
                            classes=classes, memory=row.memory, **over)
        train = TrainConfig(**t_over)
    except ValueError as exc:
        raise ConfigError(f"{exc} (row {row.id}, command line)") from None
    return model, train


def plan_runs(rows, args) -> List[tuple]:
    """(row, seed, ModelConfig, TrainConfig) of every run, all validated before any trains."""
    if args.seed is not None and (args.seed < 0 or args.seeds is not None):
        raise UsageError("run_experiments.sh: --seed K wants K >= 0 and no --seeds")
    plan = []
    for row in rows:
        n_seeds = args.seeds if args.seeds is not None else row.seeds
        for k in ([args.seed] if args.seed is not None else range(n_seeds)):
            plan.append((row, k, *configs_for(row, args, seed=k)))
    return plan


# ---------------------------------------------------------------------------------------
# commands


def _train_rows(experiment: str, rows, args, *, data_dir: Path, out_dir: Path,
                dataset: Optional[str] = None, row_label=None) -> List[Path]:
    """Run crmn.train.run for every row and seed; returns the run directories."""
    plan = plan_runs(rows, args)
    print(f"backend {args.backend}, device {args.device} (requested), dtype {args.dtype}; "
          f"runs under {out_dir / experiment}", flush=True)
    run_dirs = []
    for row, k, model, train in plan:
        trainer.check_stop(out_dir / experiment)
        name = row_label(row) if row_label else row.id
        run_dir = out_dir / experiment / name / f"seed{k}"
        spec = trainer.RunSpec(model=model, train=train, dataset=dataset or row.dataset,
                               data_dir=data_dir, backend=args.backend, dtype=args.dtype,
                               device=args.device, compile=args.compile,
                               theano_mode=args.theano_mode,
                               unverified_data=getattr(args, "unverified_data", False),
                               row=None if row_label else row.id, experiment=experiment)
        # crmn.train prints and stores what actually runs (e.g. "cuda:0 (NVIDIA H100)")
        print(f"== {name} seed {k} -> {run_dir}", flush=True)
        trainer.run(run_dir, spec, lambda spec=spec: _build(spec), resume=args.resume,
                    progress=args.progress)
        run_dirs.append(run_dir)
    return run_dirs


def _build(spec):
    """The stack of a :class:`crmn.train.RunSpec` (the factory the training loop calls)."""
    return stacks.build(spec.backend, spec.model, spec.train, device=spec.device,
                        dtype=spec.dtype, compile=spec.compile, theano_mode=spec.theano_mode)


def _subparser(command: str) -> argparse.ArgumentParser:
    """The parser of one command (the launchers rebuild single-run lines from it)."""
    return build_parser()._subparsers._group_actions[0].choices[command]


def cmd_train(args) -> int:
    rows = select_rows(args.rows, args.command)
    if args.n is not None or args.k is not None or args.batch_size is not None:
        print("note: --n/--k/--batch-size override the paper's rows; this is not the "
              "published configuration", flush=True)
    _train_rows(args.command, rows, args, data_dir=args.data_dir, out_dir=args.out_dir,
                dataset=args.dataset)
    if args.seed is not None:  # one run of a grid: its launcher compares when all are done
        print(f"compare: bash run_experiments.sh compare {args.out_dir / args.command}")
        return 0
    report.compare(args.out_dir / args.command, plots=True)
    return 0


def param_rows(backend: str, device: str = "cpu", dtype: str = stacks.DEFAULT_DTYPE,
               overrides: Optional[Dict] = None, rows: Sequence[paper.Row] = paper.ROWS,
               theano_mode: str = stacks.DEFAULT_THEANO_MODE) -> List[Dict]:
    """Trainable-parameter counts of paper rows, each network built in ``backend``.

    Returns one dict per row of ``rows``: ``row``, ``label``, ``table``, ``params`` (the
    stack's own count), ``canonical_params`` (:func:`crmn.naming.count_trainable`, the
    framework-free count the checkpoint layout implies), ``params_m`` and
    ``paper_params_m`` (None where the paper gives none).
    """
    out = []
    for row in rows:
        model = ModelConfig.for_row(row, **(overrides or {}))
        net = stacks.build(backend, model, TrainConfig.for_row(row), device=device,
                           dtype=dtype, theano_mode=theano_mode)
        params = int(net.param_count())
        del net
        out.append(dict(row=row.id, label=row.label, table=row.table, params=params,
                        canonical_params=count_trainable(model),
                        params_m=round(params / 1e6, 2), paper_params_m=row.paper_params_m))
    return out


def cmd_params(args) -> int:
    rows = param_rows(args.backend, args.device, args.dtype, model_overrides(args),
                      rows=select_rows(args.rows, None), theano_mode=args.theano_mode)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"trainable parameters, {args.backend} stack (paper: Table 1; blank where the "
          f"paper gives none)")
    print(f"| {'row':16s} | {'model':14s} | {'ours':>11s} | {'ours M':>7s} | {'paper M':>7s} |")
    print(f"|{'-' * 18}|{'-' * 16}|{'-' * 13}|{'-' * 9}|{'-' * 9}|")
    for r in rows:
        pm = f"{r['paper_params_m']:.2f}" if r["paper_params_m"] is not None else ""
        # the stack's own count must equal what the canonical layout implies; say so if not
        flag = "" if r["params"] == r["canonical_params"] else \
            f"  (canonical layout says {r['canonical_params']:,})"
        print(f"| {r['row']:16s} | {r['label']:14s} | {r['params']:>11,} | "
              f"{r['params_m']:>7.2f} | {pm:>7s} |{flag}")
    return 0


def cmd_compare(args) -> int:
    report.compare(Path(args.dir), plots=args.plots)
    return status.check_complete(Path(args.dir))  # a launched grid: every run finished?


def cmd_status(args) -> int:
    return status.show(Path(args.dir))


def cmd_smoke(args) -> int:
    """Tiny fake data, tiny CRMN, short plateau schedule, through the real pipeline."""
    root = args.out_dir / "smoke"
    data_dir = root / "data"  # not a run directory: crmn.report skips it
    t0 = time.time()
    data.write_fake("cifar100", data_dir, SMOKE_DATA["n_train"], SMOKE_DATA["n_test"], seed=0)
    print(f"smoke: fake CIFAR-100-format data ({SMOKE_DATA['n_train']} train, "
          f"{SMOKE_DATA['n_test']} test images) in {data_dir}", flush=True)
    # The smoke run's own tiny configuration; explicit flags still win.
    args.rows, args.dataset = None, None
    args.n = args.n or SMOKE_MODEL["n"]
    args.k = args.k or SMOKE_MODEL["k"]
    args.batch_size = args.batch_size or SMOKE_TRAIN["batch_size"]
    if args.patience == _default(TrainConfig, "patience"):
        args.patience = SMOKE_TRAIN["patience"]
    args.epochs_cap = args.epochs_cap or SMOKE_TRAIN["max_epochs"]
    args.seeds = args.seeds or (None if args.seed is not None else 1)
    name = f"tiny-crmn-n{args.n}-k{args.k:g}"
    if not args.resume:  # the smoke run is disposable: start it afresh every time
        shutil.rmtree(root / name, ignore_errors=True)
    run_dirs = _train_rows("smoke", [paper.row("t1-crmn32x1")], args, data_dir=data_dir,
                           out_dir=args.out_dir, dataset="cifar100", row_label=lambda r: name)
    report_md = report.compare(root, plots=True)
    print(f"smoke: done in {time.time() - t0:.0f} s", flush=True)
    print(f"smoke: data       {data_dir}")
    for d in run_dirs:
        print(f"smoke: run        {d} (config.json, log.jsonl, checkpoint.h5, best.h5, "
              f"summary.json)")
    print(f"smoke: report     {report_md}")
    return 0


def cmd_verify(args) -> int:
    configs = args.rows.split(",") if args.rows else None
    if configs:
        select_rows(args.rows, None)  # an unknown id is a usage error
    results = verify.verify(configs, device=args.device, tol=args.tol, lr=args.lr,
                            seed=args.seed, batch_size=args.batch_size)
    return 0 if all(r.passed for r in results) else 1


def cmd_bench(args) -> int:
    if args.sampler:
        return _bench_sampler(args)
    if (args.compile or args.channels_last is not None) and args.backend != "torch":
        raise UsageError("run_experiments.sh bench: --compile and --channels-last/"
                         "--channels-first need --backend torch")
    rows = select_rows(args.rows, "table1", strict=False)
    setting = args.dtype + (" + torch.compile" if args.compile else "")
    print(f"# bench: backend {args.backend}, device {args.device}, dtype {setting}, "
          f"{args.steps} timed steps per row; python {platform.python_version()}, numpy "
          f"{np.__version__}", flush=True)
    # the JAX mode is timed beside the C mode and the torch stack, in one run (issue #12)
    timed = [(args.backend, args.theano_mode)]
    if args.backend == "theano" and args.theano_mode == "jax":
        timed += [("theano", "c"), ("torch", stacks.DEFAULT_THEANO_MODE)]
    results = []
    for row in rows:
        for backend, mode in timed:
            r = bench.bench_row(row, backend, args.device, args.dtype, args.steps,
                                warmup=args.warmup, batch_size=args.batch_size,
                                compile=args.compile, channels_last=args.channels_last,
                                theano_mode=mode)
            print(f"# {row.id} {r['stack']}: {r['images_per_s']:.0f} img/s, "
                  f"{r['sec_per_epoch']:.2f} s per epoch on {r['device']}, {r['layout']}",
                  flush=True)
            results.append(r)
    print(bench.format_table(results))
    ratios = bench.mode_ratios(results)
    if ratios:
        print(ratios)
    _write_json(results, args.json)
    return 0


def _write_json(obj, where: Optional[str]) -> None:
    """``--json PATH``: the figures as JSON to PATH, or to stdout for ``-``."""
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
    rows = select_rows(args.rows or "t1-resnet32x1", None)
    failed = profile.profile(rows, args.variants.split(","), steps=args.steps,
                             kernels=args.kernels, count_ops=args.count_ops,
                             device=args.device, batch_size=args.batch_size)
    return 1 if failed else 0


def cmd_test(argv: Sequence[str]) -> int:
    return subprocess.call(["bash", str(ROOT / "tests" / "run.sh"), *argv])


COMMANDS = {**{name: cmd_train for name in TRAIN_COMMANDS}, "params": cmd_params,
            "compare": cmd_compare, "status": cmd_status, "smoke": cmd_smoke,
            "verify": cmd_verify, "bench": cmd_bench, "profile": cmd_profile}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 run-time error or failed check, 2 usage
    error, 3 stopped by a signal)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "test":  # everything after the name goes to pytest
        return cmd_test(argv[1:])
    try:
        args = build_parser().parse_args(argv)
        if args.command in TRAIN_COMMANDS and launch.wanted(args):
            # the grid as single runs: subprocesses or Slurm
            plan = plan_runs(select_rows(args.rows, args.command), args)
            return launch.main(args, plan, _subparser(args.command),
                               ROOT / "run_experiments.sh")
        if args.command in TRAIN_COMMANDS + ("smoke",):
                    # a scheduler's warning (sbatch --signal=B:USR1@T): checkpoint, stop, exit 3
            signal.signal(signal.SIGUSR1, trainer.request_stop)
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(str(exc).splitlines()[0], file=sys.stderr)
        return exc.exit_code
    except StopRequested as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return exc.exit_code
    except CRMNError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code

if __name__ == "__main__":
    sys.exit(main())
