"""The archive's one argument parser; the training options come from :mod:`crmn.schema`. A
command is one ``sub.add_parser`` here and one handler in :data:`crmn.cli.commands.COMMANDS`."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Optional

from crmn import paper, registry, schema
from crmn.config import ModelConfig, TrainConfig
from crmn.errors import UsageError
from crmn.plan import ROOT, SECTIONS, SMOKE, LaunchOptions
from crmn.registry import BackendOptions
from crmn.schema import above_zero, finite, option, positive


@dataclasses.dataclass(frozen=True)
class CommandOptions:
    """Options several commands share that are no field of a run (each its own default, words)."""
    rows: Optional[str] = option(None, flag="--rows", metavar="ID[,ID]",
                                 help="comma-separated row ids of crmn/paper.py")
    seed: Optional[int] = option(None, flag="--seed", type=int, metavar="K",
                                 help="seed of the weights and the batches")
    out_dir: Optional[Path] = option(None, flag="--out-dir", type=Path, metavar="DIR",
                                     help="the folder the command writes into")
    json: Optional[str] = option(None, flag="--json", metavar="PATH",
                                 help="write the results as JSON to PATH ('-': print them "
                                 "instead of the table)")
    steps: int = option(50, flag="--steps", type=positive, metavar="N",
                        help="timed SGD steps")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line instead of usage + message."""
    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


#: a tool's options: one list, no groups
TOP = dict(runs=None, backend=None, expert=None, protocol=None)


def _common(p, only, **kw) -> None:
    schema.add_options(p, CommandOptions, only=only, **{"groups": TOP, **kw})


def _backend_options(p: argparse.ArgumentParser, only=None, device: str = "cpu", **kw):
    schema.add_options(p, BackendOptions, only=only,
                       defaults=dict(device=device, theano_mode=None), **kw)


def _batch_option(p, default_help: str = "the row's") -> None:
    schema.add_options(p, TrainConfig, only=("batch_size",), defaults=dict(batch_size=None),
                       helps=dict(batch_size=default_help), groups=TOP)


def _grid_options(p: argparse.ArgumentParser, smoke: bool = False) -> None:
    """Which runs of a grid, where, and how (the plan's options, not a run's)."""
    g = schema.group(p, "runs")
    if not smoke:
        g.add_argument("--seeds", type=positive, metavar="N", default=None,
                       help="repetitions per row, seeds 0..N-1 (default: the row's `seeds` "
                            "in crmn/paper.py: 5 for t2-crmn32x4, else 1)")
    _common(p, ("seed", "out_dir"), groups={}, defaults=dict(out_dir=ROOT / "runs"),
            helps=dict(seed="0" if smoke else "seeds 0..N-1 of --seeds",
                       out_dir="runs/ of the archive"),
            texts=dict(seed="train only seed K (one run of a grid, e.g. one task of a job "
                            "array)", out_dir="run directories go under DIR/<experiment>/"))
    g.add_argument("--resume", action="store_true",
                   help="continue runs from their checkpoint.h5 (default: start afresh)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar or download bar, per-epoch lines only")
    g.add_argument("--dry-run", action="store_true",
                   help="print every run's command line, the device and the estimated time, "
                        "then exit without creating anything")


def _train_options(p: argparse.ArgumentParser, smoke: bool = False) -> None:
    """The run schema's options (smoke: its own defaults, no data or launcher options)."""
    _backend_options(p, device=registry.AUTO)
    if not smoke:
        _common(p, ("rows",), groups={}, helps=dict(rows="every row of the experiment"))
    _grid_options(p, smoke)
    if smoke:
        small = {k: SMOKE[k] for k in ("n", "k", "batch_size", "patience", "epochs_cap")}
        groups = dict(expert="smoke's tiny network")
        schema.add_options(p, SECTIONS["model"], defaults=small, groups=groups)
        schema.add_options(p, SECTIONS["train"], defaults=dict(small, lr_stages=None),
                           helps=dict(epochs_cap="%(default)s"), groups=groups)
        return
    row = dict(n=None, k=None, batch_size=None, lr_stages=None, dataset=None)
    shown = dict(n="the row's", k="the row's", batch_size="the row's; overrides it")
    schema.add_options(p, SECTIONS[""], defaults=dict(row, data_dir=ROOT / "data"))
    schema.add_options(p, SECTIONS["model"], defaults=row, helps=shown)
    schema.add_options(p, SECTIONS["train"], defaults=row, helps=shown)
    schema.add_options(p, LaunchOptions)


def _add_tools(sub) -> None:
    sp = sub.add_parser("verify", help="the two backends agree (float64), or the GPU agrees "
                                       "with the CPU (--device cuda)")
    _common(sp, ("rows",), helps=dict(rows="three small configurations"))
    _backend_options(sp, ("device",), groups=TOP, texts=dict(
        device="cpu: compare the backends in float64; cuda, cuda:N or auto (cuda where torch "
        "sees a GPU): the torch backend on the GPU against the CPU"))
    _batch_option(sp, "8, for --rows and the small configurations alike")
    sp.add_argument("--tol", type=above_zero, default=None,
                    help="relative tolerance of the float64 checks (default: 1e-6)")
    schema.add_options(sp, TrainConfig, only=("lr_stages",), defaults=dict(lr_stages=0.1),
                       helps=dict(lr_stages="%(default)s"), groups=TOP,
                       texts=dict(lr_stages="learning rate of the compared step"))
    _common(sp, ("seed",), defaults=dict(seed=0), helps=dict(seed="%(default)s"))
    sp = sub.add_parser("bench", help="seconds per epoch of paper rows beside the paper's")
    _backend_options(sp, groups=TOP)
    _common(sp, ("rows",), helps=dict(rows="every Table 1 row"))
    _batch_option(sp)
    _common(sp, ("steps", "json"), helps=dict(steps="%(default)s", json="none"),
            texts=dict(steps="timed SGD steps per row"))
    sp.add_argument("--warmup", type=positive, default=3, metavar="N",
                    help="steps of the warm-up epoch, timed apart (default: %(default)s)")
    layout = sp.add_mutually_exclusive_group()
    layout.add_argument("--channels-last", dest="channels_last", action="store_const",
                        const=True, default=None, help="torch only: NHWC activations and "
                        "filters (default: with bfloat16 only)")
    layout.add_argument("--channels-first", dest="channels_last", action="store_const",
                        const=False, help="torch only: NCHW even with bfloat16")
    sp.add_argument("--sampler", action="store_true",
                    help="time the batch sampler (crops, flips; numpy) instead of a backend")
    sp = sub.add_parser("profile", help="developer tool: the torch step under several "
                                        "settings, timed on a GPU or its operators counted")
    _backend_options(sp, ("device",), device=registry.AUTO, groups=TOP, texts=dict(
        device="cuda or cuda:N: time the step there (a GPU is needed: CUDA graphs); cpu: "
        "with --count-ops only; auto: cuda where torch sees a GPU, else cpu"))
    _common(sp, ("rows",), helps=dict(rows="t1-resnet32x1"))
    _batch_option(sp, "the row's; with --count-ops only")
    sp.add_argument("--variants", default="fp32,bf16",
                    help="comma-separated variants, e.g. fp32,bf16-cl,bf16-percast "
                         "(default: %(default)s; see crmn/tools/profile.py)")
    _common(sp, ("steps",), defaults=dict(steps=100), helps=dict(steps="%(default)s"),
            texts=dict(steps="timed steps per variant"))
    sp.add_argument("--kernels", action="store_true",
                    help="also list the costliest kernels of one eager step")
    sp.add_argument("--count-ops", action="store_true",
                    help="count one eager step's operators instead of timing (CPU works)")


def _add_gpucheck(sub) -> None:
    sp = sub.add_parser("gpucheck", help="one command that proves a GPU: environment, "
                                         "verify on the device, s/epoch, a short training")
    _backend_options(sp, ("device",), device="cuda", groups=TOP, texts=dict(
        device="the device checked: cuda or cuda:N (a GPU must be there), cpu (a check of "
        "the command itself), or auto: cuda where torch or jax sees a GPU, else cpu"))
    sp.add_argument("--quick", action="store_true",
                    help="tiny networks and few steps: a check of the command itself")
    _common(sp, ("out_dir",), defaults=dict(out_dir=ROOT / "runs" / "gpucheck"),
            helps=dict(out_dir="runs/gpucheck of the archive"),
            texts=dict(out_dir="gpucheck.json, gpucheck.md and the training runs go here"))
    sp.add_argument("--budget", type=finite, default=540.0, metavar="SECONDS",
                    help="seconds the checks may take; a check whose expected cost does "
                         "not fit what is left is listed 'not run: budget' (default: "
                         "%(default)g, one 10-minute call)")
    sp.add_argument("--only", type=lambda text: tuple(p.strip() for p in text.split(",")),
                    default=("verify", "smoke", "packing", "speed"), metavar="PART[,PART]",
                    help="run only these parts: verify, smoke, packing, speed (environment "
                         "always runs; default: all)")
    sp.add_argument("--real", type=Path, default=None, metavar="DATA",
                    help="first train ResNet-32 and CRMN-32 on this CIFAR-10 (a folder or "
                         "tarball of images, or the official files) in He et al.'s setting "
                         "and report their test accuracy (default: no real-data check)")


def _add_use(sub) -> None:
    for name, words, out_default, out_text in (
            ("export", "a finished run as <row>-<sha8>.pt (torch), .npz (Lasagne) and a model "
             "card MODEL.md", "RUN_DIR/export", "where the files go"),
            ("replay", "train a finished run again from its config.json alone and say whether "
             "the results are the same", "replay-seed<k> beside RUN_DIR",
             "where the new run trains (never inside RUN_DIR)")):
        sp = sub.add_parser(name, help=words)
        sp.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="a finished run folder, runs/<experiment>/<row>/seed<k>")
        _common(sp, ("out_dir",), helps=dict(out_dir=out_default), texts=dict(out_dir=out_text))
    sp = sub.add_parser("evaluate", help="test accuracy and loss of a .pt, .npz or "
                                         "checkpoint .h5 on a dataset's test split")
    sp.add_argument("weights", type=Path, metavar="WEIGHTS")
    _backend_options(sp, ("backend", "device", "dtype", "theano_mode"), groups=TOP,
                   helps=dict(dtype="the weights' own where the backend has it, else "
                                    f"{registry.DEFAULT_DTYPE}"))
    sp.set_defaults(dtype=None)
    schema.add_options(sp, SECTIONS[""], only=("dataset", "data_dir", "subset",
                                               "unverified_data"),
                       defaults=dict(dataset=None, data_dir=ROOT / "data"), groups=TOP,
                       helps=dict(dataset="the weights' own"), texts=dict(
                           dataset="the test split measured",
                           subset="the test images of a run trained with --subset N (its "
                           "share of the test set, normalised as it was)",
                           unverified_data="accept a dataset folder that differs from the "
                           "official files (checksums, image counts)"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="run_experiments.sh",
                     description="Reproduce Moniz & Pal (2016), Convolutional Residual "
                                 "Memory Networks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    common = argparse.ArgumentParser(add_help=False)
    _train_options(common)
    for name, rows in paper.EXPERIMENTS.items():  # table1, table2, table3, svhn
        sub.add_parser(name, parents=[common],
                       help=f"train the {len(rows)} {name} row(s) and compare with the paper")
    sp = sub.add_parser("params", help="parameter count of every row beside the paper's "
                                       "(no data)")
    _backend_options(sp, ("backend",), groups=TOP)
    _common(sp, ("rows",), helps=dict(rows="every row"))
    schema.add_options(sp, ModelConfig, skip=("n", "k"))
    _common(sp, ("json",), helps=dict(json="none"))
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
    _train_options(sp, smoke=True)
    _add_tools(sub)
    _add_gpucheck(sub)
    _add_use(sub)
    sp = sub.add_parser("lasagne", help="run a Lasagne 0.1 script unmodified, in C mode or "
                                        "through JAX (REPRODUCING.md, 'Your own Lasagne code')")
    _backend_options(sp, ("device", "dtype", "theano_mode"), device=registry.AUTO,
                     helps=dict(dtype="%(default)s; Theano's floatX"))
    _common(sp, ("seed", "steps"), groups={}, defaults=dict(steps=None),
            helps=dict(seed="unseeded", steps="no limit"),
            texts=dict(seed="seed numpy's global generator first",
                       steps="stop after N calls of a training function (one with updates), "
                             "as Ctrl-C would"))
    sp.add_argument("--record", type=Path, default=None, metavar="PATH",
                    help="write each training call's outputs as JSON to PATH")
    sp.add_argument("script", metavar="SCRIPT", help="the script, run as `python SCRIPT ARGS` "
                    "would run it")
    sp.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS",
                    help="the script's own arguments")
    sp = sub.add_parser("test", add_help=False, help="run the test suite (extra args: pytest)")
    sp.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def parse(argv) -> argparse.Namespace:
    return build_parser().parse_args(argv)

