"""crmn/paper.py against the paper's text, and the canonical parameter count against Table 1."""
import pytest

from crmn import paper
from crmn.config import ModelConfig
from crmn.naming import count_trainable, param_specs

pytestmark = pytest.mark.current  # framework-free: runs in the current environment too


def test_table1_has_twelve_rows_in_three_blocks():
    assert len(paper.TABLE1) == 12
    assert [r.model for r in paper.TABLE1] == ["ResNet"] * 8 + ["CRMN"] * 4
    assert len({r.id for r in paper.ROWS}) == len(paper.ROWS)


@pytest.mark.parametrize("row_id, params, sec, acc", [
    ("t1-resnet134x1", 2.12, 455, 71.54),
    ("t1-resnet62x4", 15.16, 881, 71.78),
    ("t1-resnet32x1", 0.47, 125, 69.53),
    ("t1-crmn32x1", 2.16, 140, 70.84),
    ("t1-crmn32x4", 14.01, 490, 76.39),
])
def test_table1_values_pinned_to_the_paper(row_id, params, sec, acc):
    r = paper.row(row_id)
    assert (r.paper_params_m, r.paper_sec_per_epoch, r.paper_accuracy) == (params, sec, acc)


def test_section_4_2_figures():
    r = paper.row("t2-crmn32x4")
    assert (r.paper_accuracy, r.paper_accuracy_mean, r.paper_accuracy_std, r.seeds) == \
        (78.27, 77.65, 0.385, 5)
    assert paper.row("t2-crmn28x10").paper_accuracy == 79.65
    assert paper.row("t2-crmn28x10").batch_size == 50
    assert paper.row("t2-crmn28x10").lr_stages == (0.1, 0.01, 0.005, 0.001)
    assert paper.row("t3-crmn56x3").paper_accuracy == 94.60
    assert paper.row("t3-crmn28x10").paper_accuracy == 95.33
    assert paper.row("svhn-crmn56x3").paper_accuracy == 98.32
    assert [m.accuracy for m in paper.TABLE2_METHODS] == [67.61, 71.14, 72.34, 72.60, 74.84, 75.72]
    assert [m.accuracy for m in paper.TABLE3_METHODS] == [92.40, 93.45, 93.03, 93.57, 94.16, 95.59]


def test_named_depths_follow_the_spec():
    assert paper.row("t1-resnet134x1").n == 22
    assert paper.row("t2-crmn28x10").n == 4 and paper.row("t2-crmn28x10").k == 10
    assert paper.row("t3-crmn56x3").n == 9 and paper.row("t3-crmn56x3").k == 3


@pytest.mark.parametrize("r", paper.TABLE1, ids=lambda r: r.id)
def test_canonical_parameter_count_reproduces_table1(r):
    cfg = ModelConfig.for_row(r)
    assert round(count_trainable(cfg) / 1e6, 2) == r.paper_params_m


def test_lstm_adds_a_constant_number_of_parameters_whatever_the_depth():
    # Section 4.1: "the LSTM adds a constant number of parameters for a given architecture".
    extra = [count_trainable(ModelConfig(n, 1, 100, True)) - count_trainable(ModelConfig(n, 1, 100, False))
             for n in (1, 5, 9)]
    assert extra[0] == extra[1] == extra[2]


def test_unknown_row_is_named():
    from crmn.errors import ConfigError

    with pytest.raises(ConfigError, match="t9-nope"):
        paper.select("t1-crmn32x4,t9-nope")


def test_stage_shapes_and_names():
    names = [s.name for s in param_specs(ModelConfig(2, 0.5, 10, True))]
    assert names[0] == "conv0.W" and "s3b1.bn2.inv_std" in names and names[-1] == "fc.b"
    assert "lstm.w_ci" in names and "lstm.w_cc" not in names


def test_one_row_selection_for_every_command():
    from crmn.errors import ConfigError

    assert paper.select(None, "table1") == paper.TABLE1
    assert paper.select(None) == paper.ROWS
    assert paper.select("t2-crmn28x10", "table1") == (paper.row("t2-crmn28x10"),)
    with pytest.raises(ConfigError, match="t2-crmn28x10 belong to another experiment"):
        paper.select("t1-crmn32x1,t2-crmn28x10", "table1", strict=True)
    with pytest.raises(ConfigError, match="unknown experiment 'table9'"):
        paper.select(None, "table9")
    with pytest.raises(ConfigError, match="selects no row"):
        paper.select(",", "table1")
