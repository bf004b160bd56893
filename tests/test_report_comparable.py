"""crmn.report: Δ only where a run tests the paper; compare/status faults in one line.

Run directories are fabricated as crmn.train writes them (config.json with model, train,
dataset and data fields; log.jsonl; summary.json), each departing from its row in one way.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crmn import paper, report
from crmn.config import ModelConfig, TrainConfig
from crmn.errors import DataError
from crmn.launch import status
from test_report import write_run

#: the way on of a missing runs folder
T = "; give the folder the runs were written to (--out-dir, e.g. runs/table1)"

ROOT = Path(__file__).resolve().parents[1]
ROW = paper.row("t1-crmn32x1")  # CIFAR-100, n 5, k 1, batch 100


def _run(seed_dir, test_acc=0.7, *, data="official", dataset=None, model=None, train=None,
         row=ROW):
    """One finished run of ``row``; keyword arguments replace fields of its config."""
    write_run(seed_dir, row=row.id, experiment="table1", seed=0, test_acc=test_acc)
    path = seed_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(data=data, fake_data=data == "fake", dataset=dataset or row.dataset,
                  model=dataclasses.replace(ModelConfig.for_row(row), **(model or {})).to_dict(),
                  train=dataclasses.replace(TrainConfig.for_row(row, seed=0),
                                            **(train or {})).to_dict())
    path.write_text(json.dumps(config))
    return report.load_seed_run(seed_dir)


#: (case, config changes, the reason comparable() gives); each is no test of the paper
NOT_A_TEST = [
    ("fake", dict(data="fake"), "FAKE DATA"),
    ("unverified", dict(data="unverified"), "UNVERIFIED DATA (--unverified-data)"),
    ("dataset", dict(dataset="cifar10", model={"classes": 10}),
     "dataset cifar10 (row: cifar100); classes 10 (row: 100)"),
    ("n", dict(model={"n": 1}), "n 1 (row: 5)"),
    ("k", dict(model={"k": 0.5}), "k 0.5 (row: 1)"),
    ("batch", dict(train={"batch_size": 10}), "batch_size 10 (row: 100)"),
    ("capped", dict(train={"epochs_cap": 1}), "epochs capped at 1 per stage"),
    ("schedule", dict(train={"schedule": (2, 1, 1)}), "fixed schedule 2,1,1"),
]


def _table_line(text, row_id):
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {row_id} "))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    return dict(zip([c[0] for c in report.COLUMNS], cells))


def test_a_run_as_published_is_a_test_and_shows_its_delta(tmp_path):
    run = _run(tmp_path / "table1" / ROW.id / "seed0", test_acc=0.70)
    assert report.comparable(run, ROW) == (True, "")
    text = report.compare(tmp_path / "table1", plots=False).read_text()
    line = _table_line(text, ROW.id)
    assert line["delta"] == f"{70.0 - ROW.paper_accuracy:+.2f}" and line["notes"] == ""
    assert "Δ left blank" not in text


@pytest.mark.parametrize("case,changes,reason", NOT_A_TEST, ids=[c[0] for c in NOT_A_TEST])
def test_a_run_that_is_no_test_of_the_paper_has_no_delta_and_says_why(tmp_path, case,
                                                                       changes, reason):
    run = _run(tmp_path / "table1" / ROW.id / "seed0", **changes)
    assert report.comparable(run, ROW) == (False, reason)
    text = report.compare(tmp_path / "table1", plots=False).read_text()
    line = _table_line(text, ROW.id)
    assert line["delta"] == "" and line["acc"] == "70.00 (n=1)"  # the number, not the Δ
    assert f"- {ROW.id}: {reason}" in text.split("Δ left blank")[1]


def test_another_reading_of_the_paper_keeps_its_delta(tmp_path):
    """An interpretation the paper leaves open (docs/spec.md §4) is a test of it: noted, Δ shown."""
    run = _run(tmp_path / "table1" / ROW.id / "seed0", model={"outgate": "tanh"},
               train={"nesterov": True})
    assert report.comparable(run, ROW) == (True, "")
    line = _table_line(report.compare(tmp_path / "table1", plots=False).read_text(), ROW.id)
    assert line["delta"] == f"{70.0 - ROW.paper_accuracy:+.2f}"
    assert "outgate tanh (row: logistic)" in line["notes"]
    assert "nesterov True (row: False)" in line["notes"]


def test_one_seed_that_is_no_test_blanks_the_row(tmp_path):
    d = tmp_path / "table1" / ROW.id
    _run(d / "seed0", test_acc=0.70)
    _run(d / "seed1", test_acc=0.72, model={"n": 1})
    text = report.compare(tmp_path / "table1", plots=False).read_text()
    assert _table_line(text, ROW.id)["delta"] == ""
    assert f"- {ROW.id}: n 1 (row: 5)" in text


@pytest.fixture
def drawn(monkeypatch):
    """Every figure report._plot saves: {file name: [(legend label, line style)]}."""
    from matplotlib.figure import Figure

    figures = {}
    save = Figure.savefig

    def record(fig, path, *args, **kwargs):
        figures[Path(path).name] = [(ln.get_label(), ln.get_linestyle())
                                    for ax in fig.axes for ln in ax.get_lines()
                                    if not ln.get_label().startswith("_")]
        return save(fig, path, *args, **kwargs)
    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def test_plots_mark_the_curves_that_are_no_test_of_the_paper(tmp_path, drawn):
    d = tmp_path / "table1"
    _run(d / "t1-resnet32x4" / "seed0", row=paper.row("t1-resnet32x4"))
    _run(d / "t1-crmn32x4" / "seed0", row=paper.row("t1-crmn32x4"), data="fake")
    report.compare(d, plots=True)
    assert (d / "figure3.png").stat().st_size > 0
    resnet, crmn = paper.row("t1-resnet32x4").label, paper.row("t1-crmn32x4").label
    marked = crmn + report.NOT_THE_PAPER
    assert report.NOT_THE_PAPER == " (not the paper's setting)"
    # two axes, one line per run on each: the fake-data run dashed and labelled
    assert sorted(drawn["figure3.png"]) == sorted([(resnet, "-"), (marked, "--")] * 2)
    assert drawn["curves_t1-crmn32x4.png"] == [(f"{crmn} seed 0{report.NOT_THE_PAPER}",
                                                "--")] * 2
    assert drawn["curves_t1-resnet32x4.png"] == [(f"{resnet} seed 0", "-")] * 2


# ------------------------------------------------------------------------------------------
# compare and status: a missing or read-only folder

def _cli(*args, prefix=()):
    return subprocess.run([*prefix, sys.executable, "-m", "crmn.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", ["compare", "status"])
def test_a_missing_folder_is_one_line(tmp_path, command):
    p = _cli(command, str(tmp_path / "nope"))
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr == f"error: {tmp_path / 'nope'}: no such folder{T}\n"
    (tmp_path / "file").write_text("x")
    p = _cli(command, str(tmp_path / "file"))
    assert p.returncode == 1 and p.stderr == f"error: {tmp_path / 'file'}: not a folder{T}\n"
    with pytest.raises(DataError, match="nope: no such folder"):
        (report.collect if command == "compare" else status.show)(tmp_path / "nope")


def _read_only(folder):
    """A command prefix under which ``folder`` cannot be written to, even by root."""
    if os.geteuid() != 0:
        for p in [folder, *folder.rglob("*")]:
            if p.is_dir():
                p.chmod(0o555)
        return ()
    # root ignores permissions: a read-only bind mount in a private mount namespace
    if shutil.which("unshare") is None:
        pytest.skip("running as root without unshare: cannot make a read-only folder")
    prefix = ("unshare", "-m", "sh", "-c",
              'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"',
              str(folder))
    if subprocess.run([*prefix, "touch", str(folder / "probe")],
                      capture_output=True).returncode == 0 or (folder / "probe").exists():
        pytest.skip("running as root where no read-only mount can be made")
    return prefix


def test_compare_of_a_read_only_folder_prints_the_table_then_one_line(tmp_path):
    d = tmp_path / "table1"
    _run(d / ROW.id / "seed0")
    prefix = _read_only(d)
    try:
        p = _cli("compare", str(d), prefix=prefix)
    finally:
        for q in [d, *d.rglob("*")]:
            if q.is_dir():
                q.chmod(0o755)
    assert p.returncode == 1
    assert f"| {ROW.id} " in p.stdout and "wrote" not in p.stdout  # the table came out
    cause = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    assert p.stderr == (f"error: {d}: REPORT.md and the plots could not be written "
                        f"({cause}); the comparison is printed above\n")
    assert sorted(p.name for p in d.iterdir()) == [ROW.id]  # nothing written, nothing left
