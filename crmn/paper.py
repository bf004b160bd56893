"""Every configuration and number Moniz & Pal (2016) publish, declared once: Tables 1-3 with
their comparison methods and section 4.2 (five repetitions, SVHN). Nothing else in the archive
writes down a number from the paper. ``python -m crmn.paper`` prints the rows."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from crmn.errors import ConfigError, UsageError

LR_TABLE1: Tuple[float, ...] = (0.1, 0.01, 0.001)  # learning-rate stages (section 4)
LR_WIDE: Tuple[float, ...] = (0.1, 0.01, 0.005, 0.001)  # the wide 28-layer runs (4.2)

DATASET_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10}


@dataclass(frozen=True)
class Row:
    """One trainable configuration of the paper, with what the paper reports for it."""
    id: str  # stable id accepted by --rows, e.g. "t1-crmn32x4"
    table: str  # "table1" | "table2" | "table3" | "svhn": the experiment it belongs to
    model: str  # "ResNet" | "CRMN", as printed in the paper
    dataset: str  # "cifar100" | "cifar10" | "svhn"
    layers: int  # depth as printed: 6n+2 (He et al.); the 28-layer rows use wide-ResNet naming
    n: int  # basic blocks per stage ("28 layers" is n=4, "56 layers" is n=9)
    k: float  # width factor: stage widths 16k, 32k, 64k
    memory: bool  # True: CRMN (LSTM over the block outputs); False: plain ResNet
    batch_size: int  # section 4: 100; 50 for the wide 28-layer runs (section 4.2)
    lr_stages: Tuple[float, ...]  # plateau schedule's learning rates, in order
    paper_accuracy: float  # test accuracy in %, as published
    paper_params_m: Optional[float] = None  # parameters in millions (Table 1 only)
    paper_sec_per_epoch: Optional[float] = None  # seconds per epoch, authors' GPU (Table 1)
    seeds: int = 1  # repetitions the paper reports for this row
    paper_accuracy_mean: Optional[float] = None  # mean over `seeds` repetitions, %
    paper_accuracy_std: Optional[float] = None  # std over `seeds` repetitions, %
    note: str = ""

    @property
    def classes(self) -> int:
        return DATASET_CLASSES[self.dataset]

    @property
    def label(self) -> str:
        """How the paper names the model, e.g. 'CRMN-32x4'."""
        return f"{self.model}-{self.layers}x{self.k:g}"


def _t1(model: str, layers: int, k: float, params: float, sec: float, acc: float) -> Row:
    return Row(id=f"t1-{model.lower()}{layers}x{k:g}", table="table1", model=model,
               dataset="cifar100", layers=layers, n=(layers - 2) // 6, k=k,
               memory=model == "CRMN", batch_size=100, lr_stages=LR_TABLE1,
               paper_accuracy=acc, paper_params_m=params, paper_sec_per_epoch=sec)


#: Table 1, in the paper's order (three blocks of four).
TABLE1: Tuple[Row, ...] = (
    # Block 1: deeper / wider ResNets with about as many parameters as the CRMNs.
    _t1("ResNet", 134, 1, 2.12, 455, 71.54),
    _t1("ResNet", 104, 1.5, 3.67, 473, 71.14),
    _t1("ResNet", 92, 2, 5.74, 583, 74.39),
    _t1("ResNet", 62, 4, 15.16, 881, 71.78),
    # Block 2: the CRMNs' ResNets without the memory.
    _t1("ResNet", 32, 1, 0.47, 125, 69.53),
    _t1("ResNet", 32, 1.5, 1.05, 173, 71.88),
    _t1("ResNet", 32, 2, 1.86, 199, 73.28),
    _t1("ResNet", 32, 4, 7.41, 427, 75.73),
    # Block 3: CRMNs.
    _t1("CRMN", 32, 1, 2.16, 140, 70.84),
    _t1("CRMN", 32, 1.5, 3.56, 165, 73.18),
    _t1("CRMN", 32, 2, 5.19, 233, 74.67),
    _t1("CRMN", 32, 4, 14.01, 490, 76.39),
)


def _crmn(row_id: str, table: str, dataset: str, layers: int, n: int, k: float, acc: float,
          **extra) -> Row:
    wide = layers == 28
    return Row(id=row_id, table=table, model="CRMN", dataset=dataset, layers=layers, n=n,
               k=k, memory=True, batch_size=50 if wide else 100,
               lr_stages=LR_WIDE if wide else LR_TABLE1, paper_accuracy=acc, **extra)


#: Table 2 (CIFAR-100), our rows. The 32x4 figure is the best of five repetitions.
TABLE2: Tuple[Row, ...] = (
    _crmn("t2-crmn32x4", "table2", "cifar100", 32, 5, 4, 78.27, seeds=5,
          paper_accuracy_mean=77.65, paper_accuracy_std=0.385,
          note="best model on validation over five repetitions; mean ± std over the five"),
    _crmn("t2-crmn28x10", "table2", "cifar100", 28, 4, 10, 79.65),
)

#: Table 3 (CIFAR-10), our rows. "56 layers; 48 fm" is n=9, k=3.
TABLE3: Tuple[Row, ...] = (
    _crmn("t3-crmn56x3", "table3", "cifar10", 56, 9, 3, 94.60),
    _crmn("t3-crmn28x10", "table3", "cifar10", 28, 4, 10, 95.33),
)

#: Section 4.2: the SVHN result, with the best CIFAR-10 architecture (56 layers, 48 fm).
SVHN: Tuple[Row, ...] = (_crmn("svhn-crmn56x3", "svhn", "svhn", 56, 9, 3, 98.32),)

ROWS: Tuple[Row, ...] = TABLE1 + TABLE2 + TABLE3 + SVHN
EXPERIMENTS = {"table1": TABLE1, "table2": TABLE2, "table3": TABLE3, "svhn": SVHN}
_BY_ID = {r.id: r for r in ROWS}


@dataclass(frozen=True)
class Method:  # a comparison method of Table 2 or 3: its published accuracy only
    name: str
    accuracy: float  # %


#: Table 2's other methods (CIFAR-100), in the paper's order.
TABLE2_METHODS: Tuple[Method, ...] = (
    Method("Highway Network (100 layers)", 67.61),
    Method("Maxout Network", 71.14),
    Method("LSUV Initialization Method", 72.34),
    Method("Bayesian Optimization", 72.60),
    Method("ResNet (164 layers)", 74.84),
    Method("ELU Network (18 layers)", 75.72),
)

#: Table 3's other methods (CIFAR-10), in the paper's order.
TABLE3_METHODS: Tuple[Method, ...] = (
    Method("Highway Network", 92.40),
    Method("ELU Network (18 layers)", 93.45),
    Method("ResNet (56 layers)", 93.03),
    Method("ResNet (110 layers)", 93.57),
    Method("LSUV Initialization Method", 94.16),
    Method("All Convolutional Network", 95.59),
)

#: Previous best on SVHN that the paper cites (section 4.2), for context.
SVHN_METHODS: Tuple[Method, ...] = (Method("Generalized pooling (Lee et al.)", 98.31),)

METHODS = {"table2": TABLE2_METHODS, "table3": TABLE3_METHODS, "svhn": SVHN_METHODS}


def _unknown(row_id: str) -> str:
    return (f"unknown row id {row_id!r}; choose one of {', '.join(r.id for r in ROWS)} "
            "(--rows)")


def row(row_id: str) -> Row:
    """The row with this id (ConfigError naming the known ids otherwise)."""
    if row_id not in _BY_ID:
        raise ConfigError(_unknown(row_id))
    return _BY_ID[row_id]


def select(ids: Optional[str], experiment: Optional[str] = None, *,
           strict: bool = False) -> Tuple[Row, ...]:
    """Rows named by ``--rows`` (comma-separated), else every row of ``experiment`` (None: all)."""
    if ids is not None:
        wanted = [i.strip() for i in ids.split(",") if i.strip()]
        unknown = [i for i in wanted if i not in _BY_ID]
        if unknown:
            raise UsageError(f"run_experiments.sh: --rows: {_unknown(unknown[0])}")
        rows = tuple(_BY_ID[i] for i in wanted)
    elif experiment is not None and experiment not in EXPERIMENTS:
        raise UsageError(f"run_experiments.sh: unknown experiment {experiment!r}; known: "
                         f"{', '.join(EXPERIMENTS)}")
    else:
        rows = EXPERIMENTS.get(experiment, ROWS)  # None: every row
    foreign = [r.id for r in rows if strict and r.table != experiment]
    if foreign:
        raise UsageError(f"run_experiments.sh: --rows: row(s) {', '.join(foreign)} belong to "
                         f"another experiment than {experiment}")
    if not rows:
        raise UsageError(f"run_experiments.sh: --rows {ids!r} selects no row")
    return rows


if __name__ == "__main__":
    print(f"{'id':18s} {'model':14s} {'data':8s} {'n':>3s} {'bs':>4s} {'params M':>8s} "
          f"{'s/ep':>5s} {'acc %':>6s}  lr stages")
    for r in ROWS:
        p = f"{r.paper_params_m:.2f}" if r.paper_params_m is not None else "-"
        s = f"{r.paper_sec_per_epoch:g}" if r.paper_sec_per_epoch is not None else "-"
        print(f"{r.id:18s} {r.label:14s} {r.dataset:8s} {r.n:3d} {r.batch_size:4d} {p:>8s} "
              f"{s:>5s} {r.paper_accuracy:6.2f}  {list(r.lr_stages)}")
