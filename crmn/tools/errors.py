"""The audit of every fault message the archive prints: ``docs/errors.md``. A *site* builds a
:class:`crmn.errors.CRMNError` in Python, or writes to stderr in a shell script; its id
(``file:function:Kind[#k]`` or ``file:text``) survives moving code. What to do next is the
message's last clause naming an action, or the catcher's words in WAY_ON_FROM."""
from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from crmn import errors

ROOT = Path(__file__).resolve().parents[2]
PY_DIRS = ("crmn", "original", "modern")
SH_FILES = ("run_experiments.sh", "tests/run.sh", "scripts/*.sh", "crmn/launch/*.sh")
DOC = "docs/errors.md"

KINDS: Dict[str, int] = {name: obj.exit_code for name, obj in vars(errors).items()
                         if isinstance(obj, type) and issubclass(obj, errors.CRMNError)}

_ACTIONS = re.compile(
    r"--[a-z]|\b(delete|remove|pass|run|rerun|replace|choose|install|add|use|set|check|"
    r"wait|stop|see|give|download|copy|put|free|unpack|write|start|launch|drop|fix|rename|"
    r"retry|try|pick|name|move|ask|make|point|export|resume|edit|build|upgrade|keep|"
    r"answer|call)\b", re.IGNORECASE)

#: sites whose way on is given by the code that catches them, or by a helper whose text the
#: template shows as a value: site id, or the start of ids, -> what the user reads there
_PREV = "crmn/runstate.py falls back to checkpoint.prev.h5 on --resume"
_OWN = "it ends with how to write one's own batch (_OWN_BATCH), or use the official file"
_KEPT = "delete the archive to download it again, or supply the folder by hand (helper _kept)"
_SLURM = "check the cluster (sinfo), or use --launcher local"
WAY_ON_FROM: Dict[str, str] = {
    "crmn/checkpoint.py:load:": f"{_PREV} (one warning line); if that is bad too: delete the "
    "run folder and run again without --resume",
    "crmn/checkpoint.py:load:CheckpointError#4": "use the archive that wrote it, or delete it "
    "and start the run over",
    "crmn/checkpoint.py:save:CheckpointError": "a bug (array names come from crmn.naming)",
    "crmn/checkpoint.py:check_compatible:": "crmn/runstate.py adds: resume with the run's "
    "settings, or delete the run folder (a finished run: choose another --out-dir)",
    "crmn/cli/parser.py:_Parser.error:": "argparse names the option; --help lists them all",
    "crmn/plan.py:_usage:": "correct the option the message names (--help gives its range)",
    "crmn/gpucheck.py:plan_from_args:UsageError": "correct the gpucheck option the message names",
    "crmn/gpucheck.py:GpucheckPlan.__post_init__:": "plan_from_args reports it as a usage "
    "error: correct the option it names",
    **{f"crmn/data/formats.py:_cifar_batch:DataError#{k}": _OWN for k in (3, 4)},
    "crmn/config.py:": "crmn/plan.py reports it as a usage error before anything exists: "
    "correct the option of that name (--n, --k, --batch-size, --lr, ...)",
    **{f"crmn/plan.py:RunSpec.__post_init__:ConfigError{k}": "choose a --dataset with that "
       "many classes, or another row" for k in ("", "#2")},
    **{f"crmn/checkpoint.py:save:CheckpointError{k}": "free disk space, then run the same "
       "command with --resume (checkpoint.WAY_ON)" for k in ("#3",)},
    "crmn/cli/commands.py:cmd_params:": "the backend's line names the missing package and its "
    "pip command",
    "crmn/init.py:": "a bug in the caller: the CLI always passes a ModelConfig and seed",
    "crmn/convert.py:": "not a checkpoint of this network: resume with its configuration, or "
    "delete the run folder",
    "crmn/data/fake.py:write_fake:ConfigError": "give n_train, n_test >= 1 (smoke sets them)",
    "crmn/data/fake.py:write_fake:DataError": "choose another --data-dir",
    "crmn/data/integrity.py:_explain_mismatch:": "replace it with the official file, or pass "
    "--unverified-data (helper _refusal)",
    "crmn/data/prepare.py:": "--n/--k leave the data alone: a hand-made folder needs more "
    "training images (or the official files)",
    "crmn/data/sampler.py:": "give a --batch-size that fits the training images",
    "crmn/data/sources.py:_download:": "where it looked and how to supply the files by hand "
    "(helper by_hand)",
    "crmn/data/sources.py:_safe_extractall:": _KEPT, "crmn/data/sources.py:_extract:": _KEPT,
    "crmn/data/sources.py:dataset_info:": "choose one of the datasets it lists (--dataset)",
    "crmn/launch/slurm.py:submit:ConfigError#2": f"{_SLURM}; nothing stays queued",
    "crmn/launch/slurm.py:_sbatch:": f"crmn/launch/slurm.py:submit adds: {_SLURM}",
    "crmn/launch/slurm.py:_poll_s:": "set CRMN_SLURM_POLL to a number of seconds, or unset it",
    "crmn/paper.py:row:": "choose one of the row ids it lists (--rows)",
    "crmn/paper.py:select:": "choose one of the experiments it lists",
    "crmn/registry.py:probe:": "the backend's line names the missing package or device and its "
    "pip command or option",
    "crmn/report.py:compare:RunError": "free disk space or make the folder writable, then "
    "compare again",
    "crmn/tools/profile.py:": "choose a variant it lists",
    "crmn/train.py:train_epoch:": "a bug: the sampler checks the batch size first",
    "crmn/train.py:evaluate:": "a bug: every split has images",
    "original/": "a bug or a setup fault inside the Theano backend; the message names it "
    "(tests/test_original_*.py, scripts/make_references.py)",
    "modern/backend.py:TorchBackend.__init__:ConfigError#2": "use --device cpu, or a machine "
    "whose GPU torch sees",
    "modern/": "a bug in the caller: crmn.train passes images and states of this network",
    "crmn/launch/task.sh:error: $*": "the task's own message follows",
    **{f"scripts/ensure_env.sh:ensure_env: {verb} ": "nothing: a progress line"
       for verb in ("installing", "building", "creating")},
    "scripts/install_slurm.sh:install_slurm: apt-get update failed; trying the cached lists":
    "nothing: it goes on with the cached lists",
}


@dataclass(frozen=True)
class Site:
    """One fault message."""
    id: str  # file:function:Kind[#k] or file:shell line
    where: str  # file:function (Python) or file:line (shell)
    kind: str  # CRMNError subclass, or "stderr" (shell)
    exit: str  # the exit code, as text
    message: str  # the template: literal text with {expressions}

    @property
    def way_on(self) -> Optional[str]:
        """The message's last clause that names what to do next, or the catcher's."""
        given = [k for k in WAY_ON_FROM if self.id == k or
                 (k.endswith((":", "/", " ")) and self.id.startswith(k))]
        if given:
            return WAY_ON_FROM[max(given, key=len)]
        # values first set aside: their code has parentheses and colons of its own
        values = re.findall(r"\{[^{}]*\}", self.message)
        text = re.sub(r"\{[^{}]*\}", "\0", self.message)
        for clause in reversed(re.split(r";|: (?=[a-z-]+ )|\(|\)", text)):
            if _ACTIONS.search(clause.replace("\0", "")):
                for value in values[text[:text.index(clause)].count("\0"):]:
                    clause = clause.replace("\0", value, 1)
                return clause.strip()
        return None


def _template(node: ast.AST) -> str:
    """The message of an exception's first argument, as a template."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(str(v.value) if isinstance(v, ast.Constant)
                       else "{" + ast.unparse(v.value) + "}" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _template(node.left) + _template(node.right)
    return "{" + ast.unparse(node) + "}"


def _calls(node: ast.AST, scope: Tuple[str, ...] = ()) -> Iterator[Tuple[str, str, str]]:
    """(function (qualified name), kind, message) of every call of a CRMNError kind, in order."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Call):
            name = getattr(child.func, "id", getattr(child.func, "attr", None))  # f(), m.f()
            if name in KINDS and (name != "CRMNError" or child.args):
                message = _template(child.args[0]) if child.args else ""
                yield ".".join(scope) or "<module>", name, message
        inner = scope
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            inner = scope + (child.name,)
        yield from _calls(child, inner)


def python_sites(root: Path = ROOT) -> List[Site]:
    sites = []
    for top in PY_DIRS:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel == "crmn/errors.py":
                continue  # the kinds themselves
            seen: Dict[str, int] = {}
            for function, kind, message in _calls(ast.parse(path.read_text(), filename=rel)):
                key = f"{rel}:{function}:{kind}"
                seen[key] = seen.get(key, 0) + 1
                sid = key if seen[key] == 1 else f"{key}#{seen[key]}"
                sites.append(Site(sid, f"{rel}:{function}", kind, str(KINDS[kind]), message))
    return sites


_DIE_DEF = re.compile(r"^\s*(\w*die)\s*\(\)")
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_ECHO = re.compile(r"\b(?:echo|say)\s+(?P<msg>" + _QUOTED + r"(?:\s+" + _QUOTED + r")*)\s*>&2")


def _shell_text(quoted: str) -> str:
    return " ".join(re.findall(r'"((?:[^"\\]|\\.)*)"', quoted))


def shell_sites(root: Path = ROOT) -> List[Site]:
    sites = []
    for pattern in SH_FILES:
        for path in sorted(root.glob(pattern)):
            rel = path.relative_to(root).as_posix()
            lines = path.read_text().splitlines()
            dies = {m.group(1) for m in map(_DIE_DEF.match, lines) if m}
            die_call = re.compile(r"\b(" + "|".join(map(re.escape, dies)) + r""")\s+("[^"]*")""") \
                if dies else None
            pending = ""
            for no, line in enumerate(lines, 1):
                code = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
                if _DIE_DEF.match(code):
                    continue  # the helper itself: its callers are the sites
                text, joined = None, pending + code
                m = _ECHO.search(joined)
                if m:
                    text = _shell_text(m.group("msg"))
                elif die_call is not None and die_call.search(code):
                    text = _shell_text(die_call.search(code).group(2))
                pending = ""
                if text is not None:
                    sites.append(Site(f"{rel}:{text}", f"{rel}:{no}", "stderr", "1 or as shown",
                                      text))
                elif code.rstrip().endswith("\\") or code.count('"') % 2:  # the line goes on
                    pending = joined.rstrip("\\") + " "
    return sites


def all_sites(root: Path = ROOT) -> List[Site]:
    return python_sites(root) + shell_sites(root)


HEADER = """# Every fault message, and what to do next

Generated by `python -m crmn.tools.errors` from the source; tests/test_errors_audit.py fails
when a message of the source is missing here. Kinds and exit codes: `crmn/errors.py`
(REPRODUCING.md, "Exit codes"); each prints as one line `error: MESSAGE` (a stop: `stopped:
MESSAGE`); `{…}` is a value filled in when printed. Shell lines are the scripts' stderr.

"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(sites: List[Site]) -> str:
    out = [HEADER, "| id | where | kind (exit) | message | what to do |",
           "| --- | --- | --- | --- | --- |"]
    for s in sites:
        out.append(f"| `{_cell(s.id)}` | {_cell(s.where)} | {s.kind} ({s.exit}) | "
                   f"{_cell(s.message)} | {_cell(s.way_on or '')} |")
    out += ["", "## Messages without a way on", ""]
    out += [f"- `{_cell(s.id)}`" for s in sites if not s.way_on] or ["(none)"]
    return "\n".join(out) + "\n"


def listed_ids(text: str) -> List[str]:
    return re.findall(r"^\| `((?:[^`\\]|\\.)*)` \|", text, re.MULTILINE)


def main(argv=None) -> int:
    """``python -m crmn.tools.errors [--check]``: write docs/errors.md, or check it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv not in ([], ["--check"]):
        print("usage: python -m crmn.tools.errors [--check]", file=sys.stderr)
        return 2
    text = render(all_sites())
    path = ROOT / DOC
    if argv:
        same = path.exists() and path.read_text() == text
        print(f"{DOC}: " + ("up to date" if same else
                            "out of date: run python -m crmn.tools.errors"))
        return 0 if same else 1
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    print(f"{DOC}: {len(listed_ids(text))} messages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
