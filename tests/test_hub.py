"""hubconf.py: the torch.hub entries load with torch and numpy only, one per paper row, and
``pretrained=True`` either loads a released file with its hash checked or says in one
sentence that none is released; an exported .pt, with its recorded preprocessing, gives its
run's test accuracy from raw uint8 images."""
import hashlib
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the current environment has no torch

from crmn import paper, runlog, weights
from crmn.config import ModelConfig
from crmn.errors import CheckpointError, ConfigError

from conftest import ROOT, run_cli

# a process in which importing these fails, whoever asks
REFUSE = """
import sys
class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"theano", "h5py", "jax", "jaxlib", "lasagne"}:
            raise ImportError(f"{name} may not be imported here")
sys.meta_path.insert(0, _Refuse())
"""

LOAD = """
import json, sys, torch
def no_download(*args, **kwargs):
    raise AssertionError("a download was attempted")
torch.hub.download_url_to_file = no_download
model = torch.hub.load(sys.argv[1], "t1_crmn32x4", source="local")
out = {"params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
try:
    torch.hub.load(sys.argv[1], "t1_crmn32x4", source="local", pretrained=True)
except Exception as e:
    out["error"] = [type(e).__name__, str(e)]
out["modules"] = sorted(m for m in sys.modules
                        if m.split(".")[0] in {"theano", "h5py", "jax", "lasagne"})
print(json.dumps(out))
"""


def _hubconf():
    spec = importlib.util.spec_from_file_location("hubconf_under_test", ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hub_load_needs_only_torch_and_numpy(tmp_path):
    # the refusal works: importing h5py fails in such a process
    probe = subprocess.run([sys.executable, "-c", REFUSE + "import h5py"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "may not be imported here" in probe.stderr
    proc = subprocess.run([sys.executable, "-c", REFUSE + LOAD, str(ROOT)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["params"] == 14_013_816
    assert out["modules"] == []
    kind, message = out["error"]
    assert kind == "ConfigError"
    assert message == ("No pretrained weights for t1-crmn32x4 have been released with this "
                       "archive yet; make them from a finished run with `bash "
                       "run_experiments.sh export RUN_DIR` and load that file with "
                       "exported(path).")


def test_one_entry_per_row_with_its_configuration(monkeypatch):
    hub = _hubconf()
    monkeypatch.setattr(hub, "_build", lambda cfg, seed: cfg)  # no 50 M-parameter builds
    entries = {name for name in dir(hub) if callable(getattr(hub, name))
               and not name.startswith("_")}
    names = {r.id.replace("-", "_").replace(".", "_"): r for r in paper.ROWS}
    assert entries == set(names) | {"crmn", "resnet", "exported"}
    for name, row in names.items():
        assert getattr(hub, name)() == ModelConfig.for_row(row), name
    assert hub.crmn(n=5, k=4, num_classes=100) == ModelConfig.for_row(paper.row("t1-crmn32x4"))
    assert hub.resnet(n=22, k=1) == ModelConfig.for_row(paper.row("t1-resnet134x1"))
    assert hub.dependencies == ["torch", "numpy"]


def test_module_mode_selects_batch_norm_statistics():
    hub = _hubconf()
    net = hub.crmn(n=1, k=0.5, num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x, training=False))
        assert not torch.allclose(net(x), net(x, training=True))
    before = net.bn0.mean.clone()
    net.train()
    net(x)  # a training forward moves the running averages, as torch's BatchNorm does
    assert not torch.equal(before, net.bn0.mean)


def _release(tmp_path, row_id, seed, sha_chars=None):
    """A .pt as export writes it for ``row_id`` (weights of ``seed``), named by its hash."""
    from modern.model import build

    cfg = ModelConfig.for_row(paper.row(row_id))
    path = tmp_path / "tmp.pt"
    record = {"format": 2, "row": row_id, "model": cfg.to_dict(), "dataset": "cifar100",
              "dtype": "float32", "preprocessing": {"kind": "mean_pixel",
                                                    "mean": [0.5, 0.5, 0.5], "min_std": None}}
    state = build(cfg, seed).state_dict()
    torch.save(dict(record, state_dict=state, digest=weights.digest(
        {k: v.numpy() for k, v in state.items()}, record)), path)
    sha = sha_chars or hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    named = path.rename(tmp_path / f"{row_id}-{sha}.pt")
    return named, build(cfg, seed)


def test_pretrained_loads_a_release_and_checks_its_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    hub = _hubconf()
    path, want = _release(tmp_path, "t1-resnet32x1", seed=3)
    monkeypatch.setitem(hub.RELEASES, "t1-resnet32x1", path.as_uri())
    got = hub.t1_resnet32x1(pretrained=True)
    for name, tensor in want.state_dict().items():
        assert torch.equal(got.state_dict()[name], tensor), name
    assert not torch.equal(hub.t1_resnet32x1().conv0.weight, want.conv0.weight)
    (tmp_path / "bad").mkdir()
    bad, _ = _release(tmp_path / "bad", "t1-resnet32x1", seed=4, sha_chars="00000000")
    monkeypatch.setitem(hub.RELEASES, "t1-resnet32x1", bad.as_uri())
    with pytest.raises(CheckpointError, match="the name says sha256 00000000"):
        hub.t1_resnet32x1(pretrained=True)
    assert not list((tmp_path / "torch-home").rglob("*00000000*"))  # a bad download not kept
    with pytest.raises(ConfigError, match="No pretrained weights for t1-crmn32x1"):
        hub.t1_crmn32x1(pretrained=True)
    assert np.isfinite(got(torch.zeros(1, 3, 32, 32)).detach().numpy()).all()


# --- the whole way: a tiny torch run, export, then torch alone from raw uint8 images -------

PREDICT = """
import json, sys
import numpy as np, torch
model = torch.hub.load(sys.argv[1], "exported", sys.argv[2], source="local").eval()
images = np.load(sys.argv[3])                         # uint8 (N, 32, 32, 3), as a user has them
x = model.preprocess(torch.from_numpy(images))
np.save(sys.argv[4], x.numpy())
with torch.no_grad():
    predicted = torch.cat([model(x[i:i + 16]).argmax(1) for i in range(0, len(x), 16)])
print(json.dumps({"predicted": predicted.tolist(), "mean": list(model.preprocessing.mean),
                  "modules": sorted(m for m in sys.modules if m.split(".")[0] in
                                    {"theano", "h5py", "jax", "jaxlib", "lasagne"})}))
"""


@pytest.mark.slow
def test_exported_pt_gives_the_runs_test_accuracy_from_raw_uint8(tmp_path):
    """Train a tiny torch run on small hand-made CIFAR-10, export it, then in a process where
    Theano, h5py and jax cannot be imported, load the .pt into the hub model and classify the
    raw test images through ``model.preprocess``: the run's accuracy to the last digit."""
    from crmn import data

    data_dir = tmp_path / "data"
    data.write_fake("cifar10", data_dir, n_train=100, n_test=40, seed=3)
    proc = run_cli(["table3", "--rows", "t3-crmn56x3", "--backend", "torch", "--device", "cpu",
                    "--n", "1", "--k", "0.25", "--batch-size", "10", "--schedule", "2,0,0",
                    "--no-progress", "--data-dir", data_dir, "--out-dir", tmp_path / "runs"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "runs" / "table3" / "t3-crmn56x3" / "seed0"
    proc = run_cli(["export", run_dir])
    assert proc.returncode == 0, proc.stderr[-2000:]
    (pt,) = (run_dir / "export").glob("*.pt")
    raw = data.load_raw("cifar10", data_dir)
    np.save(tmp_path / "images.npy", raw["x_test"].transpose(0, 2, 3, 1))  # NHWC
    proc = subprocess.run([sys.executable, "-c", REFUSE + PREDICT, str(ROOT), str(pt),
                           str(tmp_path / "images.npy"), str(tmp_path / "x.npy")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["modules"] == []
    # the recorded mean is the training set's, and preprocess is the run's own, bit for bit
    want = data.prepare("cifar10", data_dir, "final", 0)
    assert out["mean"] == list(want.preprocessing.mean)
    np.testing.assert_allclose(out["mean"], raw["x_train"].mean((0, 2, 3)) / 255, rtol=1e-6)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), want.eval_x)
    summary = runlog.read_json(run_dir / "summary.json")
    correct = int((np.array(out["predicted"]) == raw["y_test"]).sum())
    assert correct / len(raw["y_test"]) == summary["test_acc"]
