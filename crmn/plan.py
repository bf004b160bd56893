"""The plan: what a command will run, typed and checked once, before anything is created.

The command line (:mod:`crmn.cli`) turns its options into these objects and hands them on;
the training loop (:mod:`crmn.train`), the launchers (:mod:`crmn.launch`), bench, verify and
profile take them and never see the parser. Every value is checked where its object is made
(``__post_init__``): a :class:`RunSpec` that exists can run.

* :class:`crmn.registry.StackOptions` -- which stack, where, in which precision;
* :class:`RunSpec` -- one run: network, protocol, data, stack (recorded in ``config.json``);
* :class:`Run` -- a run spec with its place: label, seed, run directory;
* :class:`LaunchOptions` -- how a grid of runs is executed (``--launcher``, ``--jobs``, ...);
* :class:`TrainPlan` -- a training command: its runs and how to execute them.

A run goes back to a command line with :meth:`TrainPlan.single_run_argv`: the launchers'
manifests hold those lines (``tests/test_plan.py`` parses each back into the same run).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from crmn import paper
from crmn.config import ModelConfig, TrainConfig
from crmn.errors import ConfigError, UsageError
from crmn.registry import StackOptions

#: ``--launcher`` choices
LAUNCHERS = ("local", "slurm")
#: default cap on a task's requeues after checkpointed stops (SLURM_RESTART_COUNT)
MAX_REQUEUES = 20


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything that defines one run; recorded in ``config.json`` (crmn/LOGS.md)."""

    model: ModelConfig  # the network (SPEC §4)
    train: TrainConfig  # the protocol (SPEC §5); train.seed seeds split, weights, batches
    dataset: str  # "cifar100" | "cifar10" | "svhn" (crmn.data)
    data_dir: Path  # where crmn.data reads / downloads the dataset
    stack: StackOptions = StackOptions()  # backend, device, dtype, theano_mode, compile, ...
    unverified_data: bool = False  # accept a dataset folder that fails the official checks
    subset: Optional[int] = None  # --subset N: a quick look on N training images
    row: Optional[str] = None  # crmn.paper row id, None for a run that is no paper row
    experiment: Optional[str] = None  # table1 | table2 | table3 | svhn | smoke

    def __post_init__(self):
        if self.dataset not in paper.DATASET_CLASSES:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of "
                              f"{', '.join(paper.DATASET_CLASSES)}")
        if self.model.classes != paper.DATASET_CLASSES[self.dataset]:
            raise ConfigError(f"a {self.model.classes}-class network cannot train on "
                              f"{self.dataset} ({paper.DATASET_CLASSES[self.dataset]} classes)")


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a plan: ``<out-dir>/<experiment>/<label>/seed<k>/`` (crmn/LOGS.md)."""

    spec: RunSpec
    label: str  # the row id, or the smoke run's name
    run_dir: Path

    @property
    def seed(self) -> int:
        return self.spec.train.seed


@dataclasses.dataclass(frozen=True)
class LaunchOptions:
    """How a grid of runs is executed (issue #13): in this process, as local subprocesses,
    or as a Slurm job array."""

    launcher: str = "local"  # "local" | "slurm"
    jobs: Optional[int] = None  # local: runs at once; None: one per visible GPU with cuda
    max_parallel: Optional[int] = None  # slurm: --array=...%K
    slurm_args: Optional[str] = None  # slurm: extra sbatch options
    wait: bool = False  # slurm: wait for the compare job
    max_requeues: Optional[int] = None  # slurm: requeues after checkpointed stops

    def __post_init__(self):
        if self.launcher not in LAUNCHERS:
            raise UsageError(f"run_experiments.sh: unknown --launcher {self.launcher!r}; "
                             f"choose {' or '.join(LAUNCHERS)}")
        if self.launcher == "slurm":
            if self.jobs is not None:
                raise UsageError("run_experiments.sh: --jobs is for --launcher local; with "
                                 "--launcher slurm use --max-parallel K")
            if self.max_requeues is not None and self.max_requeues < 0:
                raise UsageError("run_experiments.sh: --max-requeues wants N >= 0")
            return
        given = [flag for flag, value in (("--max-parallel", self.max_parallel),
                                          ("--slurm-args", self.slurm_args),
                                          ("--wait", self.wait),
                                          ("--max-requeues", self.max_requeues))
                 if value not in (None, False)]
        if given:
            raise UsageError(f"run_experiments.sh: {', '.join(given)} only apply to "
                             f"--launcher slurm")

    @property
    def requeues(self) -> int:
        return MAX_REQUEUES if self.max_requeues is None else self.max_requeues


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """A training command (table1-3, svhn, smoke): its runs and how to execute them."""

    command: str  # the experiment: table1 | table2 | table3 | svhn | smoke
    runs: Tuple[Run, ...]
    out_dir: Path  # run directories go under out_dir/command/
    resume: bool = False  # continue every run from its checkpoint
    progress: bool = True  # progress bar and download bar
    launch: LaunchOptions = LaunchOptions()
    one_seed: bool = False  # --seed K: one run of a grid (its launcher compares)
    fresh: bool = False  # clear each run directory (under its lock) before training

    def __post_init__(self):
        if not self.runs:
            raise UsageError(f"run_experiments.sh {self.command}: no run selected")

    @property
    def exp_dir(self) -> Path:
        return self.out_dir / self.command

    @property
    def stack(self) -> StackOptions:
        return self.runs[0].spec.stack

    def single_run_argv(self, run: Run, program: Sequence[str]) -> List[str]:
        """The command line that trains ``run`` alone (a launcher's manifest line), e.g.
        ``bash run_experiments.sh table1 --rows t1-crmn32x1 --seed 0 --resume --no-progress
        --data-dir /data --out-dir /runs --backend torch``.

        ``--resume`` (a restarted line continues from its checkpoint; a finished run is a
        no-op), ``--no-progress`` (the output goes to a log file), absolute ``--data-dir``
        and ``--out-dir``, and every setting in which the run differs from its row.
        """
        spec = run.spec
        if spec.row is None:
            raise ConfigError(f"{run.label}: only paper rows run from a manifest line")
        row = paper.row(spec.row)
        argv = [*program, self.command, "--rows", row.id, "--seed", str(run.seed),
                "--resume", "--no-progress", "--data-dir", str(Path(spec.data_dir).resolve()),
                "--out-dir", str(Path(self.out_dir).resolve())]
        argv += _stack_flags(spec.stack)
        if spec.unverified_data:
            argv.append("--unverified-data")
        if spec.subset is not None:
            argv += ["--subset", str(spec.subset)]
        if spec.dataset != row.dataset:
            argv += ["--dataset", spec.dataset]
        argv += _model_flags(spec.model, ModelConfig.for_row(row))
        argv += _train_flags(spec.train, TrainConfig.for_row(row, seed=run.seed))
        return argv


def _flag(name: str, value) -> List[str]:
    text = str(value)
    return [f"{name}={text}"] if text.startswith("-") else [name, text]


def _stack_flags(stack: StackOptions) -> List[str]:
    default = StackOptions()
    out: List[str] = []
    for field in ("backend", "device", "dtype", "theano_mode"):
        if getattr(stack, field) != getattr(default, field):
            out += _flag("--" + field.replace("_", "-"), getattr(stack, field))
    return (out + (["--compile"] if stack.compile else [])
            + ([] if stack.compile_cache else ["--no-compile-cache"]))


def _model_flags(model: ModelConfig, row: ModelConfig) -> List[str]:
    out: List[str] = []
    for field, flag in (("n", "--n"), ("k", "--k"), ("outgate", "--outgate"),
                        ("forget_bias", "--forget-bias"), ("dense_init", "--dense-init")):
        if getattr(model, field) != getattr(row, field):
            out += _flag(flag, repr(getattr(model, field)) if field == "forget_bias"
                         else getattr(model, field))
    return out


def _train_flags(train: TrainConfig, row: TrainConfig) -> List[str]:
    out: List[str] = []
    if train.batch_size != row.batch_size:
        out += ["--batch-size", str(train.batch_size)]
    if train.lr_stages != row.lr_stages:
        out += _flag("--lr", repr(train.lr_stages[0]))
    if train.nesterov:
        out.append("--nesterov")
    if train.flip:
        out.append("--flip")
    if train.patience != row.patience:
        out += ["--patience", str(train.patience)]
    if train.epochs_cap is not None:
        out += ["--epochs-cap", str(train.epochs_cap)]
    if train.schedule is not None:
        out += ["--schedule", ",".join(str(e) for e in train.schedule)]
    return out
