"""Every command as a user meets it: each `--help`, each run with the least arguments that
make it quick on the CPU against the exit code it should give, one meaning per option; and
the weak messages of issue 32, each one line with the way on, the folders unchanged."""
import errno
import hashlib
import io
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from crmn import checkpoint, cli, registry
from crmn.data import images

from cli_helpers import command_names, command_options
from toy_backend import ToyBackend

ROOT = Path(__file__).resolve().parent.parent


def _commands():
    return command_names()


def _one_line(err: str) -> str:
    """The error: one line, the last (warnings may come before it), no repr, no traceback."""
    lines = err.splitlines()
    assert [ln for ln in lines if ln.startswith(("error:", "run_experiments.sh"))] == lines[-1:]
    assert " at 0x" not in err and "Traceback" not in err, err
    return lines[-1]


def _digest(*roots):
    """Every path under ``roots`` (hidden ones too) with its bytes' sha256."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for root in roots if root.exists() for p in sorted(root.rglob("*"))}


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CRMN_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture
def toy(monkeypatch):
    """``--backend torch`` trains the toy backend (tests/toy_backend.py): the loop in seconds."""
    monkeypatch.setattr(registry, "probe", lambda options: None)
    monkeypatch.setattr(registry, "build",
                        lambda options, model, train, **kw: ToyBackend(model, train))


# ---------------------------------------------------------------------------------------
# each option declared once, each help true

@pytest.mark.current
@pytest.mark.parametrize("command", sorted(set(_commands()) - {"test"}))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    assert f"usage: run_experiments.sh {command}" in capsys.readouterr().out


@pytest.mark.current
def test_an_option_means_one_thing_in_every_command():
    """The same flag has one argument form (metavar or choices, or none) everywhere, and the
    options shared by several commands are shared (tests/test_schema.py: declared once); the
    output folder has one name."""
    seen = {}
    for name in set(_commands()) - {"test"}:
        for flag, words in command_options(name).items():
            seen.setdefault(flag, {}).setdefault(words, []).append(name)
    assert "--out" not in seen
    split = {flag: shapes for flag, shapes in seen.items() if len(shapes) > 1}
    assert not split, split
    for flag in ("--device", "--lr", "--seed", "--dataset", "--out-dir", "--json"):
        assert len(next(iter(seen[flag].values()))) >= 2, flag  # shared, declared once
    params = {f for f in seen if "params" in sum(seen[f].values(), [])}
    assert not params & {"--compile", "--dtype", "--theano-mode", "--device"}
    evaluate = {f for f in seen if "evaluate" in sum(seen[f].values(), [])}
    assert {"--data-dir", "--subset", "--unverified-data", "--theano-mode", "--dtype"} <= evaluate


def _no_gpu() -> bool:
    return registry.no_gpu("cuda") is not None


#: each command with the least arguments that make it quick on the CPU, and its exit code;
#: {tmp}: the test's folder. `verify` on the CPU compiles both backends for minutes (see
#: tests/test_verify.py): here its refusal of a GPU that is not there.
QUICK = {
    "table1": (["--rows", "t1-resnet32x1", "--dry-run", "--out-dir", "{tmp}"], 0),
    "table2": (["--rows", "t2-crmn32x4", "--seed", "0", "--dry-run"], 0),
    "table3": (["--rows", "t3-crmn56x3", "--dry-run"], 0),
    "svhn": (["--dry-run", "--subset", "1000"], 0),
    "smoke": (["--dry-run", "--out-dir", "{tmp}"], 0),
    "params": (["--rows", "t1-resnet32x1", "--backend", "torch", "--json", "{tmp}/p.json"], 0),
    "compare": (["{tmp}/no-runs"], 1),
    "status": (["{tmp}"], 1),  # no grid launched here
    "verify": (["--device", "cuda"], 2),
    "bench": (["--backend", "torch", "--rows", "t1-resnet32x1", "--steps", "1", "--warmup",
               "1", "--batch-size", "2", "--json", "{tmp}/b.json"], 0),
    "profile": ([], 2),  # timing needs a GPU: one line saying so (the CPU way: below)
    "gpucheck": ([], 2),  # likewise
    "export": (["{tmp}/no-run"], 1),
    "evaluate": (["{tmp}/none.pt"], 1),
    "replay": (["{tmp}/no-run"], 1),
    "lasagne": (["{tmp}/no-script.py"], 2),  # its examples run in tests/test_lasagne_examples.py
}
CPU_WAYS = {"profile": (["--count-ops", "--variants", "fp32", "--batch-size", "2"], 0),
            "gpucheck": (["--device", "cpu", "--quick", "--budget", "1", "--out-dir",
                          "{tmp}/gc"], 0)}


def test_every_command_is_listed_here():
    assert set(_commands()) - {"test"} == set(QUICK)


@pytest.mark.parametrize("command", sorted(QUICK))
def test_every_command_runs_quick_with_its_exit_code(command, here, run_main):
    if command not in _commands():
        pytest.skip(f"no {command} command in this tree")
    if command in ("params", "bench", "profile"):
        pytest.importorskip("modern.backend")
    cases = [QUICK[command]] + ([CPU_WAYS[command]] if command in CPU_WAYS else [])
    if command in ("verify", "profile", "gpucheck") and not _no_gpu():
        cases = cases[1:]  # a GPU here: the refusal cannot be shown
    for argv, want in cases:
        t0 = time.monotonic()
        rc, out, err = run_main([command, *(a.format(tmp=here) for a in argv)])
        assert rc == want, (argv, err[-2000:])
        if rc:
            _one_line(err)
        if rc == 2 and command in ("verify", "profile", "gpucheck"):  # no GPU: they say why
            assert "GPU" in err, err
        assert time.monotonic() - t0 < 60, argv
    if command == "params":
        assert '"row": "t1-resnet32x1"' in (here / "p.json").read_text() and "|" in out


def test_json_dash_prints_json_instead_of_the_table(run_main):
    pytest.importorskip("modern.backend")
    rc, out, _ = run_main(["params", "--rows", "t1-resnet32x1", "--backend", "torch",
                           "--json", "-"])
    assert rc == 0 and out.lstrip().startswith("[") and "|" not in out


def test_evaluate_uses_the_data_and_engine_options_it_takes(here, run_main, monkeypatch):
    """--subset, --unverified-data, --data-dir reach the data; --dtype, --theano-mode the
    backend (the weights and the data stand in: the options' way through is what is shown)."""
    from crmn import data, export
    from crmn.config import ModelConfig
    from crmn.errors import DataError

    seen = {}
    monkeypatch.setattr(export, "load_weights", lambda path: (
        ModelConfig(n=1, k=0.5, classes=10, memory=False), {}, {"dataset": "cifar10",
                                                                "dtype": "float32"}))
    monkeypatch.setattr(registry, "probe", lambda options: seen.update(backend=options))

    def prepare(name, data_dir, phase, seed, **kw):
        seen.update(data=(name, str(data_dir), phase, kw["subset"], kw["unverified"]))
        raise DataError("stop here")

    monkeypatch.setattr(data, "prepare", prepare)
    rc, _, err = run_main(["evaluate", "w.pt", "--backend", "theano", "--theano-mode", "jax",
                           "--dtype", "float64", "--data-dir", str(here / "imgs"),
                           "--subset", "500", "--unverified-data"])
    assert rc == 1 and _one_line(err) == "error: stop here"
    assert seen["data"] == ("cifar10", str(here / "imgs"), "final", 500, True)
    assert (seen["backend"].backend, seen["backend"].theano_mode, seen["backend"].dtype) == (
        "theano", "jax", "float64")


# ---------------------------------------------------------------------------------------
# the weak messages, each through the command line: one line, the way on, nothing changed

def _png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    px = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(px).save(buf, format="PNG")
    return buf.getvalue()


JUNK = {".DS_Store": b"\0\0\0\1Bud1", "Thumbs.db": b"\xd0\xcf\x11\xe0", "desktop.ini":
        b"[.ShellClassInfo]\r\n", "._0000.png": b"\0\5\26\7AppleDouble"}


def _images(root: Path, splits=("train", "test"), junk: bool = False) -> Path:
    """CIFAR-10 as image folders: 2 train and 1 test PNG per class (file-browser junk too)."""
    for split in splits:
        for label, cls in enumerate(images.CLASSES["cifar10"]):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for k in range(2 if split == "train" else 1):
                (folder / f"{k:04d}.png").write_bytes(_png(hash((split, label, k)) % 2**32))
            for name, blob in JUNK.items() if junk else ():
                (folder / name).write_bytes(blob)
    if junk:
        (root / "__MACOSX" / "train").mkdir(parents=True)
        (root / "__MACOSX" / "train" / "._x.png").write_bytes(b"junk")
    return root


def _zip(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(folder.rglob("*")):
            z.write(p, p.relative_to(folder).as_posix())
    return archive


def _train(data_dir, out, *extra):
    return ["table1", "--rows", "t1-resnet32x1", "--seed", "0", "--dataset", "cifar10",
            "--backend", "torch", "--device", "cpu", "--data-dir", str(data_dir), "--subset",
            "20", "--schedule", "1,0,0", "--batch-size", "10", "--no-progress", "--out-dir",
            str(out), *extra]


def test_disk_full_while_checkpointing_says_free_space_then_resume(here, toy, run_main,
                                                                  monkeypatch):
    data = _images(here / "imgs")
    before = _digest(data)

    def full(path, blob):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_temp", full)
    rc, _, err = run_main(_train(data, here / "out"))
    assert rc == 1 and "No space left on device" in _one_line(err)
    assert "free disk space, then run the same command with --resume" in err
    assert _digest(data) == before
    run = here / "out" / "table1" / "t1-resnet32x1" / "seed0"
    assert not list(run.glob("*.h5")) and not list(run.glob(".*.tmp"))


def test_train_without_test_says_test_is_missing_and_writes_nothing(here, toy, run_main,
                                                                   offline):
    data = _images(here / "imgs", splits=("train",))
    before = _digest(data)
    rc, _, err = run_main(_train(data, here / "out"))
    assert rc == 1 and "train/ is there but test/ is missing" in _one_line(err)
    assert "download" not in err and offline not in err
    assert _digest(data) == before  # no .cifar10.lock, no download copied in
    assert not (here / "out" / "table1").exists()


def test_a_failed_download_leaves_no_empty_run_folder(here, toy, run_main, offline,
                                                      monkeypatch):
    from crmn.data import sources

    monkeypatch.setattr(sources, "_RETRY_WAIT_S", 0)
    (here / "empty").mkdir()
    argv = _train(here / "empty", here / "out")
    rc, _, err = run_main(argv[:argv.index("--subset")] + argv[argv.index("--schedule"):])
    assert rc == 1 and "cannot download" in _one_line(err) and offline in err
    assert not (here / "out" / "table1").exists()


@pytest.mark.parametrize("packed", [False, True])
def test_file_browser_junk_is_skipped_in_folders_and_archives(here, toy, run_main, packed):
    data = _images(here / "imgs", junk=True)
    if packed:
        data = _zip(data, here / "imgs.zip")
    before = _digest(here / "imgs")
    rc, out, err = run_main(_train(data, here / "out"))
    assert rc == 0, err
    assert "(decoded, now cached)" in out
    assert _digest(here / "imgs") == before


def test_a_damaged_image_is_named_without_a_python_repr(here, toy, run_main):
    data = _images(here / "imgs")
    (data / "train" / "cat" / "0001.png").write_bytes(b"not an image at all")
    before = _digest(data)
    rc, _, err = run_main(_train(data, here / "out"))
    assert rc == 1 and "train/cat/0001.png" in _one_line(err)
    assert "not a PNG or JPEG file" in err and "BytesIO" not in err
    assert _digest(data) == before and not (here / "out").exists()


@pytest.mark.parametrize("extra, least", [(["--schedule", "1,0,0"], 10), ([], 11)])
def test_a_subset_too_small_is_refused_at_plan_time_with_the_least_that_works(
        here, toy, run_main, extra, least):
    data = _images(here / "imgs")
    before = _digest(data)
    argv = _train(data, here / "out")
    argv[argv.index("--subset") + 1] = "5"
    del argv[argv.index("--schedule"):argv.index("--schedule") + 2]
    rc, _, err = run_main(argv + extra)
    assert rc == 1 and f"give --subset {least} or more" in _one_line(err)
    assert _digest(data) == before and not (here / "out").exists()
    argv[argv.index("--subset") + 1] = str(least)  # the least that works is accepted
    assert run_main([*argv, *extra, "--dry-run"])[0] == 0


def test_a_read_only_cache_never_says_now_cached(here, toy, run_main, monkeypatch):
    data = _images(here / "imgs")

    def refused(path, blob):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(images, "replace_file", refused)
    before = _digest(data)
    rc, out, err = run_main(_train(data, here / "out"))
    assert rc == 0, err
    assert _digest(data) == before
    assert "could not write" in err and "not kept" in err
    assert "now cached" not in out and "(decoded)" in out


def test_a_killed_cache_write_leaves_no_temporary_for_good(here, toy, run_main):
    data = _images(here / "imgs")
    cache = here / "cache" / "data"
    cache.mkdir(parents=True, mode=0o700)
    (here / "cache").chmod(0o700)
    old, new = cache / ".x.npz.abc123.tmp", cache / ".y.npz.def456.tmp"
    for tmp in (old, new):
        tmp.write_bytes(b"\0" * 1000)
    hours_ago = time.time() - 2 * images.STALE_S
    os.utime(old, (hours_ago, hours_ago))
    before = _digest(data)
    rc, out, err = run_main(_train(data, here / "out"))
    assert rc == 0, err
    assert _digest(data) == before
    assert not old.exists() and new.exists()  # a live write's temporary is left alone


def test_theano_on_cuda_without_a_gpu_says_there_is_none(here, run_main):
    pytest.importorskip("original.backend")
    if not _no_gpu():
        pytest.skip("a GPU is here")
    before = _digest(here)
    for mode in ("c", "jax"):
        rc, _, err = run_main(["table1", "--rows", "t1-resnet32x1", "--backend", "theano",
                               "--theano-mode", mode, "--device", "cuda", "--dry-run"])
        assert rc == 2 and "there is no GPU here" in _one_line(err)
        assert "--device cpu" in err and "THEANO_FLAGS" not in err
        assert "--theano-mode jax" not in err and "requirements-gpu" not in err
    assert _digest(here) == before
