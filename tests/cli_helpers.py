"""The command line through its public face only (tests/test_layout.py): the commands'
names, from argparse's refusal of an unknown one, and each command's options, from its usage
line."""
import contextlib
import io
import re
from typing import Dict, List

import pytest

from crmn.cli import parser
from crmn.errors import UsageError


def command_names() -> List[str]:
    with pytest.raises(UsageError) as refused:
        parser.parse(["no-such-command"])
    return re.findall(r"'([\w-]+)'", str(refused.value).split("choose from", 1)[1])


def _bracketed(usage: str) -> List[str]:
    """The outermost ``[...]`` groups of a usage line (a metavar may hold brackets)."""
    out, depth, start = [], 0, 0
    for i, c in enumerate(usage):
        if c == "[":
            depth, start = depth + 1, (i + 1 if depth == 0 else start)
        elif c == "]":
            depth -= 1
            if depth == 0:
                out.append(usage[start:i])
    return out


def command_options(name: str) -> Dict[str, str]:
    """``{flag: its usage words}`` of command ``name``, e.g. ``{"--json": "--json PATH"}``."""
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown), pytest.raises(SystemExit):
        parser.parse([name, "--help"])
    usage = " ".join(shown.getvalue().split("\n\n", 1)[0].split())
    words = [part.strip() for group in _bracketed(usage) for part in group.split(" | ")]
    return {w.split()[0]: w for w in words if w.startswith("--")}
