"""crmn/bench.py: the speed table on a small row, a few steps, on the CPU."""
import json

import pytest

from crmn import bench, cli, paper
from crmn.registry import BackendOptions


@pytest.mark.slow
def test_bench_prints_and_writes_the_row(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--backend", "torch", "--rows", "t1-resnet32x1", "--steps", "2",
                   "--warmup", "1", "--batch-size", "4", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "t1-resnet32x1" in text and "ResNet-32x1" in text and "125" in text
    (r,) = json.loads(out.read_text())
    row = next(x for x in paper.TABLE1 if x.id == "t1-resnet32x1")
    assert r["backend"] == "torch" and r["device"] == "cpu" and r["batch_size"] == 4
    assert r["layout"] == "channels-first" and r["precision"] == "float32"
    assert r["steps"] == 2 and r["seconds"] > 0 and r["warmup_s"] > 0
    assert r["images_per_s"] == pytest.approx(2 * 4 / r["seconds"])
    assert r["sec_per_epoch"] == pytest.approx(50_000 / r["images_per_s"])
    assert r["paper_sec_per_epoch"] == row.paper_sec_per_epoch
    assert r["speedup"] == pytest.approx(row.paper_sec_per_epoch / r["sec_per_epoch"])
    assert r["flops_per_image"] == 412_325_376  # crmn.roofline: ResNet-32x1, 100 classes
    assert r["ceiling_fraction"] == pytest.approx(r["tflops"] / r["ceiling_tflops"])
    assert "# ceiling on cpu" in text and "of ceiling" in text


def test_bench_rejects_bad_input_as_usage_errors(capsys):
    assert cli.main(["bench", "--rows", "t1-nope", "--steps", "1"]) == 2
    assert "t1-nope" in capsys.readouterr().err
    assert cli.main(["bench", "--rows", "t1-resnet32x1", "--steps", "0"]) == 2
    assert cli.main(["bench", "--rows", "t1-resnet32x1", "--steps", "1", "--backend", "theano",
                     "--compile"]) == 2
    assert cli.main(["bench", "--rows", "t1-resnet32x1", "--steps", "1", "--backend", "theano",
                     "--channels-last"]) == 2
    assert "--backend torch" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--device", "foo"], "argument --device: unknown device 'foo': choose cpu, cuda or "
                          "cuda:N"),
    (["--batch-size", "0"], "argument --batch-size: expected a number >= 1, got 0"),
])
def test_bench_refuses_bad_options_in_one_line_before_building(argv, message, capsys,
                                                              monkeypatch):
    def no_backend(*args, **kwargs):
        raise AssertionError("bad input must be refused before any backend is built")

    monkeypatch.setattr(bench, "bench_row", no_backend)
    assert cli.main(["bench", "--rows", "t1-resnet32x1", "--steps", "1", *argv]) == 2
    out, err = capsys.readouterr()
    assert err == f"run_experiments.sh bench: {message}\n" and out == ""


def test_bench_channels_last_is_the_layout_trained(capsys):
    r = bench.bench_row(paper.row("t1-resnet32x1"), BackendOptions("torch"), 1, warmup=1,
                        batch_size=2, channels_last=True)
    assert r["layout"] == "channels-last"
    assert cli.main(["bench", "--backend", "torch", "--rows", "t1-resnet32x1", "--steps", "1",
                     "--warmup", "1", "--batch-size", "2", "--channels-last"]) == 0
    assert "channels-last" in capsys.readouterr().out


def test_format_table_without_paper_seconds():
    r = {"row": "t2-crmn28x10", "label": "CRMN-28x10", "batch_size": 50, "images_per_s": 10.0,
         "sec_per_epoch": 5000.0, "paper_sec_per_epoch": None, "speedup": None,
         "warmup_s": 1.0}
    line = bench.format_table([r]).splitlines()[-1]
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[:4] == ["t2-crmn28x10", "CRMN-28x10", "-", "50"]
    assert cells[6:8] == ["-", "-"]  # no paper seconds, no speed-up
    assert cells[10:] == ["-"] * 6  # a JSON from before the cache and roofline columns


@pytest.mark.slow
def test_profile_step_counts_the_operators_of_a_step_on_cpu(capsys):
    """profile --count-ops: the cast-once step dispatches fewer casts than autocast's cast
    per use, on a paper row."""
    assert cli.main(["profile", "--rows", "t1-resnet32x1", "--variants", "bf16,bf16-percast",
                     "--count-ops", "--device", "cpu", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "FAILED" not in out
    (once_ops, once_casts), (use_ops, use_casts) = [
        (int(line.split()[2]), int(line.split()[5])) for line in out.splitlines()]
    # ResNet-32x1: 31 convolutions + the dense weight and bias, each cast down and back
    assert use_casts - once_casts == 2 * (33 - 1)
    # The totals are not compared: torch.profiler records views (as_strided) and composite
    # operators beside the ones they call, and the cast-once step's weights are views of one
    # cast buffer, so its total runs higher although it dispatches fewer casts.
    assert once_ops > 0 and use_ops > 0


def test_profile_refuses_an_unknown_variant_before_running(capsys):
    assert cli.main(["profile", "--variants", "fp32,fp16-cl", "--device", "cpu"]) == 1
    assert "unknown variant 'fp16-cl'" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_row_of_the_jax_mode_compiles_cold_then_warm(tmp_path, monkeypatch):
    """The cold column is the first build (nothing in a fresh cache: a miss); the warm
    column is a second build of the same network, which finds the step the first stored."""
    from crmn import paper
    from crmn.config import ModelConfig
    from crmn.registry import BackendOptions

    monkeypatch.setenv("CRMN_CACHE", str(tmp_path / "cache"))
    r = bench.bench_row(paper.row("t1-crmn32x1"), BackendOptions("theano", theano_mode="jax"),
                        steps=1, warmup=1, batch_size=2,
                        model=ModelConfig(n=1, k=0.5, classes=100, memory=True))
    assert (r["cache_outcome"], r["warm_cache_outcome"]) == ("miss", "hit")
    assert r["compile_s"] > 0 and r["warm_compile_s"] is not None
    cells = [c.strip() for c in bench.format_table([r]).splitlines()[-1].split("|")[1:-1]]
    assert cells[10:12] == ["miss", f"{r['warm_compile_s']:.1f}"]
    off = bench.bench_row(paper.row("t1-crmn32x1"),
                          BackendOptions("theano", theano_mode="jax", compile_cache=False),
                          steps=1, warmup=1, batch_size=2,
                          model=ModelConfig(n=1, k=0.5, classes=100, memory=True))
    assert (off["cache_outcome"], off["warm_compile_s"]) == ("off", None)
