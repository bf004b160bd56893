"""How close a training step comes to the device's measured ceiling. FLOPs as in
``torch.utils.flop_counter``: a multiply-add is 2 FLOPs, a product's backward costs one
product per gradient (weights; input, except the images), elementwise work is not counted."""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from crmn.config import ModelConfig
from crmn.errors import ConfigError

STAGE_SIZES = (32, 16, 8)  # each stage's feature-map side on a 32x32 input


@dataclass(frozen=True)
class Product:
    """One convolution or matrix product of the network, per image."""
    name: str  # e.g. "stage2.block0.conv1", "lstm.W_x"
    macs: int  # multiply-adds of its forward pass for one image
    input_grad: bool  # whether the backward also computes the gradient of its input


def products(model: ModelConfig) -> List[Product]:
    """Every convolution (``S_out² · C_out · C_in · 9``) and matrix product of ``model`` per
    image, in network order: the LSTM's input ``T · I · 4H`` and recurrence ``T · H · 4H``."""
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
    # forward, weight gradient and (where needed) input gradient, 2 FLOPs a multiply-add
    return sum(2 * p.macs * (3 if p.input_grad else 2) for p in products(model))


#: side of the timed square products, by precision, on a GPU and a CPU: on a CPU a smaller
#: product (1024 float32, 256 bfloat16) is too short to reach the cores' rate and was timed
#: far below what the network's own steps reached
GEMM_SIDE = {True: 8192, False: 2048}
COPY_BYTES = {True: 1 << 30, False: 1 << 26}  # bytes of the copied buffer
BEST_OF = 5  # at least this many timed repeats after one warm-up; the fastest is the figure
#: a step's share above the ceiling cannot be: the ceiling was timed low (a busy machine)
OVER_CEILING = "above 100 %: a measurement error (the ceiling was timed low, e.g. on a busy " \
               "machine; run bench again when it is quiet)"


def share(fraction: Optional[float]) -> str:
    """A step's share of the ceiling as printed: never above 100 %."""
    if fraction is None:
        return "-"
    return OVER_CEILING if fraction > 1 else f"{100 * fraction:.3g} %"


def _best_of(fn, sync, seconds: float, least: int = BEST_OF) -> float:
    fn()  # warm-up: the first call allocates, and on a GPU picks its kernels
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
    kinds = [("fp32_tflops", torch.float32, False), *[("tf32_tflops", torch.float32, True)] * gpu,
             ("bf16_tflops", torch.bfloat16, False)]
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for key, dtype, tf32 in kinds:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
            took = _best_of(lambda: torch.mm(a, b), sync, seconds)
            got[key] = 2 * n ** 3 / took / 1e12
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
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    took = _best_of(lambda: a @ b, lambda: None, seconds)
    src = np.ones(COPY_BYTES[False] // 4, dtype=np.float32)
    dst = np.empty_like(src)
    copy = _best_of(lambda: np.copyto(dst, src), lambda: None, seconds)
    return {"library": f"numpy {np.__version__}", "gemm_side": n,
            "fp32_tflops": 2 * n ** 3 / took / 1e12, "copy_gb_s": 2 * src.nbytes / copy / 1e9}


def fp32_ceiling(device: str) -> float:
    """FLOP/s of a float32 matrix product on ``device``, timed briefly (a CPU: numpy's, so no
    torch import): what the cost estimate scales by where bench kept no ceiling."""
    got = _numpy_ceiling(0.2) if device == "cpu" else measure_ceiling(device, 0.2)
    return got["fp32_tflops"] * 1e12


def best_ceiling(a: Optional[Dict], b: Dict) -> Dict:
    """The higher figure of each precision of two measurements of one device: a ceiling timed
    on a busy machine is low, never high."""
    if not a or a.get("device") != b["device"]:
        return b
    higher = {k: v for k, v in a.items() if k.endswith(("_tflops", "_gb_s"))
              and isinstance(v, (int, float)) and v > (b.get(k) or 0)}
    return {**b, **higher}


def measure_ceiling(device: str = "cpu", seconds: float = 0.5) -> Dict:
    """The device's limits (product TFLOP/s by precision, copy GB/s), best over ``seconds``."""
    t0 = time.perf_counter()
    try:
        import torch  # noqa: F401
        got = _torch_ceiling(device, seconds)
    except ImportError:
        if device != "cpu":
            raise ConfigError(f"measuring the ceiling of --device {device} needs torch (not "
                              f"installed in {sys.executable}): install torch there, or time "
                              "the CPU with --device cpu")
        got = _numpy_ceiling(seconds)
    return {"device": device, "fp32_tflops": None, "tf32_tflops": None, "bf16_tflops": None,
            **got, "seconds": time.perf_counter() - t0}


def ceiling_key(backend: str, precision: str, device: str) -> Optional[str]:
    """The ceiling a timed row is held against (torch float32 on a GPU: TensorFloat-32, which
    the torch backend allows there; float64: none)."""
    if precision.startswith("bfloat16"):
        return "bf16_tflops"
    if precision.startswith("float32"):
        return "tf32_tflops" if backend == "torch" and device.startswith("cuda") else "fp32_tflops"
    return None


def utilisation(model: ModelConfig, images_per_s: float, backend: str, precision: str,
                ceiling: Optional[Dict]) -> Dict:
    """A timed row's ``flops_per_image``, ``tflops``, ``ceiling_tflops``, ``ceiling_fraction``."""
    flops = train_flops_per_image(model)
    achieved = flops * images_per_s / 1e12
    key = ceiling_key(backend, precision, ceiling["device"]) if ceiling else None
    top = ceiling.get(key) if key else None
    return {"flops_per_image": flops, "tflops": achieved, "ceiling_tflops": top,
            "ceiling_fraction": achieved / top if top else None}


def reset_peak_memory(backend: str, device: str) -> None:
    """Start a row's peak-memory count (torch on a GPU; elsewhere the process's is kept)."""
    if backend == "torch" and device.startswith("cuda"):
        import torch
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(backend: str, device: str) -> Dict:
    """``peak_mem_bytes`` and ``peak_mem_kind``: torch's or JAX's on a GPU, else peak RSS."""
    if device.startswith("cuda"):
        if backend == "torch":
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
