"""``replay RUN_DIR``: train again what a run folder records, from its config.json alone, and
say in one line whether the new log and summary equal the recorded ones: losses, accuracies
and schedule decisions; seconds, images/s, compile figures, dates and the device's words
left out (crmn/LOGS.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

from crmn import plan as plans, runlog
from crmn.errors import RunError, UsageError

VOLATILE = ("time", "seconds", "images_per_s", "compile_seconds", "cache_outcome",
            "compile_cache", "sec_per_epoch", "device")
#: what a resume may have changed that changes the numbers: the backend, not the data's path
BACKEND_FIELDS = tuple(plans.disk_key(n)[-1] for n, _ in plans.spec_fields()
                       if n.startswith("backend_options."))
MACHINE = ("versions", "threads", "ran_on", "cuda", "flags")  # provenance.record's


def default_out(run_dir: Path) -> Path:
    """``<row>/replay-seed<k>``: beside the run, not a ``seed*`` that compare would count."""
    return run_dir.parent / f"replay-{run_dir.name}"


def plan(run_dir, out_dir: Optional[Path] = None) -> plans.TrainPlan:
    """The run config.json records, into ``out_dir``, once checked to replay."""
    run_dir = Path(run_dir).resolve()
    path = run_dir / runlog.CONFIG
    config = runlog.read_json(path)
    spec = plans.spec_from_record(config, path)
    if runlog.finished_summary(run_dir) is None:
        raise RunError(f"{run_dir}: not a finished run (no summary.json saying done); finish "
                       "it with its command and --resume, then replay it")
    for r in config.get("resumes", []):
        changed = [f"{k} {config.get(k)} -> {r[k]}" for k in BACKEND_FIELDS
                   if k in r and r[k] != config.get(k)]
        if changed:
            raise RunError(f"{path}: resumed after {r['phase']} epoch {r['after_epoch']} "
                           f"with {', '.join(changed)}; replay trains on the settings a run "
                           "started with only, so this history cannot be replayed; train "
                           "the run afresh (the reproduce line of its export) to compare")
    out = Path(out_dir or default_out(run_dir)).resolve()
    if out == run_dir or run_dir in out.parents:
        raise UsageError(f"replay: --out-dir {out} is inside the run it checks; choose a "
                         "folder outside it")
    if out.is_dir() and any(out.iterdir()) and not (out / runlog.CONFIG).is_file():
        raise UsageError(f"replay: --out-dir {out} holds files but no run; choose an empty "
                         "or new folder")
    run = plans.PlannedRun(spec, run_dir.parent.name, out)
    return plans.TrainPlan(command=spec.experiment or "smoke", runs=(run,),
                           out_dir=out.parent, fresh=True, progress=False)


def _stable(entries: List[Dict]) -> List[Dict]:
    return [{k: v for k, v in e.items() if k not in VOLATILE} for e in entries]


def _first_difference(old: List[Dict], new: List[Dict]) -> Optional[str]:
    for a, b in zip(old, new):
        keys = [k for k in dict(a, **b) if a.get(k) != b.get(k)]
        if keys:
            k = keys[0]
            by = f" (by {abs(b[k] - a[k]):.3g})" if all(
                isinstance(e.get(k), (int, float)) for e in (a, b)) else ""
            where = f"{a['phase']} epoch {a['epoch']}" if "phase" in a else "summary.json"
            return f"{where} differs first: {k} {a.get(k)!r} recorded, {b.get(k)!r} now{by}"
    if len(old) != len(new):
        return f"the record logs {len(old)} epochs, the replay {len(new)}"
    return None


def _machine(old: Dict, new: Dict) -> List[str]:
    """What differs between the machines and libraries of two config.json files."""
    out = []
    for key in MACHINE:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k} {a.get(k)} -> {b.get(k)}" for k in sorted(dict(a, **b))
                    if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{key} {a} -> {b}")
    return out


def verdict(run_dir, out_dir) -> Tuple[str, bool]:
    """The one line that ends replay, and whether the two runs are the same."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    logs = [_stable(runlog.read_log(d / runlog.LOG)) for d in (run_dir, out_dir)]
    sums = [_stable([runlog.read_json(d / runlog.SUMMARY)]) for d in (run_dir, out_dir)]
    diff = _first_difference(*logs) or _first_difference(*sums)
    machine = _machine(*(runlog.read_json(d / runlog.CONFIG) for d in (run_dir, out_dir)))
    where = ("" if not machine else f"; this machine differs from the record "
             f"({'; '.join(machine)}): bit-identical results are promised on the CPU with the "
             "same threads and library versions only (float32 sums follow the thread count, "
             "GPU kernels the libraries and the device)")
    if diff is None:
        return "same" + where, True
    return (f"differs: {diff}" + (where or "; same machine, threads and library versions: "
                                  "a real difference"), False)
