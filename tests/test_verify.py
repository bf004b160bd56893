"""crmn/verify.py: the comparison machinery, and both backends on tiny configurations."""
import dataclasses

import numpy as np
import pytest

pytest.importorskip("torch")  # the current environment has no torch

from crmn import cli, verify  # noqa: E402
from crmn.registry import check_device
from crmn.config import ModelConfig, TrainConfig
from crmn.errors import ConfigError
from modern.backend import TorchBackend

TINY_RESNET = ModelConfig(n=1, k=0.5, classes=10, memory=False)
TINY_CRMN = ModelConfig(n=1, k=0.5, classes=10, memory=True)


def test_rel_diff():
    b = np.array([1.0, -4.0, 2.0])
    assert verify.rel_diff(b, b) == 0
    assert verify.rel_diff(b + [0, 0, 0.004], b) == pytest.approx(1e-3)
    assert verify.rel_diff(np.zeros(2), np.zeros(2)) == 0
    assert verify.rel_diff(np.ones(2), np.zeros(2)) == 1  # absolute against zeros
    assert verify.rel_diff(np.ones(3), np.ones(2)) == np.inf


def test_compare_passes_on_equal_backends_and_catches_a_difference():
    train = TrainConfig(batch_size=4)
    a = TorchBackend(TINY_CRMN, train, dtype="float64")
    b = TorchBackend(TINY_CRMN, TrainConfig(batch_size=4, seed=9), dtype="float64")
    same = verify._compare("same", a, b, TINY_CRMN, 4, 0.1, 0, verify.TOLERANCE)
    assert same.passed and max(same.diffs.values()) == 0  # b got a's state: bit-equal
    # the output gate's nonlinearity is a real modelling choice: verify must see it
    other_cfg = ModelConfig(n=1, k=0.5, classes=10, memory=True, outgate="tanh")
    c = TorchBackend(other_cfg, train, dtype="float64")
    a2 = TorchBackend(TINY_CRMN, train, dtype="float64")
    diff = verify._compare("outgate", a2, c, TINY_CRMN, 4, 0.1, 0, verify.TOLERANCE)
    assert not diff.passed and diff.diffs["logits (training)"] > 1e-6
    # BN statistics depend only on the ResNet part, which is the same
    assert diff.diffs["BN stats after step"] == 0


def test_main_rejects_unknown_rows(capsys):
    assert cli.main(["verify", "--rows", "t9-nothing"]) == 2
    assert "t9-nothing" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["cpu", "cpu:0", "cuda", "cuda:1"])
def test_check_device_accepts_cpu_and_cuda(name):
    assert check_device(name) == name


@pytest.mark.parametrize("name", ["foo", "meta", "cuda:x", "", "gpu0"])
def test_check_device_refuses_anything_else_in_one_line(name):
    with pytest.raises(ConfigError, match=rf"^unknown device {name!r}: choose cpu, cuda or "
                                          r"cuda:N$"):
        check_device(name)


def _no_comparison(*args, **kwargs):
    raise AssertionError("bad input must be refused before any backend is built")


def test_main_rejects_a_bad_device_before_building_anything(capsys, monkeypatch):
    monkeypatch.setattr(verify, "verify_backends", _no_comparison)
    monkeypatch.setattr(verify, "verify_device", _no_comparison)
    assert cli.main(["verify", "--device", "foo"]) == 2
    out, err = capsys.readouterr()
    assert err == ("run_experiments.sh verify: argument --device: unknown device 'foo': "
                   "choose cpu, cuda or cuda:N\n") and out == ""


def test_main_without_cuda_says_so_in_one_line(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["verify", "--device", "cuda"]) == 2  # refused before anything runs
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("run_experiments.sh verify: --device cuda: "
                                                    "torch")
    assert "sees no CUDA GPU" in err


@pytest.mark.parametrize("argv", [["--batch-size", "0"],
                                  ["--rows", "t1-resnet32x1", "--batch-size", "0"],
                                  ["--device", "cuda", "--batch-size", "-3"]])
def test_main_rejects_a_batch_size_below_one(argv, capsys, monkeypatch):
    monkeypatch.setattr(verify, "verify_backends", _no_comparison)
    monkeypatch.setattr(verify, "verify_device", _no_comparison)
    assert cli.main(["verify", *argv]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("run_experiments.sh verify: argument --batch-size: expected a ") \
        and err.count("\n") == 1 and argv[-1] in err and out == ""


def test_batch_size_applies_to_rows_and_default_configurations():
    defaults = verify.select_configs()
    assert [(n, c) for n, c, _ in defaults] == [(n, c) for n, c, _ in verify.DEFAULT_CONFIGS]
    assert [t.batch_size for _, _, t in defaults] == [verify.BATCH_SIZE] * 3
    resized = verify.select_configs(batch_size=3)
    assert [(n, c) for n, c, _ in resized] == [(n, c) for n, c, _ in verify.DEFAULT_CONFIGS]
    for (_, _, t), (_, _, t0) in zip(resized, verify.DEFAULT_CONFIGS):
        assert t == dataclasses.replace(t0, batch_size=3)  # nesterov etc. kept
    (row,) = verify.select_configs(["t1-crmn32x1"])
    assert row[0] == "t1-crmn32x1" and row[2].batch_size == verify.BATCH_SIZE
    (row,) = verify.select_configs(["t1-crmn32x1"], batch_size=5)
    assert row[2].batch_size == 5


def test_main_hands_the_batch_size_to_every_default_configuration(capsys, monkeypatch):
    seen = []

    def record(cfg, train, name, *args):
        seen.append((name, train.batch_size))
        return [verify.Result(name, diffs={"loss": 0.0}, worst={"loss": "-"})]

    monkeypatch.setattr(verify, "verify_backends", record)
    assert cli.main(["verify", "--batch-size", "2"]) == 0
    assert seen == [(name, 2) for name, _, _ in verify.DEFAULT_CONFIGS]
    assert capsys.readouterr().out.endswith("3/3 PASS\n")


def _backends_result(cfg, name):
    """The three pairs of torch, Theano-C and Theano-JAX agree; the first of them."""
    lines = []
    results = verify.verify([(name, cfg, TrainConfig(batch_size=4))], out=lines.append)
    assert [r.name for r in results] == [f"{name} [theano-c vs torch]",
                                         f"{name} [theano-jax vs torch]",
                                         f"{name} [theano-jax vs theano-c]"]
    assert lines[-1] == "3/3 PASS", lines
    for r in results:
        assert r.passed, (r.name, r.diffs)
        assert max(r.diffs.values()) < 1e-12  # float64: only the order of sums differs
    return results[0]


@pytest.mark.slow
def test_backends_agree_resnet():
    r = _backends_result(TINY_RESNET, "resnet")
    assert r.passed, r.diffs


@pytest.mark.slow
def test_backends_agree_crmn():
    r = _backends_result(TINY_CRMN, "crmn")
    assert r.passed, r.diffs


def test_epoch_check_runs_on_cpu():
    # on a GPU this compares the resident-gather + CUDA-graph epoch with the sampler + eager
    # loop; on the CPU it still checks the gather bit for bit and the epoch bookkeeping
    r = verify._verify_epoch(TINY_RESNET, TrainConfig(batch_size=4), "tiny", "cpu", 0.1, 0,
                             1e-4)
    assert r.passed, r.diffs
    assert r.diffs["batches (bit-equal)"] == 0 and r.diffs["state after epoch"] == 0


def test_device_checks_run_on_cpu():
    # on a GPU: float64 exactness (device vs CPU, captured graph vs eager, the GPU epoch) and
    # float32 rounding figures; on the CPU the same code paths run with the graph off
    results = verify.verify_device(TINY_CRMN, TrainConfig(batch_size=4), "tiny", "cpu")
    names = [r.name for r in results]
    assert len(results) == 5 and all(r.passed for r in results), [r.diffs for r in results]
    assert "float64 vs cpu float64" in names[0] and "float64: graph vs eager" in names[1]
    assert "float64 epoch" in names[2] and "float32 vs cpu float64" in names[3]
    for r in results[:3]:  # float64: strict tolerance, array by array
        assert r.tol("params after step" if "epoch" not in r.name else "state after epoch") \
            == verify.TOLERANCE
        assert max(r.diffs.values()) == 0  # the same CPU kernels: bit-equal
    # float32 against float64 sees rounding, and only rounding
    assert 0 < results[3].diffs["logits (training)"] < verify.TOLERANCE_F32
    assert results[3].tol("params after step") == verify.UPDATE_TOLERANCE_F32


def test_verify_holds_the_jax_mode_to_the_references_where_the_c_mode_is_missing(
        monkeypatch):
    """Where Theano's C mode cannot run (numpy 2), verify says so in one line, skips its
    pairs and compares the JAX mode with the C mode's stored figures instead."""
    from original import compat, references

    monkeypatch.setattr(compat, "c_mode_available", lambda: (False, "no C mode here"))
    seen = []
    monkeypatch.setattr(references, "check_jax",
                        lambda device="cpu": seen.append(device) or [("op/conv", 2e-14),
                                                                     ("e2e/crmn", 3e-15)])
    lines = []
    results = verify.verify([], out=lines.append)
    assert seen == ["cpu"]
    assert lines[0] == "theano-c: not built here (--theano-mode c: no C mode here)"
    assert [r.name for r in results] == ["theano-jax on cpu vs stored theano-c float64 "
                                         "references"]
    assert results[0].passed and results[0].diffs == {"op/conv": 2e-14, "e2e/crmn": 3e-15}
    monkeypatch.setattr(references, "check_jax", lambda device="cpu": [("op/conv", 1e-9)])
    assert not verify.verify([], out=lines.append)[0].passed  # above references.TOL
