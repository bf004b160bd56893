"""The archive's one command line: ``bash run_experiments.sh <command> [options]`` (SPEC §1).

Commands
--------
``table1`` ``table2`` ``table3`` ``svhn``
    Train every selected row of that experiment of :mod:`crmn.paper` (section 4's protocol:
    search run with plateau schedule, then final run; SPEC §5), ``--seeds`` times each, into
    ``<out-dir>/<experiment>/<row>/seed<k>/`` (format: ``crmn/LOGS.md``), then print the
    comparison with the published table (:mod:`crmn.report`).
``params``
    Our trainable-parameter count for every row of Tables 1-3 and SVHN, built in the chosen
    stack, beside the paper's (Table 1 only publishes counts).
``compare DIR``
    Re-print the comparison from existing run directories; writes ``REPORT.md`` and plots.
    Where DIR holds a launcher's ``manifest.txt``, also lists its runs that did not finish
    and then exits 1.
``status DIR``
    Where every run of a launched grid stands (``--launcher local|slurm``; :mod:`crmn.launch`).
``smoke``
    A minute-long end-to-end run on a tiny CRMN (n=1, k=0.5) and tiny fake CIFAR-100-format
    data written on the spot: loader, sampler, schedule search, training, checkpoints and
    report all run for real; nothing is downloaded.
``verify`` ``bench``
    Hand their arguments to :func:`crmn.verify.main` / :func:`crmn.bench.main`.
``test``
    Run the test suite (``tests/run.sh``), passing extra arguments to pytest.

Every default shown by ``--help`` is read from :class:`crmn.config.ModelConfig`,
:class:`crmn.config.TrainConfig` or the signature of :func:`crmn.backend.make_backend`, so the
help cannot disagree with what runs.

Expert options ``--n``, ``--k``, ``--batch-size`` replace the row's architecture or batch size
(the run then is *not* the paper's row; the run's ``config.json`` records what ran). They exist
so that tests and quick looks can push a real row's protocol through a tiny network.

Exit codes: 0 success; 1 a :class:`crmn.errors.CRMNError` (printed as ``error: <message>``);
3 stopped by SIGUSR1 after checkpointing the last finished epoch (``--resume`` continues);
2 a usage error (unknown command, option or row id), one line on stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from crmn import launch, paper
from crmn.config import ModelConfig, TrainConfig
from crmn.errors import EXIT_STOPPED, ConfigError, CRMNError, StopRequested

ROOT = Path(__file__).resolve().parent.parent
TRAIN_COMMANDS = tuple(paper.EXPERIMENTS)  # table1, table2, table3, svhn
DELEGATED = ("verify", "bench")

#: Smoke test: tiny CRMN, tiny fake CIFAR-100-format data, short plateau schedule.
SMOKE_MODEL = dict(n=1, k=0.5)
SMOKE_DATA = dict(n_train=500, n_test=200)
SMOKE_TRAIN = dict(batch_size=50, patience=1, max_epochs=2)


def _default(cls, name: str):
    """The declared default of a dataclass field (never retyped in help strings)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise AttributeError(f"{cls.__name__} has no field {name!r}")


def _dtype_default() -> str:
    from crmn.backend import make_backend

    return inspect.signature(make_backend).parameters["dtype"].default


class UsageError(Exception):
    """A bad command line: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line instead of usage + message."""

    def error(self, message):  # noqa: D401 - argparse hook
        raise UsageError(f"{self.prog}: {message}")


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


def _common_parent() -> argparse.ArgumentParser:
    """Options shared by the training commands, smoke and params (SPEC §1 and §4)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options (SPEC §1)")
    g.add_argument("--backend", choices=("theano", "torch"), default="theano",
                   help="stack that builds and trains the network (default: %(default)s)")
    g.add_argument("--rows", metavar="ID[,ID]", default=None,
                   help="comma-separated row ids of crmn/paper.py (default: every row of "
                        "the experiment)")
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
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the backend runs (default: %(default)s)")
    g.add_argument("--data-dir", type=Path, default=ROOT / "data", metavar="DIR",
                   help="datasets are read from / downloaded into DIR (default: data/ of "
                        "the archive)")
    g.add_argument("--out-dir", type=Path, default=ROOT / "runs", metavar="DIR",
                   help="run directories go under DIR/<experiment>/ (default: runs/ of the "
                        "archive)")
    g.add_argument("--resume", action="store_true",
                   help="continue runs from their checkpoint.h5 (default: start afresh)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no batch counter or download bar, per-epoch lines only")

    i = p.add_argument_group("interpretations of points the paper leaves open (SPEC §4)")
    i.add_argument("--outgate", choices=("logistic", "tanh"),
                   default=_default(ModelConfig, "outgate"),
                   help="LSTM output-gate nonlinearity (default: %(default)s, eq. 4)")
    i.add_argument("--forget-bias", type=float, metavar="B", default=_default(ModelConfig, "forget_bias"),
                   help="initial forget-gate bias (default: %(default)s)")
    i.add_argument("--dense-init", choices=("he", "glorot"),
                   default=_default(ModelConfig, "dense_init"),
                   help="softmax-layer weight init (default: %(default)s)")
    i.add_argument("--nesterov", action="store_true",
                   default=_default(TrainConfig, "nesterov"),
                   help="Nesterov momentum instead of classical (default: %(default)s)")
    i.add_argument("--flip", action="store_true", default=_default(TrainConfig, "flip"),
                   help="random horizontal flips in augmentation (default: %(default)s)")
    i.add_argument("--patience", type=_positive, metavar="EPOCHS", default=_default(TrainConfig, "patience"),
                   help="plateau patience beta in epochs (default: %(default)s)")
    i.add_argument("--schedule", type=_schedule, metavar="E1,E2,...",
                   default=_default(TrainConfig, "schedule"),
                   help="fixed epochs per lr stage, skips the search run (default: "
                        "%(default)s = search)")
    i.add_argument("--dtype", choices=("float32", "float64", "bfloat16"),
                   default=_dtype_default(),
                   help="floating-point type of the network; bfloat16 (autocast, float32 "
                        "weights, channels-last) is torch only (default: %(default)s)")
    i.add_argument("--compile", action="store_true", default=False,
                   help="torch only: torch.compile behind the captured CUDA graph "
                        "(default: %(default)s)")

    e = p.add_argument_group("expert options (tests, quick looks: the run is then not the "
                             "paper's row)")
    e.add_argument("--n", type=_positive, default=None,
                   help="override the row's blocks per stage (default: the row's)")
    e.add_argument("--k", type=float, default=None,
                   help="override the row's width factor (default: the row's)")
    e.add_argument("--batch-size", type=_positive, metavar="B", default=None,
                   help="override the row's batch size (default: the row's)")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The full parser; ``--help`` of each command lists its options with real defaults."""
    parser = _Parser(prog="run_experiments.sh",
                     description="Reproduce Moniz & Pal (2016), Convolutional Residual "
                                 "Memory Networks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    common = _common_parent()
    for name in TRAIN_COMMANDS:
        n_rows = len(paper.EXPERIMENTS[name])
        sp = sub.add_parser(name, parents=[common],
                            help=f"train the {n_rows} {name} row(s) and compare with the paper")
        launch.add_arguments(sp)
    sp = sub.add_parser("params", parents=[common],
                        help="parameter count of every row beside the paper's (no data)")
    sp.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    sp = sub.add_parser("compare", help="re-print the comparison from run directories and "
                                        "write REPORT.md with plots")
    sp.add_argument("dir", metavar="DIR", help="e.g. runs/table1 (or runs/ for all)")
    sp.add_argument("--no-plots", dest="plots", action="store_false",
                    help="skip the PNG learning curves")
    sp = sub.add_parser("status", help="where every run of a grid started with --launcher "
                                       "stands: finished, running, waiting, failed")
    sp.add_argument("dir", metavar="DIR", help="e.g. runs/table1 (or runs/ for all)")
    sp = sub.add_parser("smoke", parents=[common],
                        help="a minute-long end-to-end run on tiny fake data (no download)")
    for name in DELEGATED:
        sp = sub.add_parser(name, add_help=False,
                            help=f"crmn.{name}: run_experiments.sh {name} --help for options")
        sp.add_argument("args", nargs=argparse.REMAINDER)
    sp = sub.add_parser("test", add_help=False, help="run the test suite (extra args: pytest)")
    sp.add_argument("args", nargs=argparse.REMAINDER)
    return parser


# ---------------------------------------------------------------------------------------
# configuration from options


def model_overrides(args) -> Dict:
    """ModelConfig fields set by the command line (SPEC §4 flags and expert overrides)."""
    over = dict(outgate=args.outgate, forget_bias=args.forget_bias, dense_init=args.dense_init)
    if args.n is not None:
        over["n"] = args.n
    if args.k is not None:
        over["k"] = args.k
    return over


def configs_for(row: paper.Row, args, seed: int):
    """(ModelConfig, TrainConfig) of one run of ``row`` with seed ``seed``.

    Raises :class:`ConfigError` (one line) when the options contradict the row, e.g. a
    ``--schedule`` whose length differs from the row's number of learning rates.
    """
    over = model_overrides(args)
    arch = {k: over.pop(k) for k in ("n", "k") if k in over}
    t_over = dict(nesterov=args.nesterov, flip=args.flip, patience=args.patience,
                  max_epochs=args.epochs_cap, schedule=args.schedule, seed=seed,
                  batch_size=args.batch_size or row.batch_size, lr_stages=row.lr_stages)
    try:
        model = ModelConfig(n=arch.get("n", row.n), k=arch.get("k", row.k),
                            classes=row.classes, memory=row.memory, **over)
        train = TrainConfig(**t_over)
    except ValueError as exc:
        raise ConfigError(f"{exc} (row {row.id}, command line)") from None
    return model, train


def select_rows(ids: Optional[str], experiment: Optional[str]) -> tuple:
    """Rows of ``--rows`` (all of ``experiment`` if not given); unknown id -> UsageError."""
    try:
        rows = paper.select(ids, experiment if not ids else None)
    except KeyError as exc:
        raise UsageError(f"run_experiments.sh: {exc.args[0]}") from None
    if experiment is not None:
        foreign = [r.id for r in rows if r.table != experiment]
        if foreign:
            raise UsageError(f"run_experiments.sh {experiment}: row(s) {', '.join(foreign)} "
                             f"belong to another experiment")
    if not rows:
        raise UsageError("run_experiments.sh: --rows selects no row")
    return rows


# ---------------------------------------------------------------------------------------
# commands


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


def _finished(run_dir: Path) -> bool:
    from crmn import runlog

    summary = run_dir / runlog.SUMMARY
    return summary.exists() and runlog.read_json(summary).get("status") == "done"


def _train_rows(experiment: str, rows, args, *, data_dir: Path, out_dir: Path,
                dataset: Optional[str] = None, row_label=None) -> List[Path]:
    """Run crmn.train.run for every row and seed; returns the run directories."""
    plan = plan_runs(rows, args)
    from crmn import train as trainer
    from crmn.backend import make_backend

    print(f"backend {args.backend}, device {args.device} (requested), dtype {args.dtype}; "
          f"runs under {out_dir / experiment}", flush=True)
    run_dirs = []
    for row, k, model, train in plan:
        trainer.check_stop(out_dir / experiment)
        name = row_label(row) if row_label else row.id
        run_dir = out_dir / experiment / name / f"seed{k}"
        backend = None
        if not _finished(run_dir):  # a finished run is skipped by crmn.train: build nothing
            backend = make_backend(args.backend, model, train, args.device, args.dtype,
                                   compile=args.compile)
        # crmn.train prints and stores what actually runs (e.g. "cuda:0 (NVIDIA H100)")
        print(f"== {name} seed {k} -> {run_dir}", flush=True)
        trainer.run(run_dir, model=model, train=train, dataset=dataset or row.dataset,
                    data_dir=data_dir, backend=args.backend, device=args.device,
                    dtype=args.dtype, row=None if row_label else row.id,
                    experiment=experiment, resume=args.resume, progress=args.progress,
                    backend_obj=backend)
        run_dirs.append(run_dir)
    return run_dirs


def cmd_train(args) -> int:
    rows = select_rows(args.rows, args.command)
    from crmn import report

    if args.n is not None or args.k is not None or args.batch_size is not None:
        print("note: --n/--k/--batch-size override the paper's rows; this is not the "
              "published configuration", flush=True)
    out_dir = args.out_dir
    _train_rows(args.command, rows, args, data_dir=args.data_dir, out_dir=out_dir)
    report.compare(out_dir / args.command, plots=True)
    return 0


def param_rows(backend: str, device: str = "cpu", dtype: Optional[str] = None,
               overrides: Optional[Dict] = None, rows: Sequence[paper.Row] = paper.ROWS
               ) -> List[Dict]:
    """Trainable-parameter counts of paper rows, each network built in ``backend``.

    Returns one dict per row of ``rows`` (default :data:`crmn.paper.ROWS`): ``row``, ``label``, ``table``,
    ``params`` (the stack's own count), ``canonical_params`` (:func:`crmn.naming.
    count_trainable`, the framework-free count the checkpoint layout implies), ``params_m``
    and ``paper_params_m`` (None where the paper gives none).
    """
    from crmn.backend import make_backend
    from crmn.naming import count_trainable

    dtype = dtype or _dtype_default()
    out = []
    for row in rows:
        model = ModelConfig.for_row(row, **(overrides or {}))
        train = TrainConfig.for_row(row)
        net = make_backend(backend, model, train, device, dtype)
        params = int(net.param_count())
        del net
        out.append(dict(row=row.id, label=row.label, table=row.table, params=params,
                        canonical_params=count_trainable(model),
                        params_m=round(params / 1e6, 2), paper_params_m=row.paper_params_m))
    return out


def cmd_params(args) -> int:
    over = model_overrides(args)
    if "n" in over or "k" in over:
        raise UsageError("run_experiments.sh params: --n/--k make no sense here (every row "
                         "is counted with its own architecture)")
    rows = param_rows(args.backend, args.device, args.dtype, over,
                      rows=select_rows(args.rows, None))
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
    from crmn import report

    report.compare(Path(args.dir), plots=args.plots)
    from crmn.launch import status

    return status.check_complete(Path(args.dir))  # a launched grid: every run finished?


def cmd_smoke(args) -> int:
    """Tiny fake data, tiny CRMN, short plateau schedule, through the real pipeline."""
    from crmn import data, report

    if args.rows is not None or args.data_dir != ROOT / "data":
        raise UsageError("run_experiments.sh smoke: --rows and --data-dir do not apply (the "
                         "smoke run trains its own tiny row on fake data it writes under "
                         "OUT-DIR/smoke/data)")
    root = args.out_dir / "smoke"
    data_dir = root / "data"  # not a run directory: crmn.report skips it
    t0 = time.time()
    data.write_fake("cifar100", data_dir, SMOKE_DATA["n_train"], SMOKE_DATA["n_test"], seed=0)
    print(f"smoke: fake CIFAR-100-format data ({SMOKE_DATA['n_train']} train, "
          f"{SMOKE_DATA['n_test']} test images) in {data_dir}", flush=True)
    row = paper.row("t1-crmn32x1")
    # The smoke run's own tiny configuration; explicit flags still win.
    args.n = args.n or SMOKE_MODEL["n"]
    args.k = args.k or SMOKE_MODEL["k"]
    args.batch_size = args.batch_size or SMOKE_TRAIN["batch_size"]
    if args.patience == _default(TrainConfig, "patience"):
        args.patience = SMOKE_TRAIN["patience"]
    args.epochs_cap = args.epochs_cap or SMOKE_TRAIN["max_epochs"]
    args.seeds = args.seeds or 1
    name = f"tiny-crmn-n{args.n}-k{args.k:g}"
    if not args.resume:  # the smoke run is disposable: start it afresh every time
        shutil.rmtree(root / name, ignore_errors=True)
    run_dirs = _train_rows("smoke", [row], args, data_dir=data_dir, out_dir=args.out_dir,
                           dataset="cifar100",
                           row_label=lambda r: name)
    report_md = report.compare(root, plots=True)
    print(f"smoke: done in {time.time() - t0:.0f} s", flush=True)
    print(f"smoke: data       {data_dir}")
    for d in run_dirs:
        print(f"smoke: run        {d} (config.json, log.jsonl, checkpoint.h5, best.h5, "
              f"summary.json)")
    print(f"smoke: report     {report_md}")
    return 0


def cmd_delegate(name: str, argv: Sequence[str]) -> int:
    import importlib

    mod = importlib.import_module(f"crmn.{name}")
    rc = mod.main(list(argv))
    return int(rc or 0)


def cmd_test(argv: Sequence[str]) -> int:
    return subprocess.call(["bash", str(ROOT / "tests" / "run.sh"), *argv])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 CRMNError, 2 usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # verify, bench and test own their argument parsing: hand everything after the name on.
    if argv and argv[0] in DELEGATED + ("test",):
        try:
            if argv[0] == "test":
                return cmd_test(argv[1:])
            return cmd_delegate(argv[0], argv[1:])
        except CRMNError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command in TRAIN_COMMANDS and launch.wanted(args):
            return launch.main(args)
        if args.command == "status":
            from crmn.launch import status

            return status.show(Path(args.dir))
        if args.command in TRAIN_COMMANDS + ("smoke",):
            from crmn import train as trainer

            # a scheduler's warning (sbatch --signal=B:USR1@T): checkpoint, stop, exit 3
            signal.signal(signal.SIGUSR1, trainer.request_stop)
        if args.command in TRAIN_COMMANDS:
            return cmd_train(args)
        if args.command == "params":
            return cmd_params(args)
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "smoke":
            return cmd_smoke(args)
        raise UsageError(f"run_experiments.sh: unknown command {args.command!r}")
    except UsageError as exc:
        print(str(exc).splitlines()[0], file=sys.stderr)
        return 2
    except StopRequested as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    except CRMNError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
