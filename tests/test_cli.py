"""The command line: usage errors exit 2 in one line, defaults come from the dataclasses,
flags map onto ModelConfig / TrainConfig, `params` counts real networks."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from crmn import cli, paper, registry
from crmn import plan as plans
from crmn.cli import parser
from crmn.config import ModelConfig, TrainConfig
from crmn.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv, needle", [
    (["bogus"], "invalid choice: 'bogus'"),
    ([], "required"),
    (["table1", "--bogus"], "unrecognized arguments: --bogus"),
    (["table1", "--rows", "t1-nope"], "unknown row id 't1-nope'"),
    (["table1", "--rows", "t2-crmn32x4"], "belong to another experiment"),
    (["table2", "--schedule", "80,forty"], "--schedule: wants epochs per stage"),
    (["table1", "--seeds", "0"], "expected a number >= 1"),
    (["table1", "--backend", "caffe"], "invalid choice: 'caffe'"),
    (["params", "--rows", "x"], "unknown row id 'x'"),
    (["smoke", "--rows", "t1-crmn32x1"], "unrecognized arguments: --rows"),
    (["smoke", "--data-dir", "elsewhere"], "unrecognized arguments: --data-dir"),
    (["table1", "--device", "gpu"], "argument --device: unknown device 'gpu'"),
    (["verify", "--rows", "t1-nope"], "unknown row id 't1-nope'"),
    (["profile", "--steps", "0"], "expected a number >= 1"),
])
def test_usage_errors_exit_2_one_line(argv, needle, capsys, run_main):
    rc, out, err = run_main(argv)
    assert rc == 2
    assert err.count("\n") == 1 and needle in err, err
    assert out == ""


def test_crmn_error_exits_1(tmp_path, capsys, run_main):
    rc, out, err = run_main(["compare", str(tmp_path / "nothing")])
    assert rc == 1 and err.startswith("error: ") and str(tmp_path / "nothing") in err
    assert err.count("\n") == 1
    # options that contradict the row: a 2-stage schedule for a 3-rate row, before training
    rc, out, err = run_main(["table1", "--rows", "t1-crmn32x1", "--schedule", "3,3",
                             "--out-dir", str(tmp_path)])
    assert rc == 2 and "--schedule gives 2 stages" in err and "t1-crmn32x1" in err
    assert not (tmp_path / "table1").exists()


def test_script_exit_code_and_stderr():
    """The real entry point, as a user runs it (environment already present)."""
    p = subprocess.run(["bash", str(ROOT / "run_experiments.sh"), "table9"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("run_experiments.sh: argument COMMAND")


def test_script_reads_relative_paths_from_the_callers_directory(tmp_path):
    run = tmp_path / "mine" / "table1" / "t1-crmn32x1" / "seed0"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"row": "t1-crmn32x1", "experiment": "table1",
                                                 "seed": 0}))
    (run / "log.jsonl").write_text("")
    p = subprocess.run(["bash", str(ROOT / "run_experiments.sh"), "compare", "mine/table1",
                        "--no-plots"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "mine" / "table1" / "REPORT.md").is_file()
    assert not (ROOT / "mine").exists()


FLAG_FIELDS = [("outgate", ModelConfig, "outgate"), ("forget_bias", ModelConfig, "forget_bias"),
               ("dense_init", ModelConfig, "dense_init"), ("nesterov", TrainConfig, "nesterov"),
               ("flip", TrainConfig, "flip"), ("patience", TrainConfig, "patience"),
               ("schedule", TrainConfig, "schedule"), ("epochs_cap", TrainConfig, "epochs_cap")]
#: smoke's own defaults (crmn.cli.parser.SMOKE) replace these
SMOKE_FIELDS = {"patience": parser.SMOKE["patience"], "epochs_cap": parser.SMOKE["epochs_cap"]}


@pytest.mark.parametrize("command", ["table1", "table2", "table3", "svhn", "smoke", "params",
                                     "bench"])
def test_help_defaults_are_the_dataclass_defaults(command, capsys):
    parsed = vars(parser.parse([command]))  # every option at its default
    fields = {(c, f.name): f.default for c in (ModelConfig, TrainConfig)
              for f in dataclasses.fields(c)}
    flags = [f for f in FLAG_FIELDS if f[0] in parsed]  # params: the model's flags only
    assert len(flags) == {"params": 3, "bench": 0}.get(command, len(FLAG_FIELDS))
    want = {dest: (SMOKE_FIELDS[dest] if command == "smoke" and dest in SMOKE_FIELDS
                   else fields[(cls, name)]) for dest, cls, name in flags}
    for dest, value in want.items():
        assert parsed[dest] == value, dest
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for dest, value in want.items():
        assert f"(default: {value}" in text, dest
    # one default backend, device and dtype for every command (crmn.registry); the training
    # commands choose their device (--device auto)
    assert f"(default: {registry.DEFAULT_BACKEND})" in text
    if command == "params":  # a count depends on the backend alone
        assert "--device" not in text and "--dtype" not in text and "--compile" not in text
        return
    device = "cpu" if command == "bench" else "auto"
    assert f"(default: {registry.DEFAULT_DTYPE})" in text and f"(default: {device})" in text


def test_smoke_help_shows_its_own_network_and_batch(capsys):
    with pytest.raises(SystemExit):
        cli.main(["smoke", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--n", "--k", "--batch-size"):
        assert f"{flag} " in text
    assert f"blocks per stage (default: {parser.SMOKE['n']})" in text
    assert f"width factor (default: {parser.SMOKE['k']})" in text
    assert f"images per batch (default: {parser.SMOKE['batch_size']})" in text


def test_smoke_keeps_every_value_given_on_the_command_line(tmp_path):
    """An explicit value equal to table1's default is not replaced by smoke's."""
    args = parser.parse(["smoke", "--patience", "10", "--epochs-cap", "3", "--n", "2",
                         "--k", "1", "--batch-size", "20", "--out-dir", str(tmp_path)])
    (run,) = plans.smoke_plan(args).runs
    assert (run.spec.train.patience, run.spec.train.epochs_cap) == (10, 3)
    assert (run.spec.model.n, run.spec.model.k, run.spec.train.batch_size) == (2, 1.0, 20)
    assert run.label == "tiny-crmn-n2-k1"
    assert not tmp_path.joinpath("smoke").exists()  # a plan creates nothing


def test_flags_map_onto_configs():
    args = parser.parse(
        ["table1", "--outgate", "tanh", "--forget-bias", "-1.5", "--dense-init", "glorot",
         "--nesterov", "--flip", "--patience", "3", "--schedule", "5,4,3", "--epochs-cap", "7",
         "--n", "1", "--k", "0.5", "--batch-size", "20", "--dtype", "float64"])
    row = paper.row("t1-crmn32x4")
    model, train = plans.configs_for(row, args, seed=2)
    assert model == ModelConfig(n=1, k=0.5, classes=100, memory=True, outgate="tanh",
                                forget_bias=-1.5, dense_init="glorot")
    assert train == TrainConfig(batch_size=20, lr_stages=row.lr_stages, nesterov=True,
                                flip=True, patience=3, schedule=(5, 4, 3), epochs_cap=7, seed=2)
    # without flags: exactly the row's configuration and the dataclass defaults
    args = parser.parse(["table2"])
    wide = paper.row("t2-crmn28x10")
    assert plans.configs_for(wide, args, seed=0) == (ModelConfig.for_row(wide),
                                                    TrainConfig.for_row(wide, seed=0))
    # seeds: the row's `seeds` unless --seeds is given
    plan = plans.train_plan(args)
    assert [(r.label, r.seed) for r in plan.runs] == [("t2-crmn32x4", k) for k in range(5)] + [
        ("t2-crmn28x10", 0)]
    args = parser.parse(["table2", "--seeds", "2", "--rows", "t2-crmn28x10"])
    assert [r.seed for r in plans.train_plan(args).runs] == [0, 1]


@pytest.mark.parametrize("backend", ["torch", "theano"])
@pytest.mark.slow
def test_params_json_real_backend(backend, capsys, run_main):
    pytest.importorskip("modern.backend" if backend == "torch" else "original.backend")
    ids = ["t1-resnet32x1", "t1-crmn32x1"]
    rc, out, err = run_main(["params", "--backend", backend, "--rows", ",".join(ids),
                             "--json", "-"])
    assert rc == 0, err
    rows = json.loads(out)
    assert [r["row"] for r in rows] == ids
    for r in rows:
        # exact integers of the reading of docs/spec.md §4; they round to Table 1's figures
        assert r["params"] == r["canonical_params"]
        assert round(r["params"] / 1e6, 2) == r["paper_params_m"] == paper.row(r["row"]).paper_params_m
    assert rows[0]["params"] == 470_004 and rows[1]["params"] == 2_159_304
    rc, out, err = run_main(["params", "--backend", backend, "--rows", "t3-crmn56x3"])
    lines = [ln for ln in out.splitlines() if ln.startswith("| t3-crmn56x3")]
    assert rc == 0 and len(lines) == 1
    cells = [c.strip() for c in lines[0].split("|")[1:-1]]
    assert cells[0] == "t3-crmn56x3" and cells[-1] == ""  # the paper gives no count: blank
    assert int(cells[2].replace(",", "")) > 0


@pytest.mark.slow
def test_smoke_end_to_end(tmp_path):
    """`smoke` as a user runs it: fake data, real loader/sampler/schedule/training/report."""
    pytest.importorskip("modern.backend")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "crmn.cli", "smoke", "--backend", "torch",
                        "--epochs-cap", "1", "--no-progress", "--out-dir", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    run = tmp_path / "smoke" / "tiny-crmn-n1-k0.5" / "seed0"
    for name in ("config.json", "log.jsonl", "checkpoint.h5", "best.h5", "summary.json"):
        assert (run / name).is_file(), name
    assert f"smoke: run        {run}" in p.stdout
    assert f"smoke: report     {tmp_path / 'smoke' / 'REPORT.md'}" in p.stdout
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert summary["status"] == "done" and config["backend"] == "torch"
    # --no-progress drops the batch counter, not the per-epoch lines
    assert "[search] epoch 1" in p.stdout and "[final] epoch 1" in p.stdout
    # the smoke data are fake, and every output says so
    assert "holds fake cifar100 data" in p.stderr
    assert config["data"] == "fake" and summary["data"] == "fake"
    assert config["model"]["n"] == 1 and config["model"]["k"] == 0.5
    # search run over 3 lr stages, each capped at 1 epoch, then the final run
    phases = [json.loads(l)["phase"] for l in (run / "log.jsonl").read_text().splitlines()]
    assert phases.count("search") == 3 and 1 <= phases.count("final") <= 3
    report = (tmp_path / "smoke" / "REPORT.md").read_text()
    assert "tiny-crmn-n1-k0.5" in report and "done 1/1" in report
    assert "FAKE DATA" in report and "epochs capped at 1 per stage" in report
    assert (tmp_path / "smoke" / "curves_tiny-crmn-n1-k0.5.png").is_file()
    assert not (tmp_path / "smoke" / "figure3.png").exists()  # one row: no repeat of it


@pytest.mark.parametrize("name", ["verify", "bench", "profile"])
def test_tools_are_subcommands_with_the_shared_options(name, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: run_experiments.sh {name}" in text
    assert "--device DEV" in text and "--rows ID[,ID]" in text and "--batch-size B" in text
    assert cli.main([name, "--no-such-option"]) == 2


def test_the_cli_is_the_only_argument_parser():
    """No other module of the archive builds an ArgumentParser (one command line)."""
    import ast

    parsers = []
    for path in sorted((ROOT / "crmn").rglob("*.py")) + sorted((ROOT / "original").glob(
            "*.py")) + sorted((ROOT / "modern").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            called = isinstance(node, ast.Call) and getattr(
                node.func, "attr", getattr(node.func, "id", None)) == "ArgumentParser"
            if called:
                parsers.append(path.relative_to(ROOT).as_posix())
    assert sorted(set(parsers)) == ["crmn/cli/parser.py"]


@pytest.mark.slow
def test_sigusr1_checkpoints_stops_with_exit_3_and_resume_finishes(tmp_path):
    """A scheduler's warning signal: the epoch in progress ends, is checkpointed, the run
    exits 3 (resumable, not failed); `--resume` then finishes it from that epoch."""
    pytest.importorskip("modern.backend")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "crmn.cli", "smoke", "--backend", "torch", "--epochs-cap",
            "2", "--no-progress", "--out-dir", str(tmp_path)]
    p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    lines = []
    for line in p.stdout:  # the first finished epoch, then the warning
        lines.append(line)
        if line.startswith("[search] epoch 1"):
            p.send_signal(signal.SIGUSR1)
            break
    out, err = p.communicate(timeout=300)
    assert p.returncode == 3, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("stopped: ")
    run = tmp_path / "smoke" / "tiny-crmn-n1-k0.5" / "seed0"
    logged = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    assert (run / "checkpoint.h5").is_file() and not (run / "summary.json").exists()
    assert 1 <= len(logged) < 6  # stopped after the epoch the signal arrived in
    q = subprocess.run(argv + ["--resume"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert q.returncode == 0, q.stderr[-2000:]
    assert f"resuming search run after epoch {logged[-1]['epoch']}" in q.stdout \
        or "resuming final run" in q.stdout
    assert json.loads((run / "summary.json").read_text())["status"] == "done"


def test_seed_selects_one_run_of_the_grid():
    args = parser.parse(["table2", "--seed", "3", "--rows", "t2-crmn32x4"])
    assert [r.seed for r in plans.train_plan(args).runs] == [3]
    args = parser.parse(["table2", "--seed", "1", "--seeds", "2"])
    with pytest.raises(UsageError):
        plans.train_plan(args)


@pytest.mark.slow
def test_unverified_data_is_refused_then_accepted_with_the_flag_and_marked(tmp_path, capsys, run_main):
    """An extracted CIFAR-10 folder with too few images, given by hand: one line naming the
    file and the count, exit 1, nothing trained; with --unverified-data it trains, is
    recorded as such, and compare lists it under 'not as published'."""
    pytest.importorskip("modern.backend")
    from crmn import data

    folder = data.write_fake("cifar10", tmp_path / "mine", n_train=60, n_test=20, seed=1)
    (folder / data.FAKE_MARKER).unlink()  # now it claims to be the real dataset
    argv = ["table3", "--rows", "t3-crmn28x10", "--backend", "torch", "--n", "1", "--k",
            "0.25", "--batch-size", "10", "--schedule", "1,0,0,0", "--no-progress",
            "--data-dir", str(folder), "--out-dir", str(tmp_path / "runs")]
    rc, out, err = run_main(argv)
    assert rc == 1 and err.count("\n") == 1, err
    assert err.startswith("error: ") and "data_batch_1 holds 12 images, the official file " \
        "10,000" in err and "--unverified-data" in err
    assert not (tmp_path / "runs" / "table3" / "t3-crmn28x10" / "seed0" / "log.jsonl").exists()
    rc, out, err = run_main(argv + ["--unverified-data"])
    assert rc == 0, err
    run = tmp_path / "runs" / "table3" / "t3-crmn28x10" / "seed0"
    assert json.loads((run / "config.json").read_text())["data"] == "unverified"
    assert "were not checked against the official files" in err
    report = (tmp_path / "runs" / "table3" / "REPORT.md").read_text()
    assert "UNVERIFIED DATA (--unverified-data)" in report


def _stable(run):
    """A run's log and summary without the wall-clock fields."""
    skip = ("time", "seconds", "images_per_s", "sec_per_epoch")
    log = [{k: v for k, v in json.loads(l).items() if k not in skip}
           for l in (run / "log.jsonl").read_text().splitlines()]
    summary = {k: v for k, v in json.loads((run / "summary.json").read_text()).items()
               if k not in skip}
    return log, summary


@pytest.mark.slow
def test_two_runs_into_one_directory_the_second_is_refused(tmp_path):
    """Two real CLI runs on one --out-dir: the second exits 1 in one line naming the
    directory and the first's PID, and the first trains exactly as a lone run does."""
    pytest.importorskip("modern.backend")
    from crmn import data

    data_dir = tmp_path / "data"
    data.write_fake("cifar10", data_dir, n_train=200, n_test=50, seed=0)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")

    def argv(out):
        return [sys.executable, "-m", "crmn.cli", "table3", "--rows", "t3-crmn56x3",
                "--backend", "torch", "--n", "1", "--k", "0.25", "--batch-size", "10",
                "--schedule", "3,0,0", "--no-progress", "--data-dir", str(data_dir),
                "--out-dir", str(out)]

    first = subprocess.Popen(argv(tmp_path / "shared"), cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "shared" / "table3" / "t3-crmn56x3" / "seed0"
    for line in first.stdout:  # the first holds the directory once it names its backend
        if "trainable parameters" in line:
            break
    first.send_signal(signal.SIGSTOP)  # paused, lock held: the second cannot outlive it
    try:
        second = subprocess.run(argv(tmp_path / "shared"), cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert second.returncode == 1
    assert second.stderr.strip() == (f"error: {run}: in use by another run (process "
                                     f"{first.pid}, lock .lock); wait for it to end or stop "
                                     "it; nothing here was changed")
    lone = subprocess.run(argv(tmp_path / "lone"), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert lone.returncode == 0, lone.stderr[-2000:]
    assert _stable(run) == _stable(tmp_path / "lone" / "table3" / "t3-crmn56x3" / "seed0")
    assert len(_stable(run)[0]) == 3 and not (run / ".lock").exists()


def test_lr_scales_the_stages_and_dataset_sets_the_classes():
    args = parser.parse(["table1", "--lr", "0.05", "--dataset", "cifar10"])
    model, train = plans.configs_for(paper.row("t1-resnet32x1"), args, seed=0,
                                     dataset="cifar10")
    assert train.lr_stages == pytest.approx((0.05, 0.005, 0.0005))  # the row's ratios
    assert model.classes == 10
    args = parser.parse(["table1"])
    model, train = plans.configs_for(paper.row("t1-resnet32x1"), args, seed=0)
    assert train.lr_stages == (0.1, 0.01, 0.001) and model.classes == 100
    for bad in ("nan", "-1", "0"):
        rc = cli.main(["table1", "--lr", bad, "--rows", "t1-resnet32x1"])
        assert rc == 2  # refused by the parser before anything is built


@pytest.mark.slow
def test_offline_table1_names_the_files_and_the_mirror_variable(tmp_path):
    """No network (the mirror points at a closed port): one line saying where to put the
    archive or its folder by hand and naming CRMN_DATA_MIRROR; nothing is built."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), CRMN_DATA_MIRROR=f"http://127.0.0.1:{port}/")
    p = subprocess.run([sys.executable, "-m", "crmn.cli", "table1", "--rows", "t1-resnet32x1",
                        "--backend", "torch", "--no-progress", "--data-dir",
                        str(tmp_path / "data"), "--out-dir", str(tmp_path / "runs")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and p.stderr.count("error: ") == 1
    assert "cifar-100-python.tar.gz" in line and "cifar-100-python/" in line
    assert "CRMN_DATA_MIRROR" in line
    assert "trainable parameters" not in p.stdout  # failed before building the network


def test_without_c_mode_theano_runs_in_jax_mode_and_c_is_refused(tmp_path, monkeypatch,
                                                                      run_main):
    """Where Theano's C mode cannot work (numpy 2, no compiler): --theano-mode c is a
    usage error in one line, before anything exists; without the flag the JAX mode runs."""
    from original import compat

    monkeypatch.setattr(compat, "c_mode_available", lambda: (False, "numpy is too new"))
    out = tmp_path / "out"
    rc, _, err = run_main(["table1", "--theano-mode", "c", "--out-dir", str(out)])
    assert rc == 2 and not out.exists()
    assert err == "run_experiments.sh table1: --theano-mode c: numpy is too new\n"
    plan = plans.train_plan(parser.parse(["table1", "--rows", "t1-crmn32x1"]))
    assert plan.backend_options.theano_mode == "jax"
    monkeypatch.setattr(compat, "c_mode_available", lambda: (True, ""))
    assert plans.train_plan(parser.parse(["table1"])).backend_options.theano_mode == "c"
