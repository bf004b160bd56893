"""The run schema: every option of a run declared once, as a dataclass field with metadata,
from which the parser, the line rendered back, the report and the resume check are derived."""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

#: argparse group titles by key; a command may rename one (smoke's "expert" group)
GROUPS = {"backend": "backend", "runs": "runs (docs/spec.md §1)",
          "model": "the network's interpretations (docs/spec.md §4)",
          "protocol": "the protocol's interpretations (docs/spec.md §4-5)",
          "expert": "expert options (tests, quick looks: the run is then not the paper's row)",
          "launch": "launchers: the grid of rows x seeds on several GPUs or a Slurm cluster "
                    "(REPRODUCING.md, On a cluster)"}


def option(default=dataclasses.MISSING, *, flag: Optional[str] = None, help: str = "",
           group: str = "runs", type: Optional[Callable] = None, choices=None,
           metavar: Optional[str] = None, kind: str = "value", default_help: str = "%(default)s",
           interpretation: bool = False, resume: bool = False, departure: Optional[str] = None,
           dest: Optional[str] = None, show: Callable[[Any], str] = str,
           from_cli: Optional[Callable[[Any, Any], Any]] = None, per_run: bool = False):
    """A dataclass field with its command-line metadata. ``kind``: ``value``, ``true`` or
    ``false`` (a bare flag sets it); ``interpretation``: another value is still a reading of
    the paper; ``departure``: the report's note for any set value; ``resume``: ``--resume``
    may change it; ``show``/``from_cli(given, base)``: the value to and from the command
    line; ``per_run``: differs between a grid's runs (the seed)."""
    meta = dict(locals())  # every keyword but the default
    del meta["default"]
    return dataclasses.field(default=default, metadata=meta)


def flagged(obj_or_cls) -> Iterator[dataclasses.Field]:
    return (f for f in dataclasses.fields(obj_or_cls) if f.metadata.get("flag"))


def dest(f: dataclasses.Field) -> str:
    return f.metadata.get("dest") or f.name


def names(cls, key: str) -> frozenset:
    """Names of ``cls``'s fields whose metadata ``key`` is true (e.g. ``interpretation``)."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get(key))


def add_options(parser, cls, *, defaults: Optional[Dict[str, Any]] = None,
                helps: Optional[Dict[str, str]] = None, groups: Optional[Dict] = None,
                only=None, skip=(), texts: Optional[Dict[str, str]] = None) -> None:
    """An option for every flagged field of ``cls``; ``defaults``/``helps`` (the default
    shown)/``texts`` (what the option does there): a command's own."""
    defaults, helps, groups, texts = defaults or {}, helps or {}, groups or {}, texts or {}
    for f in flagged(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        m = f.metadata
        value = defaults.get(f.name, None if f.default is dataclasses.MISSING else f.default)
        shown = helps.get(f.name, m["default_help"])
        kw: Dict[str, Any] = dict(dest=dest(f), default=value,
                                  help=f"{texts.get(f.name, m['help'])} (default: {shown})")
        if m["kind"] == "value":
            kw.update(type=m["type"], choices=m["choices"], metavar=m["metavar"])
        else:
            kw["action"] = "store_true" if m["kind"] == "true" else "store_false"
        group(parser, m["group"], groups.get(m["group"], ...)).add_argument(m["flag"], **kw)


def group(parser, key: str, title=...):
    """``parser``'s group ``key``, made once (title None: the parser itself)."""
    if title is None:
        return parser
    made = parser.__dict__.setdefault("_crmn_groups", {})
    if key not in made:
        made[key] = parser.add_argument_group(GROUPS.get(key, key) if title is ... else title)
    return made[key]


def values(cls, args: argparse.Namespace, base) -> Dict[str, Any]:
    """The values ``args`` gives ``cls``'s flagged fields (None keeps ``base``'s)."""
    out = {}
    for f in flagged(cls):
        given, convert = getattr(args, dest(f), None), f.metadata["from_cli"]
        if given is not None:
            out[f.name] = convert(given, getattr(base, f.name)) if convert else given
    return out


def render(obj, base) -> List[str]:
    """The options that turn ``base`` into ``obj``: each flagged field that differs."""
    out: List[str] = []
    for f in flagged(obj):
        m, value = f.metadata, getattr(obj, f.name)
        if m["per_run"] or (base is not None and value == getattr(base, f.name)):
            continue
        if m["kind"] == "value":
            if value is not None:
                text = m["show"](value)
                out += [f"{m['flag']}={text}"] if text.startswith("-") else [m["flag"], text]
        elif bool(value) == (m["kind"] == "true"):
            out.append(m["flag"])
    return out


# value types: each refuses a bad value in one line (argparse adds the option's name)
def _number(text: str, ok, wanted: str, kind=float, what: str = "a number"):
    """``text`` as ``kind`` if ``ok`` of it, else "expected ``wanted``" ({v}: the value)."""
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError("expected " + wanted.format(v=v, text=repr(text)))
    return v


def positive(text: str) -> int:
    return _number(text, lambda v: v >= 1, "a number >= 1, got {v}", int, "a whole number")


def finite(text: str) -> float:
    return _number(text, math.isfinite, "a finite number, got {text}")


def above_zero(text: str) -> float:
    finite(text)  # NaN and infinity are refused as such first
    return _number(text, lambda v: v > 0, "a number > 0, got {text}")


def width(text: str) -> float:
    """A width factor k whose stages have whole channel counts (16k is a whole number)."""
    v = above_zero(text)
    if abs(16 * v - round(16 * v)) > 1e-9:
        raise argparse.ArgumentTypeError(f"16k must be a whole number of channels (k = 0.5, "
                                         f"1, 4, 10, ...), got {text!r}")
    return v


def epochs_list(text: str) -> Tuple[int, ...]:
    try:
        epochs = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants epochs per stage like 80,40,40, "
                                         f"got {text!r}") from None
    if any(e < 0 for e in epochs):
        raise argparse.ArgumentTypeError(f"epochs must be >= 0, got {text!r}")
    return epochs
