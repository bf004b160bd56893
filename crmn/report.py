"""Published versus reproduced numbers, rendered from run directories only (docs/spec.md §7):
:func:`compare` prints the comparison with :mod:`crmn.paper` and writes ``REPORT.md`` with
Figure-3-style learning curves; a row without runs is *missing*: nothing is dropped silently."""
from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, TextIO, Tuple

from crmn import paper, runlog, tables
from crmn.config import ModelConfig, TrainConfig, json_view
from crmn.errors import DataError, RunError
from crmn.schema import names

FIGURE3_ROWS = tuple(r.id for r in paper.TABLE1[3::4])  # the models of the paper's Figure 3


@dataclass
class SeedRun:
    """One run directory ``<row>/seed<k>/`` as :func:`crmn.runlog.load_run` reads it."""
    run: runlog.RunRecord
    seed: int

    def best_val_acc(self) -> Optional[float]:
        """Highest validation accuracy of the search run (fraction), None without one."""
        vals = [r["eval_acc"] for r in self.run.log if r.get("eval_split") == "val"]
        return max(vals, default=None)

    def sec_per_epoch(self) -> Optional[float]:
        """The median final-run epoch time (while running: of the logged epochs)."""
        if self.run.finished and self.run.summary.get("sec_per_epoch") is not None:
            return float(self.run.summary["sec_per_epoch"])
        recs = self.run.phase("final") or self.run.log
        secs = [r["seconds"] for r in recs if "seconds" in r]
        return statistics.median(secs) if secs else None

    def departures(self, row: Optional[paper.Row]) -> List[Tuple[str, bool]]:
        """What makes this run other than ``row`` as published, each as ``(note, test)``:
        ``test`` is False unless it is another reading of the paper (an ``interpretation``)."""
        config, summary = self.run.config, self.run.summary or {}
        out: List[Tuple[str, bool]] = []
        data = (config.get("data"), summary.get("data"))
        # "fake_data": the flag of files written before issue 33
        if config.get("fake_data") or summary.get("fake_data") or "fake" in data:
            out.append(("FAKE DATA", False))
        elif "unverified" in data:
            out.append(("UNVERIFIED DATA (" + (config.get("data_description")
                                               or "--unverified-data") + ")", False))
        elif config.get("data_description"):  # --subset on the official data
            out.append((config["data_description"], False))
        dataset = config.get("dataset") or summary.get("dataset")
        if row is not None and dataset not in (None, row.dataset):
            out.append((f"dataset {dataset} (row: {row.dataset})", False))
        for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
            have = config.get(section) or {}
            want = cls.for_row(row) if row is not None else None
            for f in fields(cls):
                m = f.metadata
                if f.name not in have or m.get("per_run"):
                    continue
                value = json_view(have[f.name])
                if m.get("departure"):  # a departure whatever the row
                    if value is not None:
                        shown = m["show"](tuple(value) if isinstance(value, list) else value)
                        out.append((m["departure"].format(shown), False))
                elif want is not None and value != json_view(getattr(want, f.name)):
                    out.append((f"{f.name} {value} (row: {json_view(getattr(want, f.name))})",
                                bool(m.get("interpretation"))))
        return out


#: Fields the paper leaves open (docs/spec.md §4-5): another value keeps the run's Δ.
INTERPRETATIONS = names(ModelConfig, "interpretation") | names(TrainConfig, "interpretation")


def comparable(run: SeedRun, row: Optional[paper.Row]) -> Tuple[bool, str]:
    """Is ``run`` a test of ``row`` as the paper ran it: ``(True, "")`` or ``(False, why)``."""
    why = [note for note, test in run.departures(row) if not test]
    return (not why, "; ".join(why))


def load_seed_run(path: Path) -> SeedRun:
    digits = path.name[4:]
    return SeedRun(run=runlog.load_run(path), seed=int(digits) if digits.isdigit() else 0)


@dataclass
class RowRuns:
    """Every seed of one row of one experiment (possibly none: a missing row)."""
    experiment: str
    row_id: str
    runs: List[SeedRun] = field(default_factory=list)

    @property
    def row(self) -> Optional[paper.Row]:
        return next((r for r in paper.ROWS if r.id == self.row_id), None)

    @property
    def finished(self) -> List[SeedRun]:
        return [r for r in self.runs if r.run.finished]

    def test_accs(self) -> List[float]:
        return [100.0 * float(r.run.summary["test_acc"]) for r in self.finished]

    def not_comparable(self) -> str:
        """Why the finished seeds are no test of the paper ('' when they all are)."""
        why = (w for r in self.finished for w in comparable(r, self.row)[1].split("; ") if w)
        return "; ".join(dict.fromkeys(why))  # each reason once, in order

    def notes(self) -> List[str]:
        return list(dict.fromkeys(n for r in self.runs for n, _ in r.departures(self.row)))

    def status(self) -> str:
        if not self.runs:
            return "missing"
        done = len(self.finished)
        parts = [f"done {done}/{len(self.runs)}"] if done else []
        for r in self.runs:
            if not r.run.finished:
                last = r.run.log[-1] if r.run.log else None
                where = (f"{last.get('phase')} epoch {last.get('epoch')}" if last
                         else "no epoch yet")
                parts.append(f"seed{r.seed} running or stopped ({where})")
        return "; ".join(parts)


def runs_folder(directory: Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: " + ("not a folder" if directory.exists()
                                            else "no such folder")
                        + "; give the folder the runs were written to (--out-dir, e.g. "
                          "runs/table1)")
    return directory


def collect(directory: Path) -> Dict[str, List[RowRuns]]:
    """Runs below ``directory`` by experiment, then row, paper rows first (maybe missing)."""
    directory = runs_folder(directory)
    seed_dirs = [p for p in runlog.find_runs(directory)
                 if p.name.startswith("seed") and p.parent != directory]
    if not seed_dirs:
        raise DataError(f"no runs below {directory} (run directories look like "
                        f"<experiment>/<row>/seed<k>/ with a config.json)")
    grouped: Dict[str, Dict[str, RowRuns]] = {}
    for sd in seed_dirs:
        run, row_dir = load_seed_run(sd), sd.parent
        exp = run.run.config.get("experiment") or row_dir.parent.name
        rows = grouped.setdefault(exp, {})
        rows.setdefault(row_dir.name, RowRuns(exp, row_dir.name)).runs.append(run)
    if directory.name in paper.EXPERIMENTS:
        grouped.setdefault(directory.name, {})
    out: Dict[str, List[RowRuns]] = {}
    for exp, rows in grouped.items():
        ordered = [rows.pop(r.id, RowRuns(exp, r.id)) for r in paper.EXPERIMENTS.get(exp, ())]
        out[exp] = ordered + [rows[k] for k in sorted(rows)]
        for rr in out[exp]:
            rr.runs.sort(key=lambda s: s.seed)
    return out


def mean_std(values: Sequence[float]):
    """(mean, sample standard deviation (ddof 1; None for n < 2), n); (None, None, 0) if empty."""
    n = len(values)
    if n == 0:
        return None, None, 0
    m = sum(values) / n
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else None), n


def _fmt(v, spec=".2f"):
    return "" if v is None else format(v, spec)


def row_line(rr: RowRuns) -> Dict[str, str]:
    row = rr.row
    params = next((p for p in ((r.run.summary or {}).get("params") or r.run.config.get("params")
                               for r in rr.runs) if p is not None), None)
    secs = [s for s in (r.sec_per_epoch() for r in rr.runs) if s is not None]
    devices = sorted({str((r.run.summary or {}).get("device") or r.run.config.get("device")
                          or "?") for r in rr.runs})
    m, sd, n = mean_std(rr.test_accs())
    acc = (f"{m:.2f}" + (f" ± {sd:.2f}" if sd is not None else "") + f" (n={n})" if n
           else _last_logged(rr))
    ref = row.paper_accuracy if row else None
    paper_acc_s = _fmt(ref)
    if row is not None and row.paper_accuracy_mean is not None:
        paper_acc_s = (f"{row.paper_accuracy_mean:.2f} ± {row.paper_accuracy_std:g} "
                       f"(best {row.paper_accuracy:.2f})")
        ref = row.paper_accuracy_mean
    return {
        "row": rr.row_id, "model": row.label if row else _model_label(rr),
        "params": _fmt(params / 1e6 if params is not None else None),
        "paper_params": _fmt(row.paper_params_m if row else None),
        "sec": (f"{statistics.median(secs):.1f} ({', '.join(devices)})" if secs else ""),
        "paper_sec": _fmt(row.paper_sec_per_epoch if row else None, "g"),
        "acc": acc, "paper_acc": paper_acc_s,
        "delta": (f"{m - ref:+.2f}" if n and ref is not None and not rr.not_comparable()
                  else ""),
        "status": rr.status(),
        "compiled": "; ".join(f"seed {r.seed}: {note}" for r in rr.runs
                              for note in [runlog.compile_note(r.run.log)] if note),
        "notes": "; ".join(rr.notes()),
    }


def _last_logged(rr: RowRuns) -> str:
    """A stopped row's last logged accuracy, e.g. ``41.20 (last logged: val, ...)``."""
    logged = [(r.run.log[-1], r.seed) for r in rr.runs if r.run.log]
    if not logged:
        return ""
    last, seed = max(logged, key=lambda e: (e[0].get("phase") == "final", e[0].get("epoch", 0)))
    return (f"{100 * float(last['eval_acc']):.2f} (last logged: {last.get('eval_split')}, "
            f"{last.get('phase')} epoch {last.get('epoch')}, seed {seed})")


def _model_label(rr: RowRuns) -> str:
    """``CRMN-8x0.5`` from a run's config.json, for runs that are no paper row."""
    model = next((r.run.config.get("model") for r in rr.runs if r.run.config.get("model")), None)
    if not model:
        return ""
    return f"{'CRMN' if model.get('memory') else 'ResNet'}-{6 * model['n'] + 2}x{model['k']:g}"


def five_repetitions(rr: RowRuns) -> Optional[Dict]:
    """Section 4.2's repeated runs: mean ± std, and the test accuracy of the seed best on val."""
    if not rr.finished:
        return None
    m, sd, n = mean_std(rr.test_accs())
    with_val = [r for r in rr.finished if r.best_val_acc() is not None]
    best = max(with_val, key=lambda r: r.best_val_acc()) if with_val else None
    return {"mean": m, "std": sd, "n": n, "best_seed": best.seed if best else None,
            "best_test": 100.0 * float(best.run.summary["test_acc"]) if best else None}


COLUMNS = (("row", "row"), ("model", "model"), ("params", "params M ours"),
           ("paper_params", "params M paper"), ("sec", "s/epoch ours (device)"),
           ("paper_sec", "s/epoch paper"), ("acc", "test acc % ours"),
           ("paper_acc", "test acc % paper"), ("delta", "Δ"), ("status", "status"),
           ("compiled", "compiled (s, cache)"), ("notes", "not as published"))


def render(groups: Dict[str, List[RowRuns]], plots: Sequence[str] = ()) -> str:
    out = ["# CRMN reproduction: published vs reproduced", "",
           "Paper numbers: `crmn/paper.py` (Moniz & Pal 2016, Tables 1-3, section 4.2). "
           "Ours: mean ± sample std over seeds (n). Paper seconds per epoch are the "
           "authors' GPU; ours are training seconds of a final-run epoch on the device "
           "shown (median over epochs and seeds). Δ is left blank where the runs are no "
           "test of the paper (fake or unverified data, another dataset, a changed model, "
           "capped epochs, a given schedule), with the reason under the table; another "
           "reading of a point the paper leaves open (docs/spec.md §4) keeps its Δ and is listed "
           "under *not as published*.", ""]
    for exp, rows in groups.items():
        out += [f"## {exp}", ""]
        lines = [row_line(rr) for rr in rows]
        out += [*tables.markdown_lines([c[1] for c in COLUMNS],
                                       [[ln[c[0]] for c in COLUMNS] for ln in lines]), ""]
        blank = [f"- {rr.row_id}: {rr.not_comparable()}" for rr in rows
                 if rr.finished and rr.row is not None and rr.not_comparable()]
        if blank:
            out += ["Δ left blank: no test of the paper's setting:", "", *blank, ""]
        if exp in paper.METHODS:
            out += [f"### {exp}: against the methods the paper compares with", ""]
            table = [[m.name, f"{m.accuracy:.2f}", ""] for m in paper.METHODS[exp]]
            table += [[f"{rr.row.label} ({rr.row.id})", ln["paper_acc"], ln["acc"] or rr.status()]
                      for rr, ln in zip(rows, lines) if rr.row is not None]
            out += [*tables.markdown_lines(["method", "paper acc %", "ours acc %"], table), ""]
        for rr in rows:
            row = rr.row
            if row is None or row.paper_accuracy_mean is None:
                continue
            rep = five_repetitions(rr)
            out += [f"### {row.id}: {row.seeds} repetitions (section 4.2)", ""]
            if rep is None:
                out += [f"No finished seed yet ({rr.status()}).", ""]
                continue
            sd = f" ± {rep['std']:.3f}" if rep["std"] is not None else ""
            best = (f"{rep['best_test']:.2f} (seed {rep['best_seed']})"
                    if rep["best_test"] is not None else "n/a (no search run logged)")
            head = ["", "mean ± std %", "best on validation: test %", "n"]
            out += [*tables.markdown_lines(head, [
                ["paper", f"{row.paper_accuracy_mean:.2f} ± {row.paper_accuracy_std:g}",
                 f"{row.paper_accuracy:.2f}", str(row.seeds)],
                ["ours", f"{rep['mean']:.2f}{sd}", best, str(rep["n"])]]), ""]
    if plots:
        out += ["## Learning curves (in the spirit of the paper's Figure 3)", "",
                *[f"![{Path(p).stem}]({Path(p).name})" for p in plots], ""]
    return "\n".join(out)


def _curves(run: SeedRun):
    """(epochs, train loss, test-error epochs, test error %, phase, lr drops) of the final
    run (Figure 3), or of the search run (validation error) before the final run starts."""
    phase = "final" if run.run.phase("final") else "search"
    recs = run.run.phase(phase)
    ep = list(range(1, len(recs) + 1))  # epochs count on across lr stages
    loss = [r.get("train_loss") for r in recs]
    err = [100.0 * (1.0 - r["eval_acc"]) for r in recs if r.get("eval_acc") is not None]
    ep_err = [e for e, r in zip(ep, recs) if r.get("eval_acc") is not None]
    drops = [e for e, a, b in zip(ep[1:], recs, recs[1:]) if b.get("stage") != a.get("stage")]
    return ep, loss, ep_err, err, phase, drops


NOT_THE_PAPER = " (not the paper's setting)"  # a dashed curve's legend: no test of the paper


def _plot(series, title: str, path: Path) -> None:
    """Figure-3-style curves of ``series``: ``(label, SeedRun, test of the paper?)``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, run, test in series:
        ep, loss, ep_err, err, phase, drops = _curves(run)
        tag = label if phase == "final" else f"{label} (search run, val)"
        tag += "" if test else NOT_THE_PAPER  # dashed: no test of the paper (comparable)
        style = dict(lw=1.4, marker="o" if len(ep) <= 40 else None, ms=3,  # short: epochs
                     ls="-" if test else "--")
        line, = ax_l.plot(ep, loss, label=tag, **style)
        ax_r.plot(ep_err, err, label=tag, **style)
        for e in drops:  # dotted: learning-rate drops, in the run's colour
            for ax in (ax_l, ax_r):
                ax.axvline(e - 0.5, color=line.get_color(), ls=":", lw=1, alpha=0.6)
    ax_l.set(xlabel="epoch of the final run", ylabel="training loss (cross-entropy)",
             title="Training set learning curves")
    ax_r.set(xlabel="epoch of the final run", ylabel="test error (%)",
             title="Test set error during final optimisation")
    last = max([len(_curves(run)[0]) for _, run, _ in series] + [1])
    for ax in (ax_l, ax_r):
        ax.set_xlim(0.5, last + 0.5)  # whole epochs, even for a one-epoch curve
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(groups: Dict[str, List[RowRuns]], directory: Path) -> List[Path]:
    written = []
    present = [rr for rows in groups.values() for rr in rows if any(r.run.log for r in rr.runs)]
    fig3 = [rr for rr in present if rr.row_id in FIGURE3_ROWS]
    name = lambda rr: rr.row.label if rr.row else rr.row_id
    # figure3.png: a curve per row (its first seed with a log); a lone row has curves_<row>
    if fig3 or len(present) > 1:
        path = directory / "figure3.png"
        firsts = [(rr, next(r for r in rr.runs if r.run.log)) for rr in fig3 or present]
        _plot([(name(rr), r, comparable(r, rr.row)[0]) for rr, r in firsts],
              "Last row of each block of Table 1" if fig3 else "Rows present", path)
        written.append(path)
    for rr in present:
        path = directory / f"curves_{rr.row_id}.png"
        _plot([(f"{name(rr)} seed {r.seed}", r, comparable(r, rr.row)[0])
               for r in rr.runs if r.run.log], f"{name(rr)} ({rr.experiment})", path)
        written.append(path)
    return written


def compare(directory: Path, *, plots: bool = True, out: Optional[TextIO] = None) -> Path:
    """Print the comparison, then write REPORT.md and PNGs (else :class:`RunError`); its path."""
    directory = Path(directory)
    groups = collect(directory)
    pngs: List[Path] = []
    unwritten, cause = [], ""  # what could not be written; cause: the first OSError's
    if plots:
        try:
            pngs = write_plots(groups, directory)
        except OSError as exc:
            unwritten.append("the plots")
            cause = exc.strerror or exc.__class__.__name__
    text = render(groups, pngs)
    stream = out or sys.stdout
    stream.write(text + "\n")
    report = directory / "REPORT.md"
    try:
        runlog.replace_file(report, (text + "\n").encode())  # atomically
    except OSError as exc:
        unwritten.insert(0, report.name)
        cause = cause or (exc.strerror or exc.__class__.__name__)
    if unwritten:
        stream.flush()
        raise RunError(f"{directory}: {' and '.join(unwritten)} could not be written "
                       f"({cause}); the comparison is printed above")
    stream.write(f"wrote {report}" + (f" and {len(pngs)} plot(s)" if pngs else "") + "\n")
    return report
