"""A run started by one backend and resumed by the other from its checkpoint, through the
real driver, data and backends."""
from pathlib import Path

import numpy as np
import pytest

import original  # noqa: F401  (Theano's compat bridges before anything imports Lasagne)
from crmn import checkpoint, data, registry, runlog, train as trainer
from crmn.plan import RunSpec
from crmn.config import ModelConfig, TrainConfig

MODEL = ModelConfig(n=1, k=0.5, classes=10, memory=False)
TRAIN = TrainConfig(batch_size=50, lr_stages=(0.05,), schedule=(2,), seed=4)


class Killed(Exception):
    pass


def _run(run_dir, data_dir, backend, resume=False):
    spec = RunSpec(model=MODEL, train=TRAIN, dataset="cifar10", data_dir=data_dir,
                   backend_options=registry.BackendOptions(backend=backend, dtype="float64"))
    return trainer.run(run_dir, spec, resume=resume, progress=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    data.write_fake("cifar10", d, n_train=200, n_test=100, seed=2)
    return d


@pytest.mark.slow
def test_torch_checkpoint_resumed_by_theano_matches_an_uninterrupted_torch_run(
        tmp_path, data_dir, monkeypatch):
    reference = tmp_path / "torch-only"
    _run(reference, data_dir, "torch")

    # The run that is interrupted starts in the same backend as the reference and the other
    # backend finishes it (both backends now start from crmn.init's state, tests/test_init.py).
    mixed = tmp_path / "torch-then-theano"
    real_save = checkpoint.save
    saves = {"n": 0}

    def killed_after_first_checkpoint(path, arrays, meta, **kw):
        if Path(path).name == runlog.CHECKPOINT and saves["n"] == 1:
            raise Killed("stopped before the second epoch's checkpoint")
        saves["n"] += Path(path).name == runlog.CHECKPOINT
        return real_save(path, arrays, meta, **kw)

    monkeypatch.setattr(checkpoint, "save", killed_after_first_checkpoint)
    with pytest.raises(Killed):
        _run(mixed, data_dir, "torch")
    monkeypatch.undo()
    assert checkpoint.load(mixed / runlog.CHECKPOINT)[1]["backend"] == "torch"

    summary = _run(mixed, data_dir, "theano", resume=True)
    assert summary["backend"] == "theano" and summary["final_epochs"] == 2
    config = runlog.read_json(mixed / runlog.CONFIG)
    assert config["backend"] == "torch"
    assert config["resumes"][0]["backend"] == "theano"
    assert config["resumes"][0]["after_epoch"] == 1

    # float64 backends agree to rounding, so one Torch epoch + one Theano epoch lands where
    # two Torch epochs do.
    got, _ = checkpoint.load(mixed / runlog.CHECKPOINT)
    want, _ = checkpoint.load(reference / runlog.CHECKPOINT)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-7, atol=1e-9, err_msg=name)
