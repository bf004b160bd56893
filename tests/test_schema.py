"""The run schema: every option declared once (crmn/schema.py), parsed and rendered back the
same; --device auto; the cost line and --dry-run."""
import argparse
import re
import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from crmn import cli, cost, paper, registry, roofline, schema
from crmn import plan as plans
from crmn.cli import parser
from crmn.config import TrainConfig
from crmn.launch import manifest
from crmn.registry import BackendOptions

from cli_helpers import command_names, command_options

ROOT = Path(__file__).resolve().parent.parent
#: a value off the default for each option type; a field of a new type needs one here
SAMPLES = {schema.positive: "3", schema.finite: "-1.5", schema.above_zero: "0.05",
           schema.width: "0.5", schema.epochs_list: "3,2,1", int: "2", None: "t1-crmn32x1"}


def _off_default(f: dataclasses.Field, tmp_path: Path):
    """The command-line words that set ``f`` off its default."""
    m = f.metadata
    if m["kind"] != "value":
        return [m["flag"]]
    if m["choices"]:
        return [m["flag"], next(c for c in m["choices"] if c != f.default)]
    if m["type"] is Path:
        return [m["flag"], str(tmp_path / "elsewhere")]
    if m["type"] is registry.device_option:
        return [m["flag"], "cpu"]  # off the command line's default, auto
    return [m["flag"], SAMPLES[m["type"]]]


def _run_fields():
    return [(section, f) for section, cls in plans.SECTIONS.items()
            for f in schema.flagged(cls)]


def _backend_allows(backend: str, f: dataclasses.Field, words) -> bool:
    if f.name not in BackendOptions.__dataclass_fields__:
        return True
    value = False if f.metadata["kind"] == "false" else (
        True if f.metadata["kind"] == "true" else words[1])
    try:
        BackendOptions(**{"backend": backend, f.name: value})
    except Exception:  # another backend's option
        return False
    return True


def test_every_schema_field_round_trips(tmp_path):
    """parse(render(plan)) == plan with every field of the schema off its default (one plan
    per backend: some backend options belong to one backend only)."""
    covered = set()
    for backend in registry.BACKENDS:
        argv = ["table1", "--rows", "t1-crmn32x1", "--seed", "0", "--backend", backend]
        here = set()
        for section, f in _run_fields():
            words = _off_default(f, tmp_path)
            if f.name != "backend" and _backend_allows(backend, f, words):
                argv += words
                here.add((section, f.name))
        covered |= here
        plan = plans.train_plan(parser.parse(argv))
        (run,) = plan.runs
        for section, name in here:
            obj = getattr(run.spec, section) if section else run.spec
            cls = plans.SECTIONS[section]
            assert getattr(obj, name) != cls.__dataclass_fields__[name].default or (
                name == "device"), (section, name)
        line = plans.render_argv(plan, run, ["prog"])
        (again,) = plans.train_plan(parser.parse(line[1:])).runs
        assert again == run, line
    covered.add(("backend_options", "backend"))
    assert covered == {(s, f.name) for s, f in _run_fields()}


#: the positional arguments a command needs before its options parse
POSITIONAL = {"compare": ["d"], "status": ["d"], "export": ["d"], "evaluate": ["w.pt"],
              "replay": ["d"]}
#: ... and after them (lasagne: whatever follows SCRIPT is the script's own)
TRAILING = {"lasagne": ["s.py"]}


def test_every_commands_options_come_from_the_schema_and_parse_back(tmp_path):
    """Over every command: an option of a schema class (the run's sections, the launcher's,
    the commands' shared ones) parses onto its field's destination, off its default, as the
    field declares it; an option outside the schema belongs to one command alone."""
    declared = {f.metadata["flag"]: f for cls in (*plans.SECTIONS.values(), plans.LaunchOptions,
                                                  parser.CommandOptions)
                for f in schema.flagged(cls)}
    training = set(paper.EXPERIMENTS) | {"smoke"}
    own, checked = {}, set()
    for name in set(command_names()) - {"test"}:
        for flag in command_options(name):
            f = declared.get(flag)
            if f is None:
                own.setdefault(flag, set()).add("training" if name in training else name)
                continue
            m = f.metadata
            words = _off_default(f, tmp_path)
            args = parser.parse([name, *POSITIONAL.get(name, []), *words,
                                 *TRAILING.get(name, [])])
            want = ((m["kind"] == "true") if m["kind"] != "value" else
                    words[1] if m["choices"] or not m["type"] else m["type"](words[1]))
            assert getattr(args, schema.dest(f)) == want, (name, flag)
            checked.add((name, flag))
    assert {flag: users for flag, users in own.items() if len(users) > 1} == {}
    for name, flag in [("verify", "--lr"), ("verify", "--seed"), ("evaluate", "--subset"),
                       ("gpucheck", "--out-dir"), ("export", "--out-dir"), ("bench", "--json"),
                       ("params", "--json"), ("evaluate", "--dataset"), ("profile", "--device")]:
        assert (name, flag) in checked


def test_smoke_round_trips(tmp_path):
    """smoke's own defaults render nothing; every change renders back the same run."""
    args = parser.parse(["smoke", "--n", "2", "--flip", "--schedule", "3,0,0",
                         "--out-dir", str(tmp_path), "--device", "cpu"])
    plan = plans.smoke_plan(args)
    line = plans.render_argv(plan, plan.runs[0], ["prog"], resume=False)
    assert "--k" not in line and "--batch-size" not in line and "--resume" not in line
    assert plans.smoke_plan(parser.parse(line[1:])).runs == plan.runs
    # gpucheck's smoke: no command line to start from
    made = plans.smoke_plan_for(BackendOptions("torch"), tmp_path, schedule=(3, 0, 0),
                                epochs_cap=3)
    words = plans.render_argv(made, made.runs[0], ["prog"], resume=False)
    assert words[words.index("--epochs-cap") + 1] == "3" and "--schedule" in words
    assert plans.smoke_plan(parser.parse(words[1:])).runs == made.runs


@dataclasses.dataclass(frozen=True)
class _WarmTrain(TrainConfig):
    warmup: int = schema.option(0, flag="--warmup", type=schema.positive, metavar="E",
                                group="protocol", help="warm-up epochs at a tenth of the lr")


@dataclasses.dataclass(frozen=True)
class _SubsetSpec(plans.RunSpec):
    subset: int = schema.option(None, flag="--subset", type=schema.positive, metavar="N",
                                help="train on the first N images")


@pytest.mark.parametrize("section, cls, flag, value", [("train", _WarmTrain, "--warmup", 4),
                                                       ("", _SubsetSpec, "--subset", 400)])
def test_a_new_field_becomes_an_option_and_a_manifest_word(monkeypatch, tmp_path, section,
                                                           cls, flag, value):
    monkeypatch.setitem(plans.SECTIONS, section, cls)
    args = parser.parse(["table1", "--rows", "t1-crmn32x1", flag, str(value), "--device",
                         "cpu", "--launcher", "local", "--jobs", "2", "--out-dir",
                         str(tmp_path)])
    plan = plans.train_plan(args)
    spec = plan.runs[0].spec
    assert getattr(spec.train if section else spec, flag[2:]) == value
    (task,) = manifest.build(plan, ["bash", "x"])
    words = shlex.split(task.line)
    assert words[words.index(flag) + 1] == str(value)
    assert plans.train_plan(parser.parse(words[2:])).runs[0].spec == spec


def test_new_field_help(monkeypatch, capsys):
    monkeypatch.setitem(plans.SECTIONS, "train", _WarmTrain)
    with pytest.raises(SystemExit):
        cli.main(["table1", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--warmup E warm-up epochs at a tenth of the lr (default: 0)" in text


@pytest.mark.current
def test_interpretations_and_resume_fields_come_from_the_schema():
    from crmn import report

    assert report.INTERPRETATIONS == {"outgate", "forget_bias", "dense_init", "nesterov",
                                      "flip", "patience", "lr_stages"}
    assert plans.resume_may_change("train.epochs_cap")
    assert plans.resume_may_change("backend_options.backend") and plans.resume_may_change("data_dir")
    assert not plans.resume_may_change("model.k")
    assert not plans.resume_may_change("train.lr_stages")
    assert not plans.resume_may_change("dataset")


# ---------------------------------------------------------------------------------------
# --device auto


@pytest.mark.current
@pytest.mark.parametrize("backend, mode, torch_gpu, jax_gpu, want", [
    ("torch", None, True, False, ("cuda", None)),
    ("torch", None, False, True, ("cpu", None)),
    ("theano", None, False, True, ("cuda", "jax")),
    ("theano", None, True, False, ("cpu", None)),
    ("theano", "jax", False, False, ("cpu", "jax")),
    ("theano", "c", True, True, ("cpu", None)),
])
def test_auto_device_decision(monkeypatch, backend, mode, torch_gpu, jax_gpu, want):
    monkeypatch.setattr(registry, "_torch_gpu", lambda: (torch_gpu, "torch says"))
    monkeypatch.setattr(registry, "_jax_gpu", lambda: (jax_gpu, "jax says"))
    device, chosen_mode, why = registry.auto_device(backend, mode)
    assert (device, chosen_mode) == want
    assert why == ("--theano-mode c runs on the CPU" if mode == "c" else
                   ("torch says" if backend == "torch" else "jax says"))


def test_auto_on_a_jax_gpu_plans_the_jax_mode(monkeypatch):
    monkeypatch.setattr(registry, "_jax_gpu", lambda: (True, "jax sees a GPU"))
    monkeypatch.setattr(registry, "probe", lambda options: None)  # no GPU here to ask
    plan = plans.train_plan(parser.parse(["table1", "--rows", "t1-crmn32x1"]))
    assert (plan.backend_options.device, plan.backend_options.theano_mode) == ("cuda", "jax")
    assert plan.device_note == "device: cuda (auto: jax sees a GPU)"


def test_auto_resolves_here_and_says_why():
    """This machine: the plan's device is what the probes find, and the note says why."""
    torch_gpu, why = registry._torch_gpu()
    plan = plans.train_plan(parser.parse(["table1", "--rows", "t1-crmn32x1", "--backend",
                                          "torch"]))
    assert plan.backend_options.device == ("cuda" if torch_gpu else "cpu")
    assert plan.device_note == f"device: {plan.backend_options.device} (auto: {why})"
    if not torch_gpu:
        assert "no CUDA GPU" in why or "not installed" in why


@pytest.mark.current
def test_importing_and_parsing_imports_no_framework():
    code = ("import sys; from crmn.cli import parser; import crmn.plan, crmn.cost; "
            "parser.parse(['table1']); "
            "print(sorted(m for m in ('jax', 'torch', 'theano') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------
# cost and --dry-run


@pytest.mark.current
def test_expected_epochs():
    assert cost.expected_epochs(TrainConfig(schedule=(5, 4, 3))) == 12
    assert cost.expected_epochs(TrainConfig(schedule=(5, 4, 3), epochs_cap=4)) == 11
    assert cost.expected_epochs(TrainConfig(patience=10)) == 2 * 3 * 60
    assert cost.expected_epochs(TrainConfig(epochs_cap=2)) == 2 * 3 * 2


def test_estimate_from_recorded_speeds(tmp_path, monkeypatch):
    monkeypatch.setattr(cost, "speeds_path", lambda: tmp_path / "none.json")  # no kept ceiling
    plan = plans.train_plan(parser.parse(["table1", "--rows", "t1-crmn32x1,t1-resnet32x1",
                                          "--device", "cpu", "--backend", "torch"]))
    line = cost.estimate(plan, {})  # nothing measured: FLOPs over the measured ceiling
    assert re.search(r"about [0-9.]+ (min|h|days) \(FLOPs at 25% of this device's float32 "
                     r"ceiling for t1-crmn32x1,t1-resnet32x1, a rough guess", line), line
    assert "bench --rows t1-crmn32x1,t1-resnet32x1 --backend torch --device cpu" in line
    monkeypatch.setattr(roofline, "fp32_ceiling", lambda device: 1e9)  # a quarter: 2.5e8
    flops = sum(roofline.train_flops_per_image(run.spec.model) for run in plan.runs)
    guessed = flops * 50_000 / 2.5e8 * 360  # seconds: 360 expected epochs a run
    assert f"about {cost._time(guessed)} (FLOPs at 25%" in cost.estimate(plan, {})
    path = tmp_path / "speeds.json"
    cost.record([{"row": r, "sec_per_epoch": 10.0} for r in ("t1-crmn32x1", "t1-resnet32x1")],
                [plan.backend_options] * 2, path)
    speeds = cost.read_speeds(path)
    line = cost.estimate(plan, speeds)
    assert "plan: 2 run(s) (2 row(s) x seeds) on cpu" in line
    assert "about 2.0 h" in line and "faster" not in line  # 2 runs x 360 epochs x 10 s
    slow = {k: 1000.0 for k in speeds}
    assert "faster: a GPU (--device cuda), --backend torch, or --launcher slurm" in \
        cost.estimate(plan, slow)


def _tree(*roots):
    return {str(p) for root in roots if root.exists() for p in root.rglob("*")
            if "__pycache__" not in p.parts and ".git" not in p.parts}


def test_dry_run_prints_the_plan_and_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CRMN_CACHE", str(tmp_path / "cache"))
    before = _tree(ROOT, tmp_path)
    assert cli.main(["table1", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert _tree(ROOT, tmp_path) == before
    assert out[0].startswith("device: cpu (auto: ")
    runs = [ln for ln in out if ln.startswith("t1-")]
    assert len(runs) == 12 and all(" on cpu: bash " in ln for ln in runs)
    assert all("--device cpu" in ln for ln in runs)
    assert out[-1].startswith("plan: 12 run(s) (12 row(s) x seeds) on cpu")
