"""A finished run as files others load (``export``), and any weights measured on a test set
(``evaluate``). ``export`` writes ``<row>-<sha8>.pt`` (tensors and plain types only),
``<row>-<sha8>.npz`` (Lasagne names, ``names`` in ``get_all_param_values`` order, ``meta``
JSON) and ``MODEL.md`` (the model card); sha8: the first 8 hex digits of the file's SHA-256
(torch.hub's ``check_hash`` convention). Each file's record holds the run's preprocessing and
a digest of its arrays and record; crmn/weights.py reads them back as untrusted bytes."""
from __future__ import annotations

import hashlib
import io
import json
import shlex
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from crmn import checkpoint, convert, data, paper, registry, report, runlog, weights
from crmn import plan as plans
from crmn import train as trainer
from crmn.config import ModelConfig, TrainConfig
from crmn.errors import CheckpointError, ConfigError, RunError
from crmn.naming import count_trainable, param_specs, velocity_name

FORMAT = 2  # 2: the record holds preprocessing and digest


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def lasagne_order(native: List[str]) -> List[str]:
    """Lasagne names in :mod:`crmn.naming` order -> ``get_all_params`` order: within a layer,
    ``BatchNormLayer`` adds ``beta`` before ``gamma``, ``LSTMLayer`` ``cell_init`` first."""
    out = list(native)
    for i in range(len(out) - 1):
        a, b = out[i], out[i + 1]
        if (a.endswith(".gamma") and b == a[:-len("gamma")] + "beta") or \
                (a, b) == ("lstm.hid_init", "lstm.cell_init"):
            out[i], out[i + 1] = b, a
    return out


def _write_named(out_dir: Path, stem: str, suffix: str, payload: bytes) -> Path:
    name = f"{stem}-{hashlib.sha256(payload).hexdigest()[:8]}{suffix}"
    runlog.write_bytes_atomic(out_dir / name, payload)
    return out_dir / name


def _final_state(run_dir: Path) -> Tuple[Dict, Dict, Dict, ModelConfig]:
    """(summary, config, canonical arrays, ModelConfig) of a finished run's final model."""
    summary = runlog.finished_summary(run_dir)
    if summary is None:
        raise RunError(f"{run_dir}: not a finished run (no summary.json saying done); "
                       "finish it with its command and --resume, then export it")
    config = runlog.read_json(run_dir / runlog.CONFIG)
    cfg, canonical, meta = load_weights(run_dir / runlog.CHECKPOINT)
    if meta.get("phase") != "final" or meta.get("epoch") != summary.get("final_epochs"):
        raise CheckpointError(f"{run_dir / runlog.CHECKPOINT}: holds {meta.get('phase')} "
                              f"epoch {meta.get('epoch')}, not the final model of "
                              "summary.json; train the run again to export it")
    return summary, config, canonical, cfg


def export(run_dir, out_dir=None) -> Dict[str, Path]:
    """Write the .pt, .npz and MODEL.md of a finished run (default: RUN_DIR/export) by kind."""
    try:
        import torch
    except ImportError:
        raise ConfigError("export (it writes a .pt) needs torch, which this environment "
                          "lacks: use the pinned environment (no CRMN_PROFILE) or pip install "
                          "torch") from None
    run_dir = Path(run_dir)
    summary, config, canonical, cfg = _final_state(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    stem = config.get("row") or run_dir.parent.name
    info = {"format": FORMAT, "row": stem, "model": cfg.to_dict(),
            "dataset": config["dataset"], "dtype": config.get("dtype", "float32"),
            "preprocessing": summary.get("preprocessing")}  # None: a run from before it
    state = {k: np.ascontiguousarray(v) for k, v in
             convert.canonical_to_torch(cfg, canonical, with_velocity=False).items()}
    buf = io.BytesIO()
    torch.save(dict(info, digest=weights.digest(state, info),
                    state_dict={k: torch.from_numpy(v) for k, v in state.items()}), buf)
    paths = {"pt": _write_named(out, stem, ".pt", buf.getvalue())}
    native = convert.canonical_to_lasagne(cfg, canonical, with_velocity=False)
    buf = io.BytesIO()
    meta = json.dumps(dict(info, digest=weights.digest(native, info)))
    np.savez(buf, names=np.array(lasagne_order(list(native))), meta=np.array(meta), **native)
    paths["npz"] = _write_named(out, stem, ".npz", buf.getvalue())
    card = model_card(run_dir, summary, config, cfg, paths)
    runlog.write_bytes_atomic(out / "MODEL.md", card.encode())
    paths["card"] = out / "MODEL.md"
    return paths


def _commands(config: Dict, files: Dict[str, Path]) -> Tuple[str, str]:
    """The card's "reproduce" and "measure" lines, rendered by the schema from config.json."""
    try:
        spec = plans.spec_from_record(config)
    except ConfigError:
        return ("not recorded whole (config.json of an earlier format)",) * 2
    program = ["bash", str(plans.ROOT / "run_experiments.sh")]
    weights = files["pt" if spec.backend_options.backend == "torch" else "npz"].resolve()
    return (f"`{shlex.join(plans.reproduce_argv(spec, 'reproduced', program))}`",
            f"`{shlex.join(plans.evaluate_argv(spec, weights, program))}`")


def model_card(run_dir: Path, summary: Dict, config: Dict, cfg: ModelConfig,
               files: Dict[str, Path]) -> str:
    """MODEL.md: what the files are and what made them, from the run folder's files."""
    row = paper.row(config["row"]) if config.get("row") else None
    name = config.get("row") or run_dir.parent.name
    # why the run is no test of the paper (empty: it is one), in report.comparable's words
    ok, reasons = report.comparable(report.load_seed_run(run_dir), row)
    why = [] if row is not None else ["not a row of the paper"]
    why += [] if ok else reasons.split("; ")
    head = (f"# {name}, seed {config.get('seed', 0)}: NOT A TEST OF THE PAPER ({'; '.join(why)})"
            if why else f"# {name}, seed {config.get('seed', 0)}: a test of the paper's "
                        f"{row.label} ({row.table})")
    log = runlog.read_log(run_dir / runlog.LOG)
    seeds = map(runlog.finished_summary, sorted(run_dir.parent.glob("seed*")))
    mean, std, n = report.mean_std([100 * d["test_acc"] for d in seeds
                                    if d is not None and d.get("test_acc") is not None])
    ours = f"{100 * summary['test_acc']:.2f} % (this seed), test loss {summary['test_loss']:.4f}"
    if n > 1:
        ours += f"; {mean:.2f} ± {std:.2f} % over {n} seeds (sample std)"
    paper_acc = "(not a paper row)" if row is None else f"{row.paper_accuracy:.2f} %" + (
        f" (mean {row.paper_accuracy_mean} ± {row.paper_accuracy_std} over {row.seeds} runs)"
        if row.paper_accuracy_mean is not None else "")
    source = {"official": "the official files (checksums verified)",
              "fake": "FAKE data written by the archive (crmn.data.write_fake)",
              "unverified": "files NOT checked against the official ones "
                            "(--unverified-data)"}.get(config.get("data"), config.get("data"))
    if config.get("data_description"):
        source += f"; {config['data_description']}"
    search = [e for e in log if e["phase"] == "search"]
    seconds = sum(e.get("seconds", 0.0) for e in log)
    backend = config.get("backend", "?") + (f" ({config.get('theano_mode')})"
                                            if config.get("backend") == "theano" else "")
    versions = ", ".join(f"{k} {v}" for k, v in sorted(config.get("versions", {}).items()))
    reproduce, measure = _commands(config, files)
    rows = [("row", f"{name}" + ("" if row is None else f", {row.label} of {row.table}")),
            ("paper", paper_acc), ("ours", ours), ("dataset", f"{config.get('dataset')}: {source}"),
            ("schedule", f"found by the search: {summary.get('schedule_found')}; used: "
                         f"{summary.get('schedule_used')} epochs at lr "
                         f"{summary.get('lr_stages')}"),
            ("epochs", f"{len(search)} search + {summary.get('final_epochs')} final; "
                       f"{seconds:.0f} s of training, median "
                       f"{summary.get('sec_per_epoch') or 0:.1f} s per final epoch"),
            ("device", str(summary.get("device"))),
            ("backend", f"{backend}, {config.get('dtype')}"), ("versions", versions),
            ("parameters", f"{count_trainable(cfg):,} trainable"),
            ("reproduce", reproduce)]
    lines = [head, "", f"Exported by `bash run_experiments.sh export {run_dir}` from "
             "that folder's files.", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    lines += ["", "Files (`sha256sum -c` checks them here):", "", "```"]
    lines += [f"{sha256(p)}  {p.name}" for p in (files["pt"], files["npz"])]
    lines += ["```", "", "Made from (sha256 of the run folder's files):", "", "```"]
    lines += [f"{sha256(run_dir / f)}  {f}" for f in (runlog.CONFIG, runlog.LOG,
                                                      runlog.SUMMARY, runlog.CHECKPOINT)]
    lines += ["```", "", f"Measure them: {measure} (the other file with the other "
              "`--backend`: .pt torch, .npz theano); loading them is in README.md, Use the "
              "model.", ""]
    return "\n".join(lines)


def load_weights(path) -> Tuple[ModelConfig, Dict[str, np.ndarray], Dict]:
    """(ModelConfig, canonical arrays, info) of a ``.pt``, ``.npz`` or checkpoint ``.h5``."""
    path = Path(path)
    if path.suffix == ".h5":
        arrays, meta = checkpoint.load(path)
        cfg = ModelConfig(**meta["model"])
        return cfg, {s.name: arrays[s.name] for s in param_specs(cfg)}, meta
    if path.suffix not in (".pt", ".npz"):
        raise CheckpointError(f"{path}: unknown weights file type {path.suffix!r}; give a .pt, "
                              ".npz or checkpoint .h5")
    info, native = (weights.read_pt if path.suffix == ".pt" else weights.read_npz)(path)
    try:
        cfg = ModelConfig(**info["model"])
        to_canonical = convert.torch_to_canonical if path.suffix == ".pt" \
            else convert.lasagne_to_canonical
        return cfg, to_canonical(cfg, native, False, where=str(path)), info
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a weights file written by export "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                              "export the run again") from None


def evaluate(path, backend: str = registry.DEFAULT_BACKEND, device: str = "cpu",
             dataset: Optional[str] = None, data_dir=None, progress: bool = True, *,
             dtype: Optional[str] = None, theano_mode: Optional[str] = None,
             subset: Optional[int] = None, unverified: bool = False) -> Dict:
    """Test loss and accuracy of the weights in ``path`` on ``dataset``'s test split (theirs by
    default; ``subset``: the share a ``--subset`` run tested on), in ``dtype`` (default: the
    one they were trained in where ``backend`` has it, else float32)."""
    cfg, canonical, info = load_weights(path)
    dataset = dataset or info.get("dataset")
    if paper.DATASET_CLASSES.get(dataset) != cfg.classes:
        raise ConfigError(f"{path}: the network has {cfg.classes} classes, {dataset} has "
                          f"{paper.DATASET_CLASSES.get(dataset)}; choose a matching --dataset")
    own = info.get("dtype")
    options = registry.BackendOptions(
        backend=backend, device=device,
        theano_mode=theano_mode or registry.default_theano_mode(backend),
        dtype=dtype or (own if own in registry.BACKEND_DTYPES[backend] else registry.DEFAULT_DTYPE))
    registry.probe(options)
    split = data.prepare(dataset, data_dir, "final", 0, progress=progress, subset=subset,
                         unverified=unverified)
    backend = registry.build(options, cfg, TrainConfig())
    canonical.update({velocity_name(s.name): np.zeros(s.shape, np.float32)
                      for s in param_specs(cfg) if s.trainable})
    backend.set_state(canonical)
    loss, acc = trainer.evaluate(backend, split.eval_x, split.eval_y)
    return {"weights": str(path), "dataset": dataset, "images": len(split.eval_y),
            "test_loss": loss, "test_acc": acc, "backend": options.describe(),
            "device": backend.device}
