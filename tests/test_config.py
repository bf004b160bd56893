"""The configuration dataclasses (crmn/config.py): what their constructors refuse."""
import dataclasses
import math

import pytest

from crmn import cli
from crmn.config import ModelConfig, TrainConfig
from crmn.errors import ConfigError

pytestmark = pytest.mark.current  # framework-free: runs in the current environment too

MODEL = dict(n=1, k=1, classes=10, memory=True)

# every float field, with the configuration class it belongs to
FLOAT_FIELDS = [(ModelConfig, "k"), (ModelConfig, "forget_bias"), (ModelConfig, "gate_bias"),
                (TrainConfig, "momentum"), (TrainConfig, "weight_decay"),
                (TrainConfig, "val_fraction")]


def build(cls, **over):
    return cls(**dict(MODEL, **over)) if cls is ModelConfig else cls(**over)


def test_float_fields_list_is_complete():
    declared = [(cls, f.name) for cls in (ModelConfig, TrainConfig)
                for f in dataclasses.fields(cls) if f.type == "float"]
    assert sorted(declared, key=str) == sorted(FLOAT_FIELDS, key=str)


@pytest.mark.parametrize("cls, name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused(cls, name, value):
    with pytest.raises(ConfigError, match=rf"^{name} must be a finite number, got {value}$"):
        build(cls, **{name: value})


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_learning_rate_is_refused(value):
    with pytest.raises(ConfigError,
                       match=rf"^lr_stages must be a finite number, got \[0\.1, {value}\]$"):
        TrainConfig(lr_stages=(0.1, value))


def test_finite_values_still_pass():
    m = ModelConfig(**MODEL, forget_bias=-5.0, gate_bias=0.5)
    t = TrainConfig(momentum=0.0, weight_decay=0.0, val_fraction=0.2, lr_stages=(0.1, 0.01))
    assert (m.forget_bias, t.lr_stages) == (-5.0, (0.1, 0.01))


@pytest.mark.parametrize("flag, value", [("--forget-bias", "nan"), ("--forget-bias", "inf"),
                                         ("--k", "nan"), ("--k", "-inf")])
def test_cli_refuses_a_non_finite_option_before_creating_a_run(tmp_path, capsys, flag, value):
    rc = cli.main(["table1", "--rows", "t1-resnet32x1", f"{flag}={value}", "--backend", "torch",
                   "--out-dir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert rc == 2  # a usage error: the parser refuses the value
    assert err == (f"run_experiments.sh table1: argument {flag}: expected a finite number, "
                   f"got '{value}'\n")
    assert not (tmp_path / "out").exists()  # no empty run directory left behind


def test_a_learning_rate_must_be_positive():
    with pytest.raises(ConfigError, match=r"learning rates must be > 0, got \[0\.1, -0\.01\]"):
        TrainConfig(lr_stages=(0.1, -0.01))
