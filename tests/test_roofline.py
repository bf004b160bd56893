"""crmn/roofline.py: FLOPs per trained image against hand counts and torch's own flop
counter; the measured ceiling; a row's utilisation."""
import math

import numpy as np
import pytest

from crmn import bench, paper, roofline
from crmn.config import ModelConfig, TrainConfig
from crmn.registry import BackendOptions

# 2 FLOPs per multiply-add; forward + weight gradient (x2), + input gradient (x3)
FWD_W, FWD_W_IN = 2 * 2, 2 * 3


@pytest.mark.current
def test_tiny_resnet_matches_a_hand_count():
    """n=1, k=1 (widths 16, 32, 64), 10 classes: seven convolutions and the softmax layer,
    written out layer by layer."""
    cfg = ModelConfig(n=1, k=1, classes=10, memory=False)
    stem = 32 * 32 * 16 * 3 * 9  # the images need no gradient
    convs = (32 * 32 * 16 * 16 * 9 + 32 * 32 * 16 * 16 * 9  # stage 1, 32x32
             + 16 * 16 * 32 * 16 * 9 + 16 * 16 * 32 * 32 * 9  # stage 2, strides to 16x16
             + 8 * 8 * 64 * 32 * 9 + 8 * 8 * 64 * 64 * 9)  # stage 3, 8x8
    fc = 64 * 10
    assert roofline.train_flops_per_image(cfg) == FWD_W * stem + FWD_W_IN * (convs + fc)
    assert roofline.train_flops_per_image(cfg) == 72_552_192


@pytest.mark.current
def test_tiny_crmn_matches_a_hand_count():
    """n=1, k=0.5 (widths 8, 16, 32), 10 classes: the ResNet's products plus the LSTM's
    input projection over 3 taps padded to 8*16*16 inputs, its recurrence (100 units) and
    a softmax layer over 32 + 100 features."""
    cfg = ModelConfig(n=1, k=0.5, classes=10, memory=True)
    stem = 32 * 32 * 8 * 3 * 9
    convs = (2 * 32 * 32 * 8 * 8 * 9
             + 16 * 16 * 16 * 8 * 9 + 16 * 16 * 16 * 16 * 9
             + 8 * 8 * 32 * 16 * 9 + 8 * 8 * 32 * 32 * 9)
    lstm = 3 * 2048 * 400 + 3 * 100 * 400
    fc = (32 + 100) * 10
    assert roofline.train_flops_per_image(cfg) == FWD_W * stem + FWD_W_IN * (convs + lstm + fc)
    names = [p.name for p in roofline.products(cfg)]
    assert names[0] == "conv0" and names[-3:] == ["lstm.W_x", "lstm.W_h", "fc"]


@pytest.mark.current
def test_the_table1_resnets_grow_with_depth_and_width():
    counts = {r.id: roofline.train_flops_per_image(ModelConfig.for_row(r))
              for r in paper.TABLE1}
    assert counts["t1-resnet32x1"] < counts["t1-resnet134x1"] < counts["t1-resnet62x4"]
    # width k multiplies every product but the stem and the softmax layer by k^2
    assert counts["t1-resnet32x4"] / counts["t1-resnet32x1"] == pytest.approx(16, rel=0.01)


@pytest.mark.parametrize("n, k, memory", [(1, 0.5, False), (1, 0.5, True), (2, 1, True)])
def test_the_count_equals_torchs_flop_counter_on_the_torch_step(n, k, memory):
    """The torch backend's real SGD step under ``torch.utils.flop_counter``: every product
    torch dispatches, forward and backward, per image."""
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    from crmn import registry

    cfg = ModelConfig(n=n, k=k, classes=10, memory=memory)
    B = 4
    backend = registry.build(BackendOptions("torch"), cfg, TrainConfig(batch_size=B))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, B)
    with FlopCounterMode(display=False) as counter:
        backend.step(x, y, 0.1)
    assert counter.get_total_flops() == B * roofline.train_flops_per_image(cfg)
    assert torch.isfinite(torch.as_tensor(backend.get_state()["fc.W"])).all()


@pytest.mark.current
def test_the_cpu_ceiling_is_measured():
    c = roofline.measure_ceiling("cpu", seconds=0.05)
    assert c["device"] == "cpu" and c["fp32_tflops"] > 0 and c["copy_gb_s"] > 0
    assert c["tf32_tflops"] is None  # a GPU's unit
    assert c["seconds"] > 0 and c["library"].split()[0] in ("torch", "numpy")
    assert "ceiling on cpu" in bench.describe_ceiling(c)


@pytest.mark.current
@pytest.mark.parametrize("backend, precision, device, key", [
    ("torch", "float32", "cuda", "tf32_tflops"), ("torch", "float32", "cpu", "fp32_tflops"),
    ("theano-jax", "float32", "cuda:0", "fp32_tflops"),
    ("torch", "bfloat16+compile", "cuda", "bf16_tflops"), ("theano-c", "float64", "cpu", None),
])
def test_each_precision_is_held_against_its_own_ceiling(backend, precision, device, key):
    assert roofline.ceiling_key(backend, precision, device) == key


@pytest.mark.current
def test_utilisation_is_achieved_over_ceiling():
    cfg = ModelConfig(n=1, k=1, classes=10, memory=False)
    ceiling = {"device": "cpu", "fp32_tflops": 0.5, "tf32_tflops": None, "bf16_tflops": None}
    u = roofline.utilisation(cfg, 1000.0, "torch", "float32", ceiling)
    assert u["tflops"] == pytest.approx(72_552_192 * 1000 / 1e12)
    assert u["ceiling_fraction"] == pytest.approx(u["tflops"] / 0.5)
    none = roofline.utilisation(cfg, 1000.0, "torch", "bfloat16", ceiling)
    assert none["ceiling_tflops"] is None and none["ceiling_fraction"] is None
    assert roofline.utilisation(cfg, 1.0, "torch", "float32", None)["ceiling_fraction"] is None


def test_bench_row_carries_the_roofline_columns():
    pytest.importorskip("torch")
    ceiling = roofline.measure_ceiling("cpu", seconds=0.05)
    model = ModelConfig(n=1, k=0.5, classes=100, memory=True)
    r = bench.bench_row(paper.row("t1-crmn32x1"), BackendOptions("torch"), 1, warmup=1,
                        batch_size=2, model=model, ceiling=ceiling)
    assert r["flops_per_image"] == roofline.train_flops_per_image(model)
    assert r["tflops"] == pytest.approx(r["flops_per_image"] * r["images_per_s"] / 1e12)
    assert r["ceiling_tflops"] == ceiling["fp32_tflops"]
    assert math.isclose(r["ceiling_fraction"], r["tflops"] / ceiling["fp32_tflops"])
    assert r["peak_mem_bytes"] > 0 and r["peak_mem_kind"] == "process peak RSS"
    table = bench.format_table([r])
    assert "GFLOP/img" in table and "of ceiling" in table and "peak MiB" in table


def test_cpu_ceiling_times_large_squares_of_both_precisions_and_caps_the_share(monkeypatch):
    """The CPU's products are squares of 2048 in float32 and bfloat16 alike (smaller ones
    timed far below the network's own steps), each warmed up and the best of several; a share
    above 100 % prints as a measurement error, never as a figure."""
    torch = pytest.importorskip("torch")
    assert roofline.GEMM_SIDE[False] >= 2048 and roofline.BEST_OF >= 3
    timed, mm = [], torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: timed.append((a.shape, a.dtype)) or mm(a, b))
    c = roofline.measure_ceiling("cpu", seconds=0.0)
    side = roofline.GEMM_SIDE[False]
    assert c["gemm_side"] == side
    for dtype in (torch.float32, torch.bfloat16):  # one warm-up + BEST_OF timed
        assert timed.count(((side, side), dtype)) == 1 + roofline.BEST_OF, timed
    assert c["fp32_tflops"] > 0 and c["bf16_tflops"] > 0
    assert roofline.share(0.5) == "50 %" and roofline.share(None) == "-"
    assert roofline.share(1.5) == roofline.OVER_CEILING
    assert roofline.OVER_CEILING.startswith("above 100 %: a measurement error")
    r = {"speedup": None, "precision": "bfloat16", "backend": "torch", "compile_s": 0.0,
         "tflops": 0.2, "flops_per_image": 4e8, "ceiling_fraction": 3.67,
         "peak_mem_bytes": None, "device": "cpu"}
    assert "367" not in bench.describe(r) and roofline.OVER_CEILING in bench.describe(r)


def test_best_ceiling_keeps_the_higher_figure_per_precision():
    low = {"device": "cpu", "fp32_tflops": 0.01, "bf16_tflops": 0.2, "copy_gb_s": 5.0}
    high = {"device": "cpu", "fp32_tflops": 0.06, "bf16_tflops": 0.1, "copy_gb_s": 4.0}
    best = roofline.best_ceiling(high, low)
    assert (best["fp32_tflops"], best["bf16_tflops"], best["copy_gb_s"]) == (0.06, 0.2, 5.0)
    assert roofline.best_ceiling(None, low) == low
    assert roofline.best_ceiling({**high, "device": "cuda"}, low) == low  # another device
