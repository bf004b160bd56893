"""The archive's one argument parser: every command's options, their spelling and defaults.

Every default shown by ``--help`` is read from :class:`crmn.config.ModelConfig`,
:class:`crmn.config.TrainConfig`, :mod:`crmn.registry` or :data:`SMOKE` (smoke's own), so the
help cannot disagree with what runs. The types here check each value on its own (a number
>= 1, a finite float, a device string); :mod:`crmn.cli.plans` checks the values together and
turns them into a plan. Nothing here reads a file or builds a network.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from crmn import paper, registry
from crmn.config import ModelConfig, TrainConfig
from crmn.errors import ConfigError, UsageError
from crmn.plan import LAUNCHERS, MAX_REQUEUES

ROOT = Path(__file__).resolve().parents[2]
TRAIN_COMMANDS = tuple(paper.EXPERIMENTS)  # table1, table2, table3, svhn

#: smoke's own defaults (a tiny CRMN on tiny fake CIFAR-100-format data, a short schedule);
#: its ``--help`` shows these, and a value given on the command line is never replaced
SMOKE = dict(n=1, k=0.5, batch_size=50, patience=1, epochs_cap=2, n_train=500, n_test=200,
             row="t1-crmn32x1")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line instead of usage + message."""

    def error(self, message):  # noqa: D401 - argparse hook
        raise UsageError(f"{self.prog}: {message}")


def default(cls, name: str):
    """The declared default of a dataclass field (never retyped in help strings)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise AttributeError(f"{cls.__name__} has no field {name!r}")


# ---------------------------------------------------------------------------------------
# value types: each refuses a bad value in one line (argparse adds the option's name)


def _schedule(text: str):
    try:
        epochs = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants epochs per stage like 80,40,40, "
                                         f"got {text!r}") from None
    if any(e < 0 for e in epochs):
        raise argparse.ArgumentTypeError(f"epochs must be >= 0, got {text!r}")
    return epochs


def positive(text: str) -> int:
    """A whole number >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {v}")
    return v


def _finite(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _above_zero(text: str) -> float:
    v = _finite(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def _width(text: str) -> float:
    """A width factor k whose stages have whole channel counts (16k is a whole number)."""
    v = _above_zero(text)
    if abs(16 * v - round(16 * v)) > 1e-9:
        raise argparse.ArgumentTypeError(f"16k must be a whole number of channels (k = 0.5, "
                                         f"1, 4, 10, ...), got {text!r}")
    return v


def _device(text: str) -> str:
    try:
        return registry.check_device(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ---------------------------------------------------------------------------------------
# option groups shared by the commands


def _stack_options(p: argparse.ArgumentParser, backend: bool = True) -> None:
    """Which stack, where, in which precision: one spelling and default for every command
    (the fields of :class:`crmn.registry.StackOptions`)."""
    g = p.add_argument_group("stack")
    if backend:
        g.add_argument("--backend", choices=registry.BACKENDS,
                       default=registry.DEFAULT_BACKEND,
                       help="stack that builds the network (default: %(default)s)")
    g.add_argument("--device", type=_device, default="cpu", metavar="DEV",
                   help=f"{registry.DEVICE_HELP} (default: %(default)s)")
    if backend:
        g.add_argument("--dtype", choices=registry.DTYPES, default=registry.DEFAULT_DTYPE,
                       help="floating-point type of the network; bfloat16 (autocast, float32 "
                            "weights, channels-last) is torch only (default: %(default)s)")
        g.add_argument("--compile", action="store_true", default=False,
                       help="torch only: torch.compile behind the captured CUDA graph "
                            "(default: %(default)s)")
        g.add_argument("--theano-mode", choices=registry.THEANO_MODES, default=None,
                       help="theano only: compile the graph with Theano's C backend (the "
                            "reference) or through JAX, which also runs it on a current GPU "
                            f"(--device cuda; default: {registry.DEFAULT_THEANO_MODE} where "
                            "Theano's C backend works, else jax)")
        g.add_argument("--no-compile-cache", dest="compile_cache", action="store_false",
                       default=True,
                       help="theano only: compile every graph afresh instead of reusing the "
                            "steps an earlier run stored in $CRMN_CACHE (default "
                            "~/.cache/crmn; see REPRODUCING.md)")


def _rows_option(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument("--rows", metavar="ID[,ID]", default=None,
                   help=f"comma-separated row ids of crmn/paper.py (default: {default_help})")


def _batch_option(p, default_help: str = "the row's", value=None) -> None:
    p.add_argument("--batch-size", type=positive, metavar="B", default=value,
                   help=f"images per batch (default: {default_help})")


def _run_options(p: argparse.ArgumentParser, smoke: bool = False) -> None:
    """Options of the commands that train (SPEC §1); smoke writes its own data, one run."""
    g = p.add_argument_group("runs (SPEC §1)")
    if not smoke:
        g.add_argument("--seeds", type=positive, metavar="N", default=None,
                       help="repetitions per row, seeds 0..N-1 (default: the row's `seeds` "
                            "in crmn/paper.py: 5 for t2-crmn32x4, else 1)")
    g.add_argument("--seed", type=int, metavar="K", default=None,
                   help="train only seed K (one run of a grid, e.g. one task of a job "
                        "array; default: " + ("0)" if smoke else "seeds 0..N-1 of --seeds)"))
    cap = SMOKE["epochs_cap"] if smoke else default(TrainConfig, "epochs_cap")
    g.add_argument("--epochs-cap", type=positive, metavar="N", default=cap,
                   help="at most N epochs per learning-rate stage (default: %(default)s" +
                        (")" if smoke else " = no cap)"))
    if not smoke:
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
    if not smoke:
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
                   default=default(ModelConfig, "outgate"),
                   help="LSTM output-gate nonlinearity (default: %(default)s, eq. 4)")
    i.add_argument("--forget-bias", type=_finite, metavar="B",
                   default=default(ModelConfig, "forget_bias"),
                   help="initial forget-gate bias (default: %(default)s)")
    i.add_argument("--dense-init", choices=("he", "glorot"),
                   default=default(ModelConfig, "dense_init"),
                   help="softmax-layer weight init (default: %(default)s)")


def _protocol_options(p: argparse.ArgumentParser, smoke: bool = False) -> None:
    """The protocol's interpretations (SPEC §4-5) and the expert overrides."""
    i = p.add_argument_group("the protocol's interpretations (SPEC §4-5)")
    i.add_argument("--nesterov", action="store_true",
                   default=default(TrainConfig, "nesterov"),
                   help="Nesterov momentum instead of classical (default: %(default)s)")
    i.add_argument("--flip", action="store_true", default=default(TrainConfig, "flip"),
                   help="random horizontal flips in augmentation (default: %(default)s)")
    i.add_argument("--patience", type=positive, metavar="EPOCHS",
                   default=SMOKE["patience"] if smoke else default(TrainConfig, "patience"),
                   help="plateau patience beta in epochs (default: %(default)s)")
    i.add_argument("--lr", type=_above_zero, metavar="LR", default=None,
                   help="learning rate of the first stage; the later stages keep the row's "
                        "ratios (default: the row's, 0.1)")
    i.add_argument("--schedule", type=_schedule, metavar="E1,E2,...",
                   default=default(TrainConfig, "schedule"),
                   help="fixed epochs per lr stage, skips the search run (default: "
                        "%(default)s = search)")
    if smoke:
        e = p.add_argument_group("smoke's tiny network")
        e.add_argument("--n", type=positive, default=SMOKE["n"],
                       help="blocks per stage (default: %(default)s)")
        e.add_argument("--k", type=_width, default=SMOKE["k"],
                       help="width factor (default: %(default)s)")
        _batch_option(e, str(SMOKE["batch_size"]), SMOKE["batch_size"])
        return
    e = p.add_argument_group("expert options (tests, quick looks: the run is then not the "
                             "paper's row)")
    e.add_argument("--n", type=positive, default=None,
                   help="override the row's blocks per stage (default: the row's)")
    e.add_argument("--k", type=_width, default=None,
                   help="override the row's width factor (default: the row's)")
    _batch_option(e, "the row's; overrides it")


def _launch_options(p: argparse.ArgumentParser) -> None:
    """The launchers' options (the fields of :class:`crmn.plan.LaunchOptions`)."""
    g = p.add_argument_group("launchers: the grid of rows x seeds on several GPUs or a "
                             "Slurm cluster (REPRODUCING.md, On a cluster)")
    g.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local: on this machine; slurm: one job array of single runs plus a "
                        "compare job (default: %(default)s)")
    g.add_argument("--jobs", type=positive, metavar="N", default=None,
                   help="local: N single runs at once as subprocesses, each on its own GPU "
                        "with --device cuda (default: one per visible GPU with --device "
                        "cuda, else 1 = every run in this process, one after another)")
    g.add_argument("--max-parallel", type=positive, metavar="K", default=None,
                   help="slurm: at most K array tasks at once (--array=...%%K; default: "
                        "no limit)")
    g.add_argument("--slurm-args", metavar='"ARGS"', default=None,
                   help='slurm: extra sbatch options for both jobs, e.g. "--gres=gpu:1 '
                        '--time=8:00:00"; a single option as --slurm-args=--exclusive '
                        '(SBATCH_* environment variables work too)')
    g.add_argument("--max-requeues", type=int, metavar="N", default=None,
                   help=f"slurm: a task requeues itself after a checkpointed stop at most N "
                        f"times (default: {MAX_REQUEUES})")
    g.add_argument("--wait", action="store_true", default=False,
                   help="slurm: wait until the compare job ends and exit with its code "
                        "(default: return once submitted)")


def _train_parent() -> argparse.ArgumentParser:
    """Options of the training commands."""
    p = argparse.ArgumentParser(add_help=False)
    _stack_options(p)
    _rows_option(p, "every row of the experiment")
    _run_options(p)
    _model_options(p)
    _protocol_options(p)
    _launch_options(p)
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
    sp.add_argument("--tol", type=_above_zero, default=None,
                    help="relative tolerance of the float64 checks (default: 1e-6)")
    sp.add_argument("--lr", type=_above_zero, default=0.1,
                    help="learning rate of the compared step (default: %(default)s)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the weights and batches "
                                                       "(default: %(default)s)")
    sp = sub.add_parser("bench", help="seconds per epoch of paper rows beside the paper's")
    _stack_options(sp)
    _rows_option(sp, "every Table 1 row")
    _batch_option(sp)
    sp.add_argument("--steps", type=positive, default=50,
                    help="timed SGD steps per row (default: %(default)s)")
    sp.add_argument("--warmup", type=positive, default=3,
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
    sp.add_argument("--steps", type=positive, default=100,
                    help="timed steps per variant (default: %(default)s)")
    sp.add_argument("--kernels", action="store_true",
                    help="also list the costliest kernels of one eager step")
    sp.add_argument("--count-ops", action="store_true",
                    help="count one eager step's operators instead of timing (CPU works)")


def _add_gpucheck(sub) -> None:
    """gpucheck: the one command of a lent GPU (crmn/gpucheck.py)."""
    sp = sub.add_parser("gpucheck", help="one command that proves a GPU: environment, "
                                         "verify on the device, s/epoch, a short training")
    sp.add_argument("--device", type=_device, default="cuda", metavar="DEV",
                    help="the device checked: cuda, cuda:N, or cpu (default: %(default)s)")
    sp.add_argument("--quick", action="store_true",
                    help="tiny networks and few steps: a check of the command itself")
    sp.add_argument("--out", type=Path, default=ROOT / "runs" / "gpucheck", metavar="DIR",
                    help="gpucheck.json, gpucheck.md and the training runs go here "
                         "(default: runs/gpucheck of the archive)")
    sp.add_argument("--budget", type=_finite, default=None, metavar="SECONDS",
                    help="seconds the checks may take; a check whose expected cost does "
                         "not fit what is left is listed 'not run: budget' (default: 540, "
                         "one 10-minute call)")
    sp.add_argument("--only", default=None, metavar="PART[,PART]",
                    help="run only these parts: verify, smoke, speed (environment always "
                         "runs; default: all)")


def _add_use(sub) -> None:
    """export and evaluate: a run's weights for others, and any weights on a test set."""
    sp = sub.add_parser("export", help="a finished run as <row>-<sha8>.pt (torch), .npz "
                                       "(Lasagne) and a model card MODEL.md")
    sp.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                    help="a finished run folder, runs/<experiment>/<row>/seed<k>")
    sp.add_argument("--out", type=Path, default=None, metavar="DIR",
                    help="where the files go (default: RUN_DIR/export)")
    sp = sub.add_parser("evaluate", help="test accuracy and loss of a .pt, .npz or "
                                         "checkpoint .h5 on a dataset's test split")
    sp.add_argument("weights", type=Path, metavar="WEIGHTS")
    sp.add_argument("--dataset", choices=tuple(paper.DATASET_CLASSES), default=None,
                    help="the test split measured (default: the weights' own)")
    sp.add_argument("--backend", choices=registry.BACKENDS, default=registry.DEFAULT_BACKEND,
                    help="stack that builds the network (default: %(default)s)")
    sp.add_argument("--device", type=_device, default="cpu", metavar="DEV",
                    help=f"{registry.DEVICE_HELP} (default: %(default)s)")
    sp.add_argument("--data-dir", type=Path, default=ROOT / "data", metavar="DIR",
                    help="datasets are read from / downloaded into DIR (default: data/ of "
                         "the archive)")


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
        sub.add_parser(name, parents=[common],
                       help=f"train the {n_rows} {name} row(s) and compare with the paper")
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
    _run_options(sp, smoke=True)
    _model_options(sp)
    _protocol_options(sp, smoke=True)
    _add_tools(sub)
    _add_gpucheck(sub)
    _add_use(sub)
    sp = sub.add_parser("test", add_help=False, help="run the test suite (extra args: pytest)")
    sp.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def parse(argv) -> argparse.Namespace:
    """The parsed command line; a :class:`UsageError` (one line) for a bad one."""
    return build_parser().parse_args(argv)

