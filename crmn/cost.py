"""What a plan will cost: the seconds per epoch ``bench`` recorded on this machine
(``$CRMN_CACHE/bench-speeds.json``, by row, options, device, dtype) times the expected epochs,
divided by the speed-up of runs sharing a GPU where gpucheck measured it. The same file keeps
the best ceiling bench measured per device (``ceiling|DEVICE``) and gpucheck's packing per
GPU model (``packing|MODEL``); the speeds are its number values, read one by one."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence

from crmn import compile_cache, registry, runlog
from crmn.registry import BackendOptions

SPEEDS = "bench-speeds.json"
STAGE_EPOCHS_PER_PATIENCE = 6  # the plateau search's assumed stage length / patience
#: training images per epoch of the final run (SVHN: train + extra)
TRAIN_IMAGES = {"cifar100": 50_000, "cifar10": 50_000, "svhn": 604_388}
DAY = 86_400
#: where bench left no figure, a step is assumed to reach this share of the device's measured
#: float32 ceiling (Theano's C mode reached about a quarter on a CPU: REPRODUCING.md §5)
ASSUMED_SHARE = 0.25


def speeds_path() -> Path:
    return compile_cache.folder()[0] / SPEEDS


def key(row: str, options: BackendOptions) -> str:
    return f"{row}|{registry.label(options)}|{options.device}|{options.dtype}"


def _read(path: Optional[Path] = None) -> Dict:
    try:
        data = json.loads((path or speeds_path()).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_speeds(path: Optional[Path] = None) -> Dict[str, float]:
    """The recorded seconds per epoch; any other value (ceiling, packing, broken) is skipped."""
    return {str(k): float(v) for k, v in _read(path).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0}


def _entry(name: str, path: Optional[Path] = None) -> Optional[Dict]:
    value = _read(path).get(name)
    return value if isinstance(value, dict) else None


def read_ceiling(device: str, path: Optional[Path] = None) -> Optional[Dict]:
    """The best ceiling bench measured on ``device`` here (roofline.measure_ceiling's dict)."""
    return _entry(f"ceiling|{device}", path)


def read_packing(gpu: str, path: Optional[Path] = None) -> Optional[Dict]:
    """gpucheck's packing on GPU model ``gpu``: ``{"speedup": {K: x}, "peak_mem_bytes": {K:
    bytes}, "memory_bytes": the GPU's, ...}`` (K as text)."""
    return _entry(f"packing|{gpu}", path)


def _update(entries: Dict, path: Optional[Path] = None) -> Path:
    path = path or speeds_path()
    data = {**_read(path), **entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    runlog.write_json(path, dict(sorted(data.items())))  # atomic, as every archive file
    return path


def record(results: Sequence[Dict], options: Sequence[BackendOptions],
           path: Optional[Path] = None, ceiling: Optional[Dict] = None) -> Path:
    """Add ``bench``'s results (run in backends ``options``) and its ``ceiling`` to the file."""
    entries = {key(r["row"], o): r["sec_per_epoch"] for r, o in zip(results, options)}
    if ceiling:
        entries[f"ceiling|{ceiling['device']}"] = ceiling
    return _update(entries, path)


def record_packing(gpu: str, table: Dict, path: Optional[Path] = None) -> Path:
    return _update({f"packing|{gpu}": table}, path)


def best_packing(table: Optional[Dict]) -> Optional[tuple]:
    """``(K, speed-up)`` of the fastest K measured, or None."""
    got = [(int(k), float(x)) for k, x in ((table or {}).get("speedup") or {}).items()
           if str(k).isdigit() and isinstance(x, (int, float))]
    return max(got, key=lambda kx: kx[1]) if got else None


def expected_epochs(train) -> int:
    """Epochs one run is expected to train: ``--schedule``'s sum, else a search and a final
    run, stages of :data:`STAGE_EPOCHS_PER_PATIENCE` × patience epochs; at most the cap."""
    cap = train.epochs_cap
    if train.schedule is not None:
        return sum(min(e, cap) if cap else e for e in train.schedule)
    stage = STAGE_EPOCHS_PER_PATIENCE * train.patience
    return 2 * len(train.lr_stages) * (min(stage, cap) if cap else stage)


def _time(seconds: float) -> str:
    if seconds >= DAY:
        return f"{seconds / DAY:.1f} days"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def estimate(plan, speeds: Optional[Dict[str, float]] = None,
             packing: Optional[Dict] = None) -> str:
    """One line: runs, device, estimated wall time one run at a time on one device (or how to
    measure it first), and with the packing gpucheck measured on this GPU model."""
    speeds = read_speeds() if speeds is None else speeds
    if packing is None and plan.backend_options.device.startswith("cuda"):
        packing = read_packing(gpu_model())
    rows = sorted({r.label for r in plan.runs})
    options = plan.backend_options
    head = (f"plan: {len(plan.runs)} run(s) ({len(rows)} row(s) x seeds) on {options.device} "
            f"({options.describe()})")
    if plan.runs[0].spec.row is None:
        return f"{head}; a tiny network on tiny data: minutes"
    specs = [run.spec for run in plan.runs]
    missing = sorted({s.row for s in specs if key(s.row, options) not in speeds})
    if missing:  # a rough guess from the FLOPs and this device's ceiling, kept or measured now
        from crmn import roofline
        kept = (read_ceiling(options.device) or {}).get("fp32_tflops")
        ceiling = kept * 1e12 if isinstance(kept, (int, float)) and kept > 0 else \
            roofline.fp32_ceiling(options.device)
        speeds = {**speeds, **{key(s.row, options): roofline.train_flops_per_image(s.model)
                               * 50_000 / (ASSUMED_SHARE * ceiling) for s in specs
                               if s.row in missing}}
    total = sum(speeds[key(s.row, options)] * TRAIN_IMAGES[s.dataset] / 50_000
                * expected_epochs(s.train) for s in specs)
    how = (f"FLOPs at {ASSUMED_SHARE:.0%} of this device's float32 ceiling for "
           f"{','.join(missing)}, a rough guess: `bash run_experiments.sh bench --rows "
           f"{','.join(missing)} {_backend_flags(options)}` measures" if missing
           else "bench's s/epoch")
    line = f"{head}; about {_time(total)} ({how} x expected epochs, REPRODUCING.md §2)"
    best = best_packing(packing)
    if options.device.startswith("cuda") and best is None:
        line += ("; runs sharing a GPU unmeasured here: `bash run_experiments.sh gpucheck "
                 "--only packing` measures which --runs-per-gpu pays")
    elif options.device.startswith("cuda"):
        line += (f"; with --runs-per-gpu {best[0]}, the fastest measured ({best[1]:.2f}x the "
                 f"throughput of one run per GPU, gpucheck on {packing.get('gpu') or 'this GPU'})"
                 f": about {_time(total / best[1])} per GPU")
    if total > DAY:
        line += ("; faster: a GPU (--device cuda), --backend torch, or --launcher slurm "
                 "(runs side by side)")
    return line


def gpu_model() -> str:
    """The first GPU's name as nvidia-smi gives it ("" where it cannot)."""
    import subprocess
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (p.stdout.strip().splitlines() or [""])[0].strip() if p.returncode == 0 else ""


def _backend_flags(options: BackendOptions) -> str:
    out = [f"--backend {options.backend}", f"--device {options.device}"]
    if options.backend == "theano":
        out.append(f"--theano-mode {options.theano_mode}")
    return " ".join(out + ([f"--dtype {options.dtype}"] if options.dtype != "float32" else []))

