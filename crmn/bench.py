"""Training speed per paper row against the paper's seconds per epoch (Table 1).

Each row trains for a fixed number of SGD steps on synthetic CIFAR-shaped data (random
normal images, random labels: speed does not depend on the pixels) through the backend's own
``train_epoch``, so the GPU path's resident data, per-epoch gather and captured step are what
is timed. A short warm-up epoch first (graph compilation, cuDNN autotuning, CUDA-graph
capture) is timed and reported apart. Printed per row: images/s, seconds per 50,000-image
epoch, the paper's seconds per epoch (``crmn.paper``) and the speed-up over the paper::

    python -m crmn.bench --backend torch --device cuda --steps 500
    python -m crmn.bench --rows t1-resnet32x1 --device cpu --steps 5 --json bench.json

The paper's "seconds per epoch" is read as one pass over CIFAR-100's 50,000 training images.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from crmn import paper
from crmn.backend import BACKENDS, check_device, make_backend
from crmn.config import ModelConfig, TrainConfig
from crmn.errors import ConfigError, CRMNError

EPOCH_IMAGES = 50_000  # CIFAR-100 training set: the paper's epoch
PRECISIONS = ("float32", "float64", "bfloat16")


def _rows(spec: Optional[str]) -> List[paper.Row]:
    return list(paper.select_or_fail(spec, "table1"))


def bench_row(row: paper.Row, backend: str, device: str, precision: str, steps: int,
              warmup: int = 3, batch_size: Optional[int] = None, seed: int = 0,
              compile: bool = False, channels_last: Optional[bool] = None) -> Dict:
    """Time ``steps`` SGD steps of ``row``; returns the figures of one table line.

    Returns
    -------
    dict with ``row, label, backend, device, precision, batch_size, steps, warmup_s``
    (first epoch of ``warmup`` steps: compile / capture), ``seconds`` (the ``steps``
    steps), ``images_per_s``, ``sec_per_epoch`` (50,000 images), ``paper_sec_per_epoch``
    and ``speedup`` (paper / ours).
    """
    from crmn.data import BatchSampler  # numpy only; imported late to keep --help fast

    model = ModelConfig.for_row(row)
    train = TrainConfig.for_row(row, seed=seed)
    if batch_size is not None:
        train = TrainConfig(batch_size=batch_size, lr_stages=row.lr_stages, seed=seed)
    B = train.batch_size
    if compile or channels_last is not None:
        if backend != "torch":
            raise ConfigError("--compile and --channels-last/--channels-first need "
                              "--backend torch")
        from modern.backend import TorchBackend

        be = TorchBackend(model, train, device=device, dtype=precision, compile=compile,
                          channels_last=channels_last)
    else:
        be = make_backend(backend, model, train, device=device, dtype=precision)
    layout = "channels-last" if getattr(be, "channels_last", False) else "channels-first"
    rng = np.random.default_rng(seed)

    def sampler(n_steps):
        n = n_steps * B
        x = rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
        y = rng.integers(0, model.classes, n).astype(np.int64)
        return BatchSampler(x, y, B, seed=seed, pad=train.pad)

    t0 = time.perf_counter()
    be.train_epoch(sampler(warmup), 0, 0.01)
    s = sampler(steps)
    if getattr(be, "use_graph", False):  # the torch GPU path copies the training set once
        be.resident(s)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = be.train_epoch(s, 1, 0.01)  # ends with a host sync: device work is finished
    seconds = time.perf_counter() - t0
    ips = stats.images / seconds
    ours = EPOCH_IMAGES / ips
    theirs = row.paper_sec_per_epoch
    return {
        "row": row.id, "label": row.label, "backend": backend, "device": be.device,
        "precision": precision + ("+compile" if compile else ""), "layout": layout,
        "batch_size": B, "steps": steps, "warmup_s": warmup_s,
        "seconds": seconds, "images_per_s": ips, "sec_per_epoch": ours,
        "paper_sec_per_epoch": theirs,
        "speedup": (theirs / ours) if theirs else None, "loss": stats.loss,
    }


def format_table(results: Sequence[Dict]) -> str:
    head = (f"{'row':16s} {'model':15s} {'batch':>5s} {'img/s':>9s} {'s/epoch':>8s} "
            f"{'paper s':>8s} {'speedup':>8s} {'warm-up s':>9s}")
    lines = [head, "-" * len(head)]
    for r in results:
        paper_s = f"{r['paper_sec_per_epoch']:8.0f}" if r["paper_sec_per_epoch"] else f"{'-':>8s}"
        speed = f"{r['speedup']:7.1f}x" if r["speedup"] else f"{'-':>8s}"
        lines.append(f"{r['row']:16s} {r['label']:15s} {r['batch_size']:5d} "
                     f"{r['images_per_s']:9.0f} {r['sec_per_epoch']:8.2f} {paper_s} {speed} "
                     f"{r['warmup_s']:9.1f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m crmn.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=None,
                    help="comma-separated row ids of crmn.paper (default: all Table 1 rows)")
    ap.add_argument("--backend", choices=BACKENDS, default="torch")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    ap.add_argument("--steps", type=int, default=50, help="timed SGD steps per row (default 50)")
    ap.add_argument("--warmup", type=int, default=3,
                    help="steps of the untimed-in-the-rate warm-up epoch (default 3)")
    ap.add_argument("--precision", choices=PRECISIONS, default="float32",
                    help="float32 (default; TF32 on CUDA), float64, or bfloat16 autocast")
    ap.add_argument("--compile", action="store_true",
                    help="torch only: torch.compile the forward inside the captured step")
    layout = ap.add_mutually_exclusive_group()
    layout.add_argument("--channels-last", dest="channels_last", action="store_const",
                        const=True, default=None,
                        help="torch only: NHWC activations and filters (default: with "
                        "bfloat16 only)")
    layout.add_argument("--channels-first", dest="channels_last", action="store_const",
                        const=False, help="torch only: NCHW even with bfloat16")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="override the row's batch size (for quick looks; default: the paper's)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results as "
                    "JSON to PATH ('-' for stdout)")
    args = ap.parse_args(argv)
    try:
        if args.steps < 1 or args.warmup < 1:
            raise ConfigError(f"--steps and --warmup must be >= 1, got {args.steps}, "
                              f"{args.warmup}")
        if args.batch_size is not None and args.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
        check_device(args.device)
        rows = _rows(args.rows)
        setting = args.precision + (" + torch.compile" if args.compile else "")
        print(f"# crmn.bench: backend {args.backend}, device {args.device}, precision "
              f"{setting}, {args.steps} timed steps per row; python "
              f"{platform.python_version()}, numpy {np.__version__}", flush=True)
        results = []
        for row in rows:
            r = bench_row(row, args.backend, args.device, args.precision, args.steps,
                          warmup=args.warmup, batch_size=args.batch_size,
                          compile=args.compile, channels_last=args.channels_last)
            print(f"# {row.id}: {r['images_per_s']:.0f} img/s, {r['sec_per_epoch']:.2f} s per "
                  f"epoch on {r['device']}, {r['layout']}", flush=True)
            results.append(r)
        print(format_table(results))
        if args.json:
            text = json.dumps(results, indent=1)
            if args.json == "-":
                print(text)
            else:
                with open(args.json, "w") as f:
                    f.write(text + "\n")
    except CRMNError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
