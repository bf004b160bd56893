"""How close a training step comes to the machine's own limit: FLOPs per trained image and
the measured ceiling of the device.

FLOPs follow model-FLOP utilisation and ``torch.utils.flop_counter``: a multiply-add is 2
FLOPs; the backward of a product costs one product for the weights' gradient and one for the
input's (none for the images entering the stem); elementwise work (batch norm, ReLU, pooling,
the LSTM's gates, the loss, the update) is memory-bound and not counted.
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from crmn.config import ModelConfig

#: the spatial size of each stage's feature maps on a 32x32 input (stages 2 and 3 stride 2)
STAGE_SIZES = (32, 16, 8)


@dataclass(frozen=True)
class Product:
    """One convolution or matrix product of the network, per image."""

    name: str  # e.g. "stage2.block0.conv1", "lstm.W_x"
    macs: int  # multiply-adds of its forward pass for one image
    input_grad: bool  # whether the backward also computes the gradient of its input

    @property
    def train_flops(self) -> int:
        """Forward, weight gradient and (where needed) input gradient, 2 FLOPs a multiply-add."""
        return 2 * self.macs * (3 if self.input_grad else 2)


def products(model: ModelConfig) -> List[Product]:
    """Every convolution and matrix product of ``model`` per image, in network order: 3x3
    convolutions, ``S_out² · C_out · C_in · 9`` (docs/spec.md §4); the memory's input
    projection of ``T = 3n`` taps zero-padded to ``I = 16k·16·16`` inputs, ``T · I · 4H``, and
    its recurrence ``T · H · 4H`` (from the learned ``h0``); softmax ``(64k + H) · classes``."""
    c_in = model.widths[0]
    out = [Product("conv0", STAGE_SIZES[0] ** 2 * c_in * 3 * 9, input_grad=False)]
    for s, (width, side) in enumerate(zip(model.widths, STAGE_SIZES)):
        for b in range(model.n):
            out += [Product(f"stage{s + 1}.block{b}.{conv}", side * side * width * c * 9, True)
                    for conv, c in (("conv1", c_in), ("conv2", width))]
            c_in = width
    features = model.widths[2]
    if model.memory:
        T, I, H = model.taps, model.lstm_input, model.lstm_units
        out.append(Product("lstm.W_x", T * I * 4 * H, input_grad=True))
        out.append(Product("lstm.W_h", T * H * 4 * H, input_grad=True))
        features += H
    out.append(Product("fc", features * model.classes, input_grad=True))
    return out


def train_flops_per_image(model: ModelConfig) -> int:
    """FLOPs of one SGD step per trained image (forward + backward)."""
    return sum(p.train_flops for p in products(model))


# --- the device's ceiling -----------------------------------------------------------------

#: side of the square matrices timed: (gpu, cpu); large enough to fill the device's units
GEMM_SIDE = {True: 8192, False: 1024}
#: bytes of the copied buffer: (gpu, cpu)
COPY_BYTES = {True: 1 << 30, False: 1 << 26}


def _best_of(fn, sync, seconds: float, least: int = 3) -> float:
    """The fastest of repeated calls of ``fn`` (after one warm-up), for about ``seconds``."""
    fn()
    sync()
    times: List[float] = []
    while len(times) < least or sum(times) < seconds:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def _torch_ceiling(device: str, seconds: float) -> Dict:
    import torch

    dev = torch.device(device)
    gpu = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if gpu else (lambda: None)
    n = GEMM_SIDE[gpu]
    got = {"library": f"torch {torch.__version__}", "gemm_side": n}
    kinds = [("fp32_tflops", torch.float32, False), ("bf16_tflops", torch.bfloat16, False)]
    if gpu:
        kinds.insert(1, ("tf32_tflops", torch.float32, True))
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for key, dtype, tf32 in kinds:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            # most CPUs emulate bfloat16: a quarter of the side keeps it to a fraction of a second
            m = n if gpu or dtype != torch.bfloat16 else n // 4
            a = torch.randn(m, m, device=dev, dtype=dtype)
            b = torch.randn(m, m, device=dev, dtype=dtype)
            took = _best_of(lambda: torch.mm(a, b), sync, seconds)
            got[key] = 2 * m ** 3 / took / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    src = torch.empty(COPY_BYTES[gpu] // 4, device=dev, dtype=torch.float32)
    dst = torch.empty_like(src)
    took = _best_of(lambda: dst.copy_(src), sync, seconds)
    got["copy_gb_s"] = 2 * src.numel() * 4 / took / 1e9  # read + write
    return got


def _numpy_ceiling(seconds: float) -> Dict:
    import numpy as np

    n = GEMM_SIDE[False]
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    took = _best_of(lambda: a @ b, lambda: None, seconds)
    src = np.ones(COPY_BYTES[False] // 4, dtype=np.float32)
    dst = np.empty_like(src)
    copy = _best_of(lambda: np.copyto(dst, src), lambda: None, seconds)
    return {"library": f"numpy {np.__version__}", "gemm_side": n,
            "fp32_tflops": 2 * n ** 3 / took / 1e12, "copy_gb_s": 2 * src.nbytes / copy / 1e9}


def measure_ceiling(device: str = "cpu", seconds: float = 0.5) -> Dict:
    """The device's limits, each the fastest of repeated runs over ``seconds``: a large
    matrix product (``fp32_tflops``; with torch also ``bf16_tflops`` and on a GPU
    ``tf32_tflops``, else None), a large copy (``copy_gb_s``, read + write)."""
    t0 = time.perf_counter()
    try:
        import torch  # noqa: F401
        got = _torch_ceiling(device, seconds)
    except ImportError:
        if device != "cpu":
            from crmn.errors import ConfigError
            raise ConfigError(f"measuring the ceiling of --device {device} needs torch (not "
                              f"installed in {sys.executable}): install torch there, or time "
                              "the CPU with --device cpu")
        got = _numpy_ceiling(seconds)
    out = {"device": device, "fp32_tflops": None, "tf32_tflops": None, "bf16_tflops": None}
    out.update(got)
    out["seconds"] = time.perf_counter() - t0
    return out


def ceiling_key(stack: str, precision: str, device: str) -> Optional[str]:
    """Which ceiling a timed row is held against: bfloat16 rows against bfloat16; torch
    float32 on a GPU against TensorFloat-32 (the torch stack allows it there); other float32
    rows against strict float32; float64 against none."""
    if precision.startswith("bfloat16"):
        return "bf16_tflops"
    if precision.startswith("float32"):
        return "tf32_tflops" if stack == "torch" and device.startswith("cuda") else "fp32_tflops"
    return None


def utilisation(model: ModelConfig, images_per_s: float, stack: str, precision: str,
                ceiling: Optional[Dict]) -> Dict:
    """A timed row's ``flops_per_image``, achieved ``tflops``, ``ceiling_tflops`` and
    ``ceiling_fraction`` (None without a matching measurement)."""
    flops = train_flops_per_image(model)
    achieved = flops * images_per_s / 1e12
    key = ceiling_key(stack, precision, ceiling["device"]) if ceiling else None
    top = ceiling.get(key) if key else None
    return {"flops_per_image": flops, "tflops": achieved, "ceiling_tflops": top,
            "ceiling_fraction": achieved / top if top else None}


# --- peak memory ------------------------------------------------------------------------

def reset_peak_memory(stack: str, device: str) -> None:
    """Start a row's peak-memory count (torch on a GPU; JAX and the CPU keep the process's)."""
    if stack == "torch" and device.startswith("cuda"):
        import torch
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(stack: str, device: str) -> Dict:
    """``peak_mem_bytes`` and ``peak_mem_kind``: torch's peak allocation on the GPU since
    :func:`reset_peak_memory`, JAX's peak bytes in use on its device, or on a CPU the
    process's peak resident set."""
    if device.startswith("cuda"):
        if stack == "torch":
            import torch
            return {"peak_mem_bytes": int(torch.cuda.max_memory_allocated(device)),
                    "peak_mem_kind": "torch peak allocated"}
        import jax
        index = int(device.partition(":")[2] or 0)
        stats = jax.devices("gpu")[index].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        return {"peak_mem_bytes": int(peak) if peak is not None else None,
                "peak_mem_kind": "jax peak bytes in use (process)"}
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, else KiB
    return {"peak_mem_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
            "peak_mem_kind": "process peak RSS"}
