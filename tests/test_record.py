"""The record is the run (issue 32): config.json holds the whole spec, read back equal; its
provenance says which code, libraries and machine ran it; ``--resume`` refuses another run's
options or data in one line, changing nothing; ``replay`` of a run says "same"."""
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from crmn import data, provenance, runlog
from crmn import plan as plans
from crmn.config import ModelConfig, TrainConfig
from crmn.errors import CheckpointError, ConfigError
from crmn.registry import BackendOptions
from crmn.runstate import RunFolder

ROOT = Path(__file__).resolve().parents[1]


def odd_spec(tmp_path, **backend):
    """A spec whose every field differs from its default where it can."""
    model = ModelConfig(n=2, k=0.25, classes=10, memory=True, lstm_units=7, forget_bias=-2.5,
                        gate_bias=0.5, outgate="tanh", peepholes=False, dense_init="glorot")
    train = TrainConfig(batch_size=20, lr_stages=(0.2, 0.02), momentum=0.8, nesterov=True,
                        weight_decay=5e-4, patience=3, val_fraction=0.2, flip=True, pad=2,
                        epochs_cap=4, schedule=(2, 1), seed=5)
    options = dict(backend="theano", device="cuda", dtype="float64", theano_mode="jax",
                   compile_cache=False)
    return plans.RunSpec(model=model, train=train, dataset="cifar10", data_dir=tmp_path / "d",
                         backend_options=BackendOptions(**dict(options, **backend)), unverified_data=True,
                         subset=300, row="t1-crmn32x1", experiment="table1")


def record_of(spec):
    return {"config_format": plans.RECORD_FORMAT, **plans.spec_record(spec)}


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return value + value[-1:]
    if value is None:
        return 1
    return value + "x"


def test_every_schema_field_is_recorded_and_read_back(tmp_path):
    spec = odd_spec(tmp_path)
    record = json.loads(json.dumps(record_of(spec)))  # as config.json gives it back
    assert plans.spec_from_record(record) == spec
    names = [name for name, _ in plans.spec_fields()]
    assert {"subset", "data_dir", "backend_options.backend", "model.n", "train.seed"} <= set(names)
    assert "stack" not in json.dumps(sorted(record))  # its fields flat, as ever
    for name in names:
        *section, key = plans.disk_key(name)
        assert plans.recorded(record, name) is not KeyError, name
        removed = json.loads(json.dumps(record))
        del (removed[section[0]] if section else removed)[key]
        with pytest.raises(ConfigError, match=f"records no {name}"):
            plans.spec_from_record(removed)
        changed = json.loads(json.dumps(record))
        where = changed[section[0]] if section else changed
        where[key] = _changed(where[key])
        try:
            assert plans.spec_from_record(changed) != spec, name
        except ConfigError:
            pass  # the changed value is no valid spec: it does not read back either
    with pytest.raises(ConfigError, match="written before config.json held the whole run"):
        plans.spec_from_record(plans.spec_record(spec))  # no config_format


def test_recorded_versions_and_revision_are_the_machines():
    got = provenance.versions()
    for name, dists in provenance.DISTRIBUTIONS.items():
        installed = [d for d in dists if _has(d)]
        if installed:
            assert got[name] == importlib.metadata.version(installed[0])
        else:
            assert name not in got
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("no git checkout here: the revision is the sources' hash")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert provenance.revision()["commit"] == head


def _has(dist):
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_an_uncommitted_change_flips_the_dirty_flag(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    (repo / "crmn").mkdir(parents=True)
    (repo / "crmn" / "a.py").write_text("x = 1\n")
    no_git = provenance.revision(repo)
    assert set(no_git) == {"sources_sha256"}

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c",
                               "user.email=t@t", *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "one")
    clean = provenance.revision(repo)
    assert clean == {"commit": git("rev-parse", "HEAD"), "dirty": False}
    (repo / "crmn" / "a.py").write_text("x = 2\n")
    assert provenance.revision(repo) == dict(clean, dirty=True)
    shutil.rmtree(repo / ".git")
    assert provenance.revision(repo)["sources_sha256"] != no_git["sources_sha256"]


class _Ran:
    device = "cpu"

    def param_count(self):
        return 11


def test_config_json_of_a_jax_mode_run_names_jax_jaxlib_and_the_revision(tmp_path):
    spec = odd_spec(tmp_path, device="cpu")
    assert spec.backend_options.theano_mode == "jax"
    folder = RunFolder(tmp_path / "run", spec)
    folder.dir.mkdir()
    folder.write_config(_Ran(), "unverified", None, "md5:0")
    config = runlog.read_json(folder.path(runlog.CONFIG))
    assert plans.spec_from_record(config) == spec
    for name in ("jax", "jaxlib"):
        if _has(name):
            assert config["versions"][name] == importlib.metadata.version(name)
        else:
            pytest.skip(f"{name} is not installed here")
    assert set(config["revision"]) in ({"commit", "dirty"}, {"sources_sha256"})
    assert config["threads"]["cpus"] >= 1 and config["data_fingerprint"] == "md5:0"
    assert set(config["flags"]) >= {"THEANO_FLAGS", "XLA_FLAGS"}


def test_a_run_folder_of_the_earlier_format_is_compared_by_what_it_says(tmp_path):
    """config.json before config_format 2: the subset was prose, the device another key."""
    spec = dataclasses.replace(odd_spec(tmp_path, device="cpu"), subset=100)
    folder = RunFolder(tmp_path / "run", spec)
    folder.dir.mkdir()
    old = {k: v for k, v in record_of(spec).items()
           if k not in ("config_format", "subset", "data_dir", "unverified_data")}
    old.update(data="unverified", device="cpu (numpy)", device_requested="cpu",
               data_description="a quick look on 200 training images (--subset)")
    runlog.write_json(folder.path(runlog.CONFIG), old)
    with pytest.raises(CheckpointError, match="subset is 100 here, 200 in the run's config"):
        folder.check_same_run("md5:1")
    old["data_description"] = "a quick look on 100 training images (--subset)"
    runlog.write_json(folder.path(runlog.CONFIG), old)
    folder.check_same_run("md5:1")  # no fingerprint recorded: not compared


# --- through the command line, a tiny torch run -------------------------------------------

torch_needed = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                  reason="torch is not installed (the current environment)")


def tiny_argv(data_dir, out_dir, *extra):
    return ["table1", "--rows", "t1-resnet32x1", "--dataset", "cifar10", "--backend", "torch",
            "--device", "cpu", "--n", "1", "--k", "0.25", "--batch-size", "50", "--schedule",
            "1,0,0", "--seed", "0", "--no-progress", "--data-dir", str(data_dir),
            "--out-dir", str(out_dir), *extra]


def tree_hash(*roots):
    h = hashlib.sha256()
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            h.update(str(p).encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("record")
    for seed, name in ((0, "d1"), (1, "d2")):
        data.write_fake("cifar10", root / name, 200, 50, seed=seed)
    from crmn import cli
    assert cli.main(tiny_argv(root / "d1", root / "runs", "--subset", "100")) == 0
    return root, root / "runs" / "table1" / "t1-resnet32x1" / "seed0"


@torch_needed
@pytest.mark.parametrize("change, what", [
    (dict(data="d2"), "the fingerprint of the data in"),
    (dict(subset="120"), "subset is 120 here, 100 in the run's config.json"),
])
def test_resume_of_another_run_is_refused_in_one_line(tiny_run, run_main, change, what):
    root, run_dir = tiny_run
    before = tree_hash(run_dir, root / "d1", root / "d2")
    argv = tiny_argv(root / change.get("data", "d1"), root / "runs", "--resume", "--subset",
                     change.get("subset", "100"))
    rc, out, err = run_main(argv)
    assert rc == 1 and err.count("\n") == 1 and what in err and "--out-dir" in err
    assert tree_hash(run_dir, root / "d1", root / "d2") == before


@torch_needed
def test_resume_from_moved_data_and_replay_say_same(tiny_run, run_main, tmp_path):
    root, run_dir = tiny_run
    moved = tmp_path / "moved"
    shutil.copytree(root / "d1", moved)
    rc, out, err = run_main(tiny_argv(moved, root / "runs", "--resume", "--subset", "100"))
    assert rc == 0 and "already finished" in out, err
    spec = plans.spec_from_record(runlog.read_json(run_dir / "config.json"))
    assert spec.subset == 100 and spec.data_dir == (root / "d1").resolve()
    rc, out, err = run_main(["replay", str(run_dir), "--out-dir", str(tmp_path / "again")])
    assert rc == 0 and out.splitlines()[-1] == "same", out + err
    rc, out, err = run_main(["replay", str(run_dir), "--out-dir", str(run_dir / "x")])
    assert rc == 2 and "inside the run it checks" in err


def _fabricated(path, acc, **config):
    """A finished run folder's log, summary and config.json as replay reads them."""
    path.mkdir(parents=True)
    line = dict(phase="final", stage=0, lr=0.1, train_loss=1.0, train_acc=0.5,
                eval_split="test", eval_loss=1.0, decision="continue", seconds=3.0, time=1.0)
    runlog.rewrite_log(path / "log.jsonl", [dict(line, epoch=1, eval_acc=0.5),
                                            dict(line, epoch=2, eval_acc=acc, seconds=9.0)])
    runlog.write_json(path / "summary.json", {"test_acc": acc, "status": "done",
                                              "sec_per_epoch": 3.0, "device": "cpu"})
    runlog.write_json(path / "config.json", dict({"versions": {"torch": "2.13.0"},
                                                  "threads": {"cpus": 2}}, **config))
    return path


def test_replay_names_the_first_epoch_that_differs_and_what_the_machine_changes(tmp_path):
    from crmn import replay
    old = _fabricated(tmp_path / "old", 0.75)
    line, same = replay.verdict(old, _fabricated(tmp_path / "same", 0.75))
    assert (line, same) == ("same", True)  # seconds and dates are left out
    line, same = replay.verdict(old, _fabricated(tmp_path / "new", 0.5, threads={"cpus": 4}))
    assert not same and line.startswith("differs: final epoch 2 differs first: eval_acc "
                                        "0.75 recorded, 0.5 now (by 0.25)")
    assert "threads.cpus 2 -> 4" in line and "bit-identical" in line


def test_replay_refuses_a_history_resumed_on_another_backend(tmp_path, run_main):
    spec = odd_spec(tmp_path, device="cpu")
    run_dir = _fabricated(tmp_path / "run", 0.5, **record_of(spec), resumes=[
        {"phase": "final", "after_epoch": 1, "backend": "torch", "dtype": "float64"}])
    rc, out, err = run_main(["replay", str(run_dir)])
    assert rc == 1 and err.count("\n") == 1
    assert "resumed after final epoch 1 with backend theano -> torch" in err
    assert not (tmp_path / "replay-run").exists()


def test_a_run_folder_written_before_config_format_2_still_resumes_and_reports(tmp_path):
    from crmn import report
    from toy_backend import SimulatedCrash, run_toy
    run_dir = tmp_path / "table1" / "toy" / "seed3"
    with pytest.raises(SimulatedCrash):
        run_toy(run_dir, crash_after=1)
    new = runlog.read_json(run_dir / "config.json")
    old = {k: new[k] for k in ("row", "experiment", "dataset", "backend", "dtype", "compile",
                               "theano_mode", "compile_cache", "params", "model", "train",
                               "seed", "data", "data_description", "versions", "started")}
    old.update(device="cpu (numpy)", device_requested="cpu",  # as main wrote it
               fake_data=new["data"] == "fake")
    runlog.write_json(run_dir / "config.json", old)
    summary = run_toy(run_dir, resume=True)
    assert summary["status"] == "done"
    config = runlog.read_json(run_dir / "config.json")
    assert "config_format" not in config and config["resumes"][0]["after_epoch"] == 1
    assert report.compare(tmp_path / "table1", plots=False).is_file()
