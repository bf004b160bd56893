"""export and evaluate: a finished run becomes a checksummed .pt, .npz and model card, and
any of those files (or an archive checkpoint) is measured on a test split with either backend.
"""
import hashlib
import json
import re
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the current environment has no torch

from crmn import checkpoint, export, paper, runlog
from crmn import plan as plans
from crmn.config import ModelConfig, TrainConfig
from crmn.errors import CheckpointError
from crmn.init import initial_state
from crmn.naming import count_trainable, param_specs
from crmn.registry import BackendOptions
from conftest import run_cli


def finished_run(root, row_id="t1-resnet32x1", seed=0, acc=0.5, data="official",
                 model=None, train=None):
    """A run folder as crmn.train leaves a finished run (the weights: crmn.init's)."""
    row = paper.row(row_id)
    cfg = ModelConfig(**dict(ModelConfig.for_row(row).to_dict(), **(model or {})))
    tcfg = TrainConfig.for_row(row, seed=seed, **(train or {}))
    run_dir = root / row.table / row_id / f"seed{seed}"
    run_dir.mkdir(parents=True)
    spec = plans.RunSpec(model=cfg, train=tcfg, dataset=row.dataset, data_dir=root / "data",
                         backend_options=BackendOptions(backend="torch"), row=row_id,
                         unverified_data=data == "unverified", experiment=row.table)
    runlog.write_json(run_dir / "config.json", {
        "config_format": plans.RECORD_FORMAT, **plans.spec_record(spec),
        "params": count_trainable(cfg), "seed": seed, "fake_data": data == "fake", "data": data,
        "versions": {"python": "3.11.7", "numpy": np.__version__}, "started": "2026"})
    line = dict(stage=0, lr=0.1, train_loss=1.0, train_acc=0.5, eval_loss=1.0, eval_acc=acc,
                seconds=2.0, images_per_s=10.0, decision="continue", time=0)
    runlog.rewrite_log(run_dir / "log.jsonl", [
        dict(line, phase="search", epoch=1, eval_split="val"),
        dict(line, phase="final", epoch=1, eval_split="test"),
        dict(line, phase="final", epoch=2, eval_split="test")])
    preprocessing = {"kind": "mean_pixel", "mean": [0.49, 0.48, 0.45], "min_std": None}
    runlog.write_json(run_dir / "summary.json", {
        "row": row_id, "experiment": row.table, "backend": "torch", "device": "cpu",
        "dataset": row.dataset, "params": count_trainable(cfg), "schedule_found": [1, 1, 0],
        "schedule_used": [1, 1, 0], "lr_stages": list(row.lr_stages), "test_loss": 1.0,
        "test_acc": acc, "final_epochs": 2, "sec_per_epoch": 2.0, "images_per_s": 10.0,
        "search_best": None, "fake_data": data == "fake", "data": data, "status": "done",
        "preprocessing": preprocessing})
    checkpoint.save(run_dir / "checkpoint.h5", initial_state(cfg, seed + 7), {
        "model": cfg.to_dict(), "train": tcfg.to_dict(), "backend": "torch",
        "dtype": "float32", "dataset": row.dataset, "phase": "final", "epoch": 2})
    return run_dir, cfg


def test_lasagne_order_is_get_all_params_order():
    from original.model import build  # first: importing original sets Theano's flags

    import lasagne

    from crmn import convert

    for cfg in (ModelConfig(n=2, k=0.5, classes=100, memory=True),
                ModelConfig(n=1, k=0.5, classes=10, memory=False),
                ModelConfig(n=1, k=0.5, classes=10, memory=True, peepholes=False)):
        zeros = {s.name: np.zeros(s.shape) for s in param_specs(cfg)}
        native = list(convert.canonical_to_lasagne(cfg, zeros, with_velocity=False))
        want = [p.name for p in lasagne.layers.get_all_params(build(cfg))]
        assert native != want  # the reordering is needed ...
        assert export.lasagne_order(native) == want  # ... and right


def test_export_writes_hashed_files_and_a_card(tmp_path):
    run_dir, cfg = finished_run(tmp_path, seed=1, acc=0.61)
    for seed, acc in ((0, 0.59), (2, 0.63)):
        finished_run(tmp_path, seed=seed, acc=acc)
    paths = export.export(run_dir, tmp_path / "out")
    for kind in ("pt", "npz"):
        digest = hashlib.sha256(paths[kind].read_bytes()).hexdigest()
        assert paths[kind].name == f"t1-resnet32x1-{digest[:8]}.{kind}"
    card = paths["card"].read_text()
    first = card.splitlines()[0]
    assert "a test of the paper's ResNet-32x1" in first and "NOT" not in first
    assert "69.53 %" in card  # the paper's number
    assert "61.00 % (this seed)" in card and "61.00 ± 2.00 % over 3 seeds" in card
    data = (tmp_path / "data").resolve()
    assert ("run_experiments.sh table1 --rows t1-resnet32x1 --seed 1 --no-progress --out-dir "
            f"reproduced --data-dir {data} --backend torch --device cpu`") in card
    assert (f"run_experiments.sh evaluate {paths['pt']} --dataset cifar100 --data-dir {data} "
            "--backend torch "
            "--device cpu`") in card
    assert "the official files" in card and "[1, 1, 0]" in card
    # the .pt: tensors and plain types; the state is the checkpoint's
    saved = torch.load(paths["pt"], weights_only=True)
    assert saved["model"] == cfg.to_dict() and saved["row"] == "t1-resnet32x1"
    want = initial_state(cfg, 8)
    cfg_back, canonical, _ = export.load_weights(paths["pt"])
    cfg_npz, canonical_npz, _ = export.load_weights(paths["npz"])
    assert cfg_back == cfg_npz == cfg
    for spec in param_specs(cfg):
        np.testing.assert_array_equal(canonical[spec.name], want[spec.name])
        np.testing.assert_array_equal(canonical_npz[spec.name], want[spec.name])
    with np.load(paths["npz"]) as f:
        assert len(f["names"]) == len(param_specs(cfg))
        assert list(f["names"][:3]) == ["conv0.W", "bn0.beta", "bn0.gamma"]


@pytest.mark.parametrize("change, why", [
    (dict(train={"epochs_cap": 3}), "epochs capped at 3 per stage"),
    (dict(model={"k": 2}), "k 2"),
    (dict(data="unverified"), "UNVERIFIED DATA"),
])
def test_a_run_that_is_no_test_says_so_first(tmp_path, change, why):
    run_dir, _ = finished_run(tmp_path, **change)
    card = export.export(run_dir)["card"].read_text()
    first = card.splitlines()[0]
    assert "NOT A TEST OF THE PAPER" in first and why in first
    command = re.search(r"\| reproduce \| `([^`]*)`", card).group(1)
    flag = {"train": "--epochs-cap 3", "model": "--k 2", "data": "--unverified-data"}
    assert flag[next(iter(change))] in command


def test_unfinished_run_is_refused_in_one_line(tmp_path):
    run_dir, _ = finished_run(tmp_path)
    (run_dir / "summary.json").unlink()
    proc = run_cli(["export", run_dir])
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "not a finished run" in proc.stderr
    assert not (run_dir / "export").exists()


def test_files_that_are_no_weights_are_refused(tmp_path):
    bad = tmp_path / "x.npz"
    np.savez(bad, a=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a weights file written by export"):
        export.load_weights(bad)
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(CheckpointError, match="unknown weights file type"):
        export.load_weights(tmp_path / "x.bin")
    with pytest.raises(CheckpointError, match="no such weights file"):
        export.load_weights(tmp_path / "missing.pt")


# --- weights are untrusted bytes: each refusal through the command line ------------------


def _tree(*folders):
    """sha256 of every file under ``folders`` (what a refusal must leave as it was)."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def _flip(path, offset):
    payload = bytearray(path.read_bytes())
    payload[offset] ^= 0xFF
    path.write_bytes(bytes(payload))


def _data_offset(path, member_end):
    """Offset of the first stored byte of the zip member whose name ends ``member_end``."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(member_end))
    head = path.read_bytes()[info.header_offset:info.header_offset + 30]
    return info.header_offset + 30 + int.from_bytes(head[26:28], "little") + \
        int.from_bytes(head[28:30], "little")


def _named(path):
    """``path`` renamed ``<row>-<sha8 of its bytes>.<ext>``, as export names a file."""
    sha8 = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    return path.rename(path.with_name(f"t1-resnet32x1-{sha8}{path.suffix}"))


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def _flipped(files, tmp_path, ext, member, offset):
    bad = tmp_path / files[ext].name
    bad.write_bytes(files[ext].read_bytes())
    _flip(bad, _data_offset(bad, member) + offset)
    return bad, "the name says sha256"


def _flipped_pt(files, tmp_path):
    return _flipped(files, tmp_path, "pt", "data/0", 2)


def _renamed_pt(files, tmp_path):
    return _named(_flipped_pt(files, tmp_path)[0]), "do not match the digest it carries"


def _flipped_npz(files, tmp_path):
    return _flipped(files, tmp_path, "npz", "conv0.W.npy", 200)


def _renamed_npz(files, tmp_path):
    return _named(_flipped_npz(files, tmp_path)[0]), "a damaged zip archive"


def _system_pt(files, tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"state_dict": _System(f"touch {marker}")}, tmp_path / "evil.pt")
    return _named(tmp_path / "evil.pt"), "asks for the Python global posix.system"


def _noise_pt(files, tmp_path):
    bad = tmp_path / "noise.pt"
    bad.write_bytes(np.random.default_rng(0).bytes(5000))
    return bad, "its bytes are neither a torch zip archive nor a pickle"


@pytest.mark.parametrize("make", [_flipped_pt, _renamed_pt, _flipped_npz, _renamed_npz,
                                  _system_pt, _noise_pt])
def test_weights_that_are_not_as_exported_are_refused_in_one_line(tmp_path, make):
    from crmn import data

    run_dir, _ = finished_run(tmp_path / "runs")
    files = export.export(run_dir)
    data_dir = tmp_path / "data"
    data.write_fake("cifar100", data_dir, n_train=20, n_test=10)
    (tmp_path / "in").mkdir()
    bad, why = make(files, tmp_path / "in")
    before = _tree(tmp_path)
    proc = run_cli(["evaluate", bad, "--backend", "torch", "--data-dir", data_dir])
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert str(bad) in proc.stderr and why in proc.stderr, proc.stderr
    assert "weights_only" not in proc.stdout + proc.stderr
    assert _tree(tmp_path) == before  # no marker file, nothing written or changed
    assert not (tmp_path / "in" / "MARKER").exists()


def test_digests_catch_what_a_name_cannot(tmp_path):
    run_dir, _ = finished_run(tmp_path)
    files = export.export(run_dir)
    with np.load(files["npz"]) as f:
        arrays = {str(k): f[str(k)] for k in f["names"]}
        record = json.loads(str(f["meta"]))
    assert record["format"] == 2 and record["preprocessing"]["kind"] == "mean_pixel"
    del record["digest"]
    from crmn import weights

    want = weights.digest(arrays, record)
    arrays["conv0.W"] = arrays["conv0.W"].copy()
    arrays["conv0.W"].flat[0] = np.nextafter(arrays["conv0.W"].flat[0], np.float32(1))
    assert weights.digest(arrays, record) != want  # one ulp
    arrays["conv0.W"] = arrays["conv0.W"].reshape(-1)
    assert weights.digest(arrays, record) != want  # a shape
    record["preprocessing"]["mean"][0] = 0.5
    assert weights.digest(arrays, record) != want  # the record
    # a .pt without a digest (an export of format 1) is refused: nothing vouches for it
    saved = torch.load(files["pt"], weights_only=True)
    del saved["digest"]
    torch.save(saved, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="carries no digest of its arrays"):
        export.load_weights(tmp_path / "old.pt")


# --- the whole way: smoke -> export -> evaluate, on both backends --------------------------


@pytest.fixture(scope="module")
def smoke_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    proc = run_cli(["smoke", "--backend", "torch", "--out-dir", out, "--no-progress"],
                   timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = out / "smoke" / "tiny-crmn-n1-k0.5" / "seed0"
    proc = run_cli(["export", run_dir], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = {p.suffix: p for p in (run_dir / "export").iterdir()}
    return run_dir, out / "smoke" / "data", files


@pytest.mark.slow
def test_evaluate_gives_the_logged_accuracy_on_both_backends(smoke_export):
    run_dir, data_dir, files = smoke_export
    summary = runlog.read_json(run_dir / "summary.json")
    for weights, backend in ((files[".pt"], "torch"), (files[".npz"], "theano"),
                             (run_dir / "checkpoint.h5", "torch")):
        proc = run_cli(["evaluate", weights, "--backend", backend, "--data-dir", data_dir],
                       timeout=1200)
        assert proc.returncode == 0, proc.stderr[-2000:]
        shown = re.search(r"test accuracy ([\d.]+) % \((\d+) of (\d+)", proc.stdout)
        assert shown.group(1) == f"{100 * summary['test_acc']:.2f}", proc.stdout
        assert int(shown.group(2)) / int(shown.group(3)) == summary["test_acc"]
        loss = float(re.search(r"loss ([\d.]+)", proc.stdout).group(1))
        assert loss == pytest.approx(summary["test_loss"], rel=1e-5)


@pytest.mark.slow
def test_npz_in_lasagne_and_pt_in_torch_give_equal_float64_logits(smoke_export):
    from original.model import build  # first: importing original sets Theano's flags

    import lasagne
    import theano
    import theano.tensor as T

    from modern.model import CIFARNet

    _, _, files = smoke_export
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32))
    with np.load(files[".npz"]) as f:
        cfg = ModelConfig(**json.loads(str(f["meta"]))["model"])
        with theano.config.change_flags(floatX="float64"):
            images = T.tensor4("x", dtype="float64")
            net = build(cfg, input_var=images)
            lasagne.layers.set_all_param_values(
                net, [f[k].astype(np.float64) for k in f["names"]])
            logits = theano.function([images], lasagne.layers.get_output(
                net.input_layer, deterministic=True))(x)
    saved = torch.load(files[".pt"], weights_only=True)
    model = CIFARNet(ModelConfig(**saved["model"])).double()
    model.load_state_dict(saved["state_dict"])
    with torch.no_grad():
        want = model(torch.from_numpy(x), training=False).numpy()
    assert np.abs(logits - want).max() <= 1e-10 * np.abs(want).max()


@pytest.mark.slow
def test_card_names_the_files_sha256_as_sha256sum_does(smoke_export):
    run_dir, _, files = smoke_export
    card = files[".md"].read_text()
    assert card.splitlines()[0].startswith("# tiny-crmn-n1-k0.5, seed 0: NOT A TEST OF THE "
                                           "PAPER (not a row of the paper; FAKE DATA")
    for name in (files[".pt"].name, files[".npz"].name):
        line = subprocess.run(["sha256sum", name], cwd=files[".pt"].parent, text=True,
                              capture_output=True, check=True).stdout.strip()
        assert line in card.splitlines()
    check = subprocess.run(["sha256sum", "-c", "--quiet", "-"], cwd=files[".pt"].parent,
                           input=card.split("```")[1], text=True, capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert ("run_experiments.sh smoke --seed 0 --no-progress --out-dir reproduced --backend "
            "torch --device cpu`") in card  # smoke's fake data are made again from seed 0
    assert f"evaluate {files['.pt'].resolve()} --dataset cifar100 --data-dir " in card
