"""What a plan will cost: the seconds per epoch ``bench`` recorded on this machine
(``$CRMN_CACHE/bench-speeds.json``, by row, stack, device, dtype) times the expected epochs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence

from crmn import compile_cache, runlog
from crmn.registry import StackOptions

SPEEDS = "bench-speeds.json"
STAGE_EPOCHS_PER_PATIENCE = 6  # the plateau search's assumed stage length / patience
#: training images per epoch of the final run (SVHN: train + extra)
TRAIN_IMAGES = {"cifar100": 50_000, "cifar10": 50_000, "svhn": 604_388}
DAY = 86_400
#: where bench left no figure, a step is assumed to reach this share of the device's measured
#: float32 ceiling (Theano's C backend reached about a quarter on a CPU: REPRODUCING.md §5)
ASSUMED_SHARE = 0.25


def speeds_path() -> Path:
    return compile_cache.folder()[0] / SPEEDS


def key(row: str, options: StackOptions) -> str:
    mode = f"-{options.theano_mode}" if options.backend == "theano" else ""
    return f"{row}|{options.backend}{mode}|{options.device}|{options.dtype}"


def read_speeds(path: Optional[Path] = None) -> Dict[str, float]:
    try:
        data = json.loads((path or speeds_path()).read_text())
        return {str(k): float(v) for k, v in data.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def record(results: Sequence[Dict], options: Sequence[StackOptions],
           path: Optional[Path] = None) -> Path:
    """Add ``bench``'s results (run in stacks ``options``) to the recorded speeds; the file."""
    path = path or speeds_path()
    speeds = read_speeds(path)
    speeds.update({key(r["row"], o): r["sec_per_epoch"] for r, o in zip(results, options)})
    path.parent.mkdir(parents=True, exist_ok=True)
    runlog.write_json(path, dict(sorted(speeds.items())))  # atomic, as every archive file
    return path


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


def estimate(plan, speeds: Optional[Dict[str, float]] = None) -> str:
    """One line: runs, device, estimated wall time (or how to measure it first)."""
    speeds = read_speeds() if speeds is None else speeds
    rows = sorted({r.label for r in plan.runs})
    stack = plan.stack
    head = (f"plan: {len(plan.runs)} run(s) ({len(rows)} row(s) x seeds) on {stack.device} "
            f"({stack.describe()})")
    if plan.runs[0].spec.row is None:
        return f"{head}; a tiny network on tiny data: minutes"
    specs = [run.spec for run in plan.runs]
    missing = sorted({s.row for s in specs if key(s.row, stack) not in speeds})
    if missing:  # a rough guess from the FLOPs and this device's ceiling, measured now
        from crmn import roofline
        ceiling = roofline.fp32_ceiling(stack.device)
        speeds = {**speeds, **{key(s.row, stack): roofline.train_flops_per_image(s.model)
                               * 50_000 / (ASSUMED_SHARE * ceiling) for s in specs
                               if s.row in missing}}
    total = sum(speeds[key(s.row, stack)] * TRAIN_IMAGES[s.dataset] / 50_000
                * expected_epochs(s.train) for s in specs)
    how = (f"FLOPs at {ASSUMED_SHARE:.0%} of this device's float32 ceiling for "
           f"{','.join(missing)}, a rough guess: `bash run_experiments.sh bench --rows "
           f"{','.join(missing)} {_stack_flags(stack)}` measures" if missing
           else "bench's s/epoch")
    line = f"{head}; about {_time(total)} ({how} x expected epochs, REPRODUCING.md §2)"
    if total > DAY:
        line += ("; faster: a GPU (--device cuda), --backend torch, or --launcher slurm "
                 "(runs side by side)")
    return line


def _stack_flags(stack: StackOptions) -> str:
    out = [f"--backend {stack.backend}", f"--device {stack.device}"]
    if stack.backend == "theano":
        out.append(f"--theano-mode {stack.theano_mode}")
    return " ".join(out + ([f"--dtype {stack.dtype}"] if stack.dtype != "float32" else []))

