"""crmn.report renders only from run directories (crmn/LOGS.md); paper numbers from crmn.paper."""
import dataclasses
import json
import math

import pytest

from crmn import paper, report
from crmn.errors import CRMNError

pytestmark = pytest.mark.current  # framework-free: runs in the current environment too


def write_run(seed_dir, *, row, experiment, seed, test_acc=None, final_epochs=3,
              val_accs=(0.3, 0.4), params=123456, device="cpu", sec=2.0):
    """A run directory as crmn.train writes it; no summary.json when test_acc is None."""
    seed_dir.mkdir(parents=True)
    (seed_dir / "config.json").write_text(json.dumps(
        {"row": row, "experiment": experiment, "dataset": "cifar100", "backend": "theano",
         "device": device, "dtype": "float32", "seed": seed}))
    lines = []
    for e, acc in enumerate(val_accs, 1):
        lines.append({"phase": "search", "epoch": e, "stage": 0, "lr": 0.1,
                      "train_loss": 4.0 - e, "train_acc": 0.1, "eval_split": "val",
                      "eval_loss": 3.0, "eval_acc": acc, "seconds": sec,
                      "images_per_s": 50.0, "decision": "continue", "time": 0})
    if test_acc is not None:
        for e in range(1, final_epochs + 1):
            lines.append({"phase": "final", "epoch": e, "stage": 0, "lr": 0.1,
                          "train_loss": 3.0 / e, "train_acc": 0.2, "eval_split": "test",
                          "eval_loss": 2.0, "eval_acc": test_acc * e / final_epochs,
                          "seconds": sec, "images_per_s": 50.0, "decision": "continue",
                          "time": 0})
    (seed_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if test_acc is not None:
        (seed_dir / "summary.json").write_text(json.dumps(
            {"row": row, "backend": "theano", "device": device, "dataset": "cifar100",
             "params": params, "schedule_found": [2], "schedule_used": [3],
             "lr_stages": [0.1], "test_loss": 2.0, "test_acc": test_acc,
             "final_epochs": final_epochs, "sec_per_epoch": sec, "images_per_s": 50.0,
             "status": "done"}))


@pytest.fixture
def table1_dir(tmp_path):
    d = tmp_path / "table1"
    write_run(d / "t1-crmn32x4" / "seed0", row="t1-crmn32x4", experiment="table1", seed=0,
              test_acc=0.70, params=14_010_000)
    write_run(d / "t1-crmn32x4" / "seed1", row="t1-crmn32x4", experiment="table1", seed=1,
              test_acc=0.74, params=14_010_000)
    # running: log lines but no summary.json, and a torn last line from a SIGKILL
    write_run(d / "t1-resnet32x4" / "seed0", row="t1-resnet32x4", experiment="table1", seed=0)
    with open(d / "t1-resnet32x4" / "seed0" / "log.jsonl", "a") as fh:
        fh.write('{"phase": "search", "ep')
    return d


def test_compare_table1_done_running_missing(table1_dir, capsys):
    path = report.compare(table1_dir, plots=False)
    text = path.read_text()
    printed = capsys.readouterr().out
    assert path == table1_dir / "REPORT.md" and text.strip() in printed
    lines = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| t1-")}
    # every Table 1 row appears: 2 present, 10 missing
    assert set(lines) == {r.id for r in paper.TABLE1}
    crmn = lines["t1-crmn32x4"]
    ref = paper.row("t1-crmn32x4")
    # ours: mean 72.00, sample std of (70, 74) = 2.83, n=2; paper 76.39; delta -4.39
    assert "72.00 ± 2.83 (n=2)" in crmn
    assert f"{ref.paper_accuracy:.2f}" in crmn and "-4.39" in crmn
    assert "14.01" in crmn and f"{ref.paper_params_m:.2f}" in crmn
    assert "2.0 (cpu)" in crmn and f"{ref.paper_sec_per_epoch:g}" in crmn
    assert "done 2/2" in crmn
    assert "running or stopped (search epoch 2)" in lines["t1-resnet32x4"]
    # a stopped run: its last logged accuracy, marked as such
    assert "40.00 (last logged: val, search epoch 2, seed 0)" in lines["t1-resnet32x4"]
    assert "missing" in lines["t1-crmn32x1"]


def test_params_model_and_dataset_of_runs_that_are_not_as_published(tmp_path):
    """params from config.json (written when a run starts), a model name for a run that is
    no paper row, and a row trained on another dataset is marked."""
    d = tmp_path / "table1"
    write_run(d / "t1-resnet32x1" / "seed0", row="t1-resnet32x1", experiment="table1",
              seed=0)
    cfg = json.loads((d / "t1-resnet32x1" / "seed0" / "config.json").read_text())
    cfg.update(params=470_004, dataset="cifar10")
    (d / "t1-resnet32x1" / "seed0" / "config.json").write_text(json.dumps(cfg))
    write_run(d / "tiny" / "seed0", row=None, experiment="table1", seed=0, test_acc=0.5)
    cfg = json.loads((d / "tiny" / "seed0" / "config.json").read_text())
    cfg["model"] = {"n": 1, "k": 0.5, "memory": True}
    (d / "tiny" / "seed0" / "config.json").write_text(json.dumps(cfg))
    text = report.compare(d, plots=False).read_text()
    lines = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| ")}
    cells = [c.strip() for c in lines["t1-resnet32x1"].split("|")]
    assert cells[3] == "0.47"  # ours, from config.json: the run has no summary yet
    assert "dataset cifar10 (row: cifar100)" in lines["t1-resnet32x1"]
    assert "CRMN-8x0.5" in lines["tiny"]


def test_five_repetition_figure(tmp_path):
    d = tmp_path / "table2"
    accs = [0.70, 0.72, 0.71]
    vals = [(0.5,), (0.6,), (0.55,)]  # seed 1 is best on validation
    for k, (acc, val) in enumerate(zip(accs, vals)):
        write_run(d / "t2-crmn32x4" / f"seed{k}", row="t2-crmn32x4", experiment="table2",
                  seed=k, test_acc=acc, val_accs=val)
    groups = report.collect(d)
    rr = next(r for r in groups["table2"] if r.row_id == "t2-crmn32x4")
    rep = report.five_repetitions(rr)
    assert rep["n"] == 3 and rep["best_seed"] == 1
    assert rep["best_test"] == pytest.approx(72.0)
    assert rep["mean"] == pytest.approx(71.0) and rep["std"] == pytest.approx(1.0)
    text = report.render(groups)
    assert "77.65 ± 0.385" in text and "78.27" in text  # the paper's, from crmn.paper
    assert "72.00 (seed 1)" in text
    # Table 2's comparison methods are listed, and the missing 28x10 row is shown
    for m in paper.TABLE2_METHODS:
        assert m.name in text
    assert "t2-crmn28x10" in text and "missing" in text


def test_mean_std():
    assert report.mean_std([]) == (None, None, 0)
    assert report.mean_std([5.0]) == (5.0, None, 1)
    m, s, n = report.mean_std([1.0, 2.0, 3.0, 4.0])
    assert (m, n) == (2.5, 4) and s == pytest.approx(math.sqrt(5 / 3))


def test_plots_written(table1_dir):
    report.compare(table1_dir, plots=True)
    names = sorted(p.name for p in table1_dir.glob("*.png"))
    assert names == ["curves_t1-crmn32x4.png", "curves_t1-resnet32x4.png", "figure3.png"]
    for n in names:
        assert (table1_dir / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![figure3](figure3.png)" in (table1_dir / "REPORT.md").read_text()


def test_root_with_several_experiments(tmp_path):
    write_run(tmp_path / "table3" / "t3-crmn56x3" / "seed0", row="t3-crmn56x3",
              experiment="table3", seed=0, test_acc=0.9)
    write_run(tmp_path / "smoke" / "tiny" / "seed0", row=None, experiment="smoke", seed=0,
              test_acc=0.05)
    (tmp_path / "smoke" / "data").mkdir()  # not a run directory
    groups = report.collect(tmp_path)
    assert set(groups) == {"table3", "smoke"}
    assert [r.row_id for r in groups["smoke"]] == ["tiny"]
    assert [r.row_id for r in groups["table3"]] == [r.id for r in paper.TABLE3]
    text = report.render(groups)
    assert "Highway Network" in text and "| tiny " in text


def test_bad_input_names_the_file(tmp_path):
    with pytest.raises(CRMNError, match="nope: no such folder"):
        report.collect(tmp_path / "nope")
    d = tmp_path / "table1" / "t1-crmn32x1" / "seed0"
    write_run(d, row="t1-crmn32x1", experiment="table1", seed=0, test_acc=0.5)
    (d / "summary.json").write_text("{not json")
    with pytest.raises(CRMNError, match="summary.json"):
        report.collect(tmp_path / "table1")
    (d / "summary.json").unlink()
    log = d / "log.jsonl"
    log.write_text("garbage\n" + log.read_text())
    with pytest.raises(CRMNError, match=r"log.jsonl: line 1 "):
        report.collect(tmp_path / "table1")


def test_an_empty_folder_is_an_error_not_an_empty_report(tmp_path):
    (tmp_path / "table1").mkdir()
    with pytest.raises(CRMNError, match="no runs below"):
        report.compare(tmp_path / "table1", plots=False)
    assert not (tmp_path / "table1" / "REPORT.md").exists()


def _set_config(seed_dir, **fields):
    path = seed_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


def test_runs_that_are_not_the_published_row_are_marked(tmp_path):
    from crmn.config import ModelConfig, TrainConfig

    row = paper.row("t1-crmn32x1")
    d = tmp_path / "table1"
    as_published = d / "t1-crmn32x1" / "seed0"
    write_run(as_published, row=row.id, experiment="table1", seed=0, test_acc=0.7)
    _set_config(as_published, model=ModelConfig.for_row(row).to_dict(),
                train=TrainConfig.for_row(row, seed=0).to_dict())
    quick = d / "t1-resnet32x1" / "seed0"
    write_run(quick, row="t1-resnet32x1", experiment="table1", seed=0, test_acc=0.03)
    other = paper.row("t1-resnet32x1")
    _set_config(quick, fake_data=True,
                model=dataclasses.replace(ModelConfig.for_row(other), n=1, k=0.5,
                                          outgate="tanh").to_dict(),
                train=dataclasses.replace(TrainConfig.for_row(other, seed=0), epochs_cap=1,
                                          batch_size=10, schedule=(2, 1, 1)).to_dict())
    text = report.compare(d, plots=False).read_text()
    lines = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| t1-")}
    assert lines["t1-crmn32x1"].split("|")[-2].strip() == ""  # as published: no note
    notes = lines["t1-resnet32x1"].split("|")[-2]
    for expected in ("FAKE DATA", "epochs capped at 1 per stage", "fixed schedule 2,1,1",
                     "n 1 (row: 5)", "k 0.5 (row: 1)", "outgate tanh (row: logistic)",
                     "batch_size 10 (row: 100)"):
        assert expected in notes
    assert "seed" not in notes and "lr_stages" not in notes  # equal to the row's: no note
    assert "not as published" in text


def test_seconds_per_epoch_of_a_running_row_is_a_median(tmp_path):
    d = tmp_path / "table1" / "t1-crmn32x1" / "seed0"
    write_run(d, row="t1-crmn32x1", experiment="table1", seed=0, val_accs=(0.1, 0.2, 0.3))
    recs = [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]
    recs[0]["seconds"] = 90.0  # the first epoch also paid the compilation
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rr = next(r for r in report.collect(tmp_path / "table1")["table1"]
              if r.row_id == "t1-crmn32x1")
    assert rr.runs[0].sec_per_epoch() == 2.0
