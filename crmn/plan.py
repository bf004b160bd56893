"""The plan: what a command will run, typed and checked once, before anything is created. Its
dataclasses are the run schema; :func:`render_argv` turns a run back into a command line."""
from __future__ import annotations

import dataclasses
import functools
import json
import re
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from crmn import paper, registry, schema
from crmn.config import ModelConfig, TrainConfig
from crmn.errors import ConfigError, UsageError
from crmn.registry import BackendOptions
from crmn.schema import option, positive

ROOT = Path(__file__).resolve().parents[1]
PROG = "run_experiments.sh"
LAUNCHERS = ("local", "slurm")
MAX_REQUEUES = 20  # default cap on a task's requeues after checkpointed stops
#: smoke's own defaults: a tiny CRMN on tiny fake CIFAR-100-format data, a short schedule
SMOKE = dict(n=1, k=0.5, batch_size=50, patience=1, epochs_cap=2, n_train=500, n_test=200,
             row="t1-crmn32x1")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything that defines one run; recorded in ``config.json`` (crmn/LOGS.md)."""
    model: ModelConfig  # the network (docs/spec.md §4)
    train: TrainConfig  # the protocol (docs/spec.md §5); train.seed seeds everything
    dataset: str = option(flag="--dataset", choices=tuple(paper.DATASET_CLASSES),
                          default_help="the row's", help="train the rows on this dataset "
                          "instead of their own (e.g. ResNet-32 on cifar10, the He et al. "
                          "check); marked not as published")
    data_dir: Path = option(flag="--data-dir", type=Path, metavar="DIR", resume=True,
                            show=lambda p: str(Path(p).resolve()),
                            default_help="data/ of the archive; see data/README.md",
                            help="datasets are read from / downloaded into DIR, or DIR is "
                            "the extracted folder itself")
    backend_options: BackendOptions = BackendOptions()
    unverified_data: bool = option(False, flag="--unverified-data", kind="true",
                                   default_help="refuse it", help="accept a dataset folder "
                                   "that differs from the official files (checksums, image "
                                   "counts); such runs are marked not as published")
    subset: Optional[int] = option(None, flag="--subset", type=positive, metavar="N",
                                   default_help="all", help="a quick look: train on N "
                                   "training images (class-balanced, a fixed seed) and test on "
                                   "a proportional share of the test images; marked as such")
    row: Optional[str] = None  # crmn.paper row id, None for a run that is no paper row
    experiment: Optional[str] = None  # table1 | table2 | table3 | svhn | smoke

    def __post_init__(self):
        # absolute: config.json's spec then runs again from any working folder (replay)
        object.__setattr__(self, "data_dir", Path(self.data_dir).resolve())
        if self.dataset not in paper.DATASET_CLASSES:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of "
                              f"{', '.join(paper.DATASET_CLASSES)}")
        if self.model.classes != paper.DATASET_CLASSES[self.dataset]:
            raise ConfigError(f"a {self.model.classes}-class network cannot train on "
                              f"{self.dataset} ({paper.DATASET_CLASSES[self.dataset]} classes)")
        # the least --subset that trains a batch in every phase (crmn/data/prepare.py's split)
        least, b, share = self.train.batch_size, self.train.batch_size, self.train.val_fraction
        while self.train.schedule is None and not 1 <= round(share * least) <= least - b:
            least += 1
        if self.subset is not None and self.subset < least:
            search = "" if self.train.schedule else (
                f", after {self.train.val_fraction:g} of them are held out for validation")
            raise ConfigError(f"--subset {self.subset} leaves no whole batch of "
                              f"{self.train.batch_size} images to train on{search}: give "
                              f"--subset {least} or more, or a smaller --batch-size")


#: the schema's classes by their place in a run (a test may derive one with one more field)
SECTIONS = {"model": ModelConfig, "train": TrainConfig, "backend_options": BackendOptions,
            "": RunSpec}
#: sections written at config.json's top level, as every run folder has held them
FLAT = ("backend_options",)
RECORD_FORMAT = 2  # config.json's "config_format": the whole spec is recorded (crmn/LOGS.md)


def resume_may_change(name: str) -> bool:
    """Whether ``--resume`` may change field ``name``, e.g. ``"backend_options.backend"``."""
    section, _, field = name.rpartition(".")
    cls = SECTIONS.get(section)
    return cls is not None and field in schema.names(cls, "resume")


def spec_fields(cls=None, prefix: str = "") -> Iterator[Tuple[str, dataclasses.Field]]:
    """``("model.n", field)``, ... for every field of the schema, sections walked into."""
    for f in dataclasses.fields(cls or SECTIONS[""]):
        if not prefix and f.name in SECTIONS:
            yield from spec_fields(SECTIONS[f.name], f"{f.name}.")
        else:
            yield prefix + f.name, f


def disk_key(name: str) -> Tuple[str, ...]:
    """Where schema field ``name`` sits in config.json: ``("model", "n")``, ``("backend",)``."""
    section, _, field = name.rpartition(".")
    return (field,) if not section or section in FLAT else (section, field)


def spec_record(spec: RunSpec) -> Dict[str, Any]:
    """The spec as config.json holds it: every schema field, as JSON gives it back."""
    out: Dict[str, Any] = {}
    for name, _ in spec_fields():  # the layout is disk_key's, the one rule of config.json
        *section, key = disk_key(name)
        value = functools.reduce(getattr, name.split("."), spec)
        (out.setdefault(section[0], {}) if section else out)[key] = value
    return json.loads(json.dumps(out, default=str))


def recorded(record: Dict, name: str):
    """Schema field ``name``'s value in ``record`` (a config.json), KeyError if absent."""
    value = record
    for key in disk_key(name):
        if not isinstance(value, dict) or key not in value:
            return KeyError
        value = value[key]
    return value


def spec_from_record(record: Dict, path="config.json") -> RunSpec:
    """The spec config.json records; a record of an earlier format or incomplete is refused."""
    if record.get("config_format") != RECORD_FORMAT:
        raise ConfigError(f"{path}: written before config.json held the whole run (no "
                          f"config_format {RECORD_FORMAT}); train the run again with its "
                          "command to record it")
    values: Dict[str, Dict[str, Any]] = {}
    for name, _ in spec_fields():
        section, _, field = name.rpartition(".")
        value = recorded(record, name)
        if value is KeyError:
            raise ConfigError(f"{path}: records no {name}; it is not a complete record of a "
                              "run (train the run again with its command)")
        hint = typing.get_type_hints(SECTIONS[section])[field]
        if isinstance(value, list):  # JSON's list is the field's tuple, its string a path
            value = tuple(value)
        elif isinstance(value, str) and Path in (hint, *typing.get_args(hint)):
            value = Path(value)
        values.setdefault(section, {})[field] = value
    try:
        top = values.pop("")
        return SECTIONS[""](**top, **{k: SECTIONS[k](**v) for k, v in values.items()})
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: its spec does not hold ({e}); train the run again with "
                          "its command") from None


def legacy_record(record: Dict) -> Dict:
    """A config.json from before ``config_format`` 2, with the fields it held in other words."""
    if record.get("config_format") == RECORD_FORMAT:
        return record
    out = dict(record, unverified_data=record.get("data") == "unverified")
    if "device_requested" in record:
        out["device"] = record["device_requested"]
    said = re.search(r"on ([\d,]+) training images", record.get("data_description") or "")
    out["subset"] = int(said.group(1).replace(",", "")) if said else None
    return out


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of a plan: ``<out-dir>/<experiment>/<label>/seed<k>/`` (crmn/LOGS.md)."""
    spec: RunSpec
    label: str  # the row id, or the smoke run's name
    run_dir: Path

    @property
    def seed(self) -> int:
        return self.spec.train.seed


@dataclasses.dataclass(frozen=True)
class LaunchOptions:
    """How a grid of runs is executed: in this process, as subprocesses, or on Slurm."""
    launcher: str = option("local", flag="--launcher", choices=LAUNCHERS, group="launch",
                           help="local: on this machine; slurm: one job array of single runs "
                           "plus a compare job")
    jobs: Optional[int] = option(
        None, flag="--jobs", type=positive, metavar="N", group="launch",
        default_help="visible GPUs x --runs-per-gpu with --device cuda, else 1 = every run "
        "in this process, one after another", help="local: N single runs at once as "
        "subprocesses, spread over the GPUs with --device cuda")
    runs_per_gpu: Optional[int] = option(
        None, flag="--runs-per-gpu", type=positive, metavar="K", group="launch",
        default_help="1", help="K runs share each GPU: local: --jobs defaults to GPUs x K, "
        "with a CUDA MPS daemon where nvidia-cuda-mps-control exists; slurm: each array task "
        "runs K manifest lines on its GPU (REPRODUCING.md §5 measures which K pays)")
    max_parallel: Optional[int] = option(
        None, flag="--max-parallel", type=positive, metavar="K", group="launch",
        default_help="no limit", help="slurm: at most K array tasks at once (--array=...%%K)")
    slurm_args: Optional[str] = option(
        None, flag="--slurm-args", metavar='"ARGS"', group="launch", default_help="none",
        help='slurm: extra sbatch options for both jobs, e.g. "--gres=gpu:1 --time=8:00:00"; '
        'a single option as --slurm-args=--exclusive (SBATCH_* environment variables work too)')
    wait: bool = option(False, flag="--wait", kind="true", group="launch",
                        default_help="return once submitted",
                        help="slurm: wait until the compare job ends and exit with its code")
    max_requeues: Optional[int] = option(
        None, flag="--max-requeues", type=int, metavar="N", group="launch",
        default_help=str(MAX_REQUEUES),
        help="slurm: a task requeues itself after a checkpointed stop at most N times")

    def __post_init__(self):
        if self.launcher not in LAUNCHERS:
            raise UsageError(f"{PROG}: unknown --launcher {self.launcher!r}; "
                             f"choose {' or '.join(LAUNCHERS)}")
        if self.launcher == "slurm":
            if self.jobs is not None:
                raise UsageError(f"{PROG}: --jobs is for --launcher local; with "
                                 "--launcher slurm use --max-parallel K")
            if self.max_requeues is not None and self.max_requeues < 0:
                raise UsageError(f"{PROG}: --max-requeues wants N >= 0")
            return
        given = [f.metadata["flag"] for f in schema.flagged(self)
                 if f.name not in ("launcher", "jobs", "runs_per_gpu")
                 and getattr(self, f.name) not in (None, False)]
        if given:
            raise UsageError(f"{PROG}: {', '.join(given)} only apply to --launcher slurm")

    @property
    def per_gpu(self) -> int:
        return self.runs_per_gpu or 1

    @property
    def requeues(self) -> int:
        return MAX_REQUEUES if self.max_requeues is None else self.max_requeues


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """A training command (table1-3, svhn, smoke): its runs and how to execute them."""
    command: str  # the experiment: table1 | table2 | table3 | svhn | smoke
    runs: Tuple[PlannedRun, ...]
    out_dir: Path  # run directories go under out_dir/command/
    resume: bool = False  # continue every run from its checkpoint
    progress: bool = True  # progress bar and download bar
    launch: LaunchOptions = LaunchOptions()
    one_seed: bool = False  # --seed K: one run of a grid (its launcher compares)
    fresh: bool = False  # clear each run directory (under its lock) before training
    dry_run: bool = False  # --dry-run: print the plan and its cost, create nothing
    device_note: str = ""  # the device chosen and why, e.g. "device: cpu (auto: ...)"

    def __post_init__(self):
        if not self.runs:
            raise UsageError(f"{PROG} {self.command}: no run selected")

    @property
    def exp_dir(self) -> Path:
        return self.out_dir / self.command

    @property
    def backend_options(self) -> BackendOptions:
        return self.runs[0].spec.backend_options


def _bases(run: PlannedRun):
    """What the command line of ``run`` gives without options: top, backend, model, train."""
    spec = run.spec
    options = SimpleNamespace(**dataclasses.asdict(BackendOptions()))
    options.device = None  # always named: auto may resolve otherwise where the line runs
    if spec.backend_options.backend == "theano":
        options.theano_mode = None  # likewise the Theano mode auto or the machine picks
    if spec.row is None:  # smoke: its own network and schedule, its own data
        return (spec, options, *_smoke_configs(seed=run.seed))
    row = paper.row(spec.row)
    here = SimpleNamespace(**{f.name: f.default for f in schema.flagged(spec)})
    here.dataset, here.data_dir = row.dataset, None  # the path: always named, absolute
    return (here, options, type(spec.model).for_row(row),
            type(spec.train).for_row(row, seed=run.seed))


def render_argv(plan: TrainPlan, run: PlannedRun, program: Sequence[str],
                resume: bool = True) -> List[str]:
    """The command line that trains ``run`` alone: its place, ``--resume``, the device, and every
    schema field in which the run differs from its row (smoke: from smoke's defaults)."""
    spec = run.spec
    argv = [*program, plan.command]
    if spec.row is not None:
        argv += ["--rows", spec.row]
    argv += ["--seed", str(run.seed), *(["--resume"] if resume else []), "--no-progress",
             "--out-dir", str(Path(plan.out_dir).resolve())]
    for obj, base in zip((spec, spec.backend_options, spec.model, spec.train), _bases(run)):
        argv += schema.render(obj, base)
    return argv


def reproduce_argv(spec: RunSpec, out_dir: str, program: Sequence[str]) -> List[str]:
    """The training command that runs ``spec`` again from any folder, into ``out_dir`` there."""
    run = PlannedRun(spec, spec.row or spec.experiment or "run", Path(out_dir))
    plan = TrainPlan(command=spec.experiment or "smoke", runs=(run,), out_dir=Path(out_dir))
    argv = render_argv(plan, run, program, resume=False)
    argv[argv.index("--out-dir") + 1] = out_dir  # as given: each working folder its own
    return argv


def evaluate_argv(spec: RunSpec, weights: Path, program: Sequence[str]) -> List[str]:
    """The ``evaluate`` command that tests ``spec``'s exported ``weights`` as its run did."""
    options = SimpleNamespace(**dataclasses.asdict(spec.backend_options))
    options.backend = options.device = None  # always named
    if spec.backend_options.backend == "theano":
        options.theano_mode = None
    here = SimpleNamespace(**{f.name: f.default for f in schema.flagged(spec)})
    here.dataset = here.data_dir = None
    return [*program, "evaluate", str(weights), *schema.render(spec, here),
            *schema.render(spec.backend_options, options)]


def _usage(args, exc: Exception, where: str = "") -> UsageError:
    return UsageError(f"{PROG} {args.command}: {exc}{where}")


def resolve_backend(args, backend: Optional[str] = None) -> Tuple[BackendOptions, str]:
    """The checked, probed :class:`BackendOptions` of ``args`` and the line saying which device."""
    backend = backend or getattr(args, "backend", registry.DEFAULT_BACKEND)
    mode, device = getattr(args, "theano_mode", None), args.device
    note = f"device: {device} (--device {device})"
    try:
        if device == registry.AUTO:
            device, auto_mode, why = registry.auto_device(backend, mode)
            mode, note = mode or auto_mode, f"device: {device} (auto: {why})"
        given = schema.values(BackendOptions, args, None)  # dtype, compile, compile_cache
        options = BackendOptions(**{**given, "backend": backend, "device": device,
                                  "theano_mode": mode or registry.default_theano_mode(backend)})
        registry.probe(options)
    except ConfigError as exc:
        raise _usage(args, exc) from None
    return options, note


def configs_for(row: paper.Row, args, seed: int, dataset: Optional[str] = None):
    """(model, train) of one run of ``row``: the row's, changed by every option given."""
    model_cls, train_cls = SECTIONS["model"], SECTIONS["train"]
    try:
        model = model_cls.for_row(row, classes=paper.DATASET_CLASSES[dataset or row.dataset])
        train = train_cls.for_row(row, seed=seed)
        return (dataclasses.replace(model, **schema.values(model_cls, args, model)),
                dataclasses.replace(train, **schema.values(train_cls, args, train)))
    except ConfigError as exc:
        raise _usage(args, exc, f" (row {row.id})") from None


def train_plan(args) -> TrainPlan:
    """The plan of ``table1``/``table2``/``table3``/``svhn``; nothing read or written yet."""
    if args.seed is not None and (args.seed < 0 or args.seeds is not None):
        raise UsageError(f"{PROG}: --seed K wants K >= 0 and no --seeds")
    launch = LaunchOptions(**schema.values(LaunchOptions, args, None))
    rows = paper.select(args.rows, args.command, strict=True)
    options, note = resolve_backend(args)
    exp_dir = Path(args.out_dir) / args.command
    given = schema.values(SECTIONS[""], args, None)  # dataset, data_dir, ...
    runs = []
    for row in rows:
        for k in [args.seed] if args.seed is not None else range(args.seeds or row.seeds):
            model, train = configs_for(row, args, k, args.dataset)
            spec = SECTIONS[""](**{"dataset": row.dataset, **given}, model=model, train=train,
                                backend_options=options, row=row.id, experiment=args.command)
            runs.append(PlannedRun(spec, row.id, exp_dir / row.id / f"seed{k}"))
    return TrainPlan(command=args.command, runs=tuple(runs), out_dir=args.out_dir,
                     resume=args.resume, progress=args.progress, launch=launch,
                     one_seed=args.seed is not None, dry_run=args.dry_run, device_note=note)


def _smoke(model: ModelConfig, train: TrainConfig, options: BackendOptions, out_dir: Path,
           **plan) -> TrainPlan:
    name = f"tiny-crmn-n{model.n}-k{model.k:g}"
    root = Path(out_dir) / "smoke"
    spec = RunSpec(model=model, train=train, dataset="cifar100", data_dir=root / "data",
                   backend_options=options, row=None, experiment="smoke")
    run = PlannedRun(spec, name, root / name / f"seed{train.seed}")
    return TrainPlan(command="smoke", runs=(run,), out_dir=Path(out_dir), **plan)


def smoke_plan(args) -> TrainPlan:
    """smoke's one run (defaults :data:`SMOKE`), started afresh unless ``--resume``."""
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"{PROG} smoke: --seed K wants K >= 0")
    options, note = resolve_backend(args)
    model, train = configs_for(paper.row(SMOKE["row"]), args, args.seed or 0, "cifar100")
    return _smoke(model, train, options, args.out_dir, resume=args.resume,
                  progress=args.progress, fresh=not args.resume, dry_run=args.dry_run,
                  device_note=note)


def smoke_plan_for(options: BackendOptions, out_dir: Path, **train) -> TrainPlan:
    """smoke's plan without a command line (gpucheck), ``train`` changed."""
    return _smoke(*_smoke_configs(**train), options, out_dir, fresh=True)


def _smoke_configs(**train) -> Tuple[ModelConfig, TrainConfig]:
    row = paper.row(SMOKE["row"])
    small = {k: SMOKE[k] for k in ("batch_size", "patience", "epochs_cap")}
    return (SECTIONS["model"].for_row(row, n=SMOKE["n"], k=SMOKE["k"]),
            SECTIONS["train"].for_row(row, **{**small, **train}))


def row_plan_for(row_id: str, options: BackendOptions, out_dir: Path, *, model=(), train=(),
                 **given) -> TrainPlan:
    """Seed 0 of a paper row without a command line (gpucheck's real-data check)."""
    row = paper.row(row_id)
    dataset = given.setdefault("dataset", row.dataset)
    spec = RunSpec(model=SECTIONS["model"].for_row(
        row, classes=paper.DATASET_CLASSES[dataset], **dict(model)),
        train=SECTIONS["train"].for_row(row, **dict(train)), backend_options=options, row=row.id,
        experiment=row.table, **given)
    run = PlannedRun(spec, row.id, Path(out_dir) / row.table / row.id / "seed0")
    return TrainPlan(command=row.table, runs=(run,), out_dir=Path(out_dir), one_seed=True)
