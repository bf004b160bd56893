"""The shape of the code: no import cycle between the archive's modules, a framework-free
``crmn/`` (no module imports torch or theano when it is imported), no function over 60
lines, and the line budgets of the code and of gpucheck."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.current  # framework-free: runs in the current environment too

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("crmn", "original", "modern")
MAX_FUNCTION_LINES = 60
CODE_LINES = 11_790  # crmn/ + original/ + modern/: may come down (the goal is 11,000), not grow
MAX_LINE_WIDTH = 100
GPUCHECK_LINES = 360  # the runner, a list of plain checks (what a child measures: gpucheck_child)


def _modules():
    """{dotted module name: path} of every module of the three packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def import_graph():
    """{module: set of project modules it imports}, imports inside functions included."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package ``level - 1`` steps up
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for a in node.names:
                    if f"{base}.{a.name}" in modules:
                        deps.add(f"{base}.{a.name}")
                    elif base in modules:
                        deps.add(base)
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep, path + [dep])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert "crmn.config" in graph["original.backend"]  # the graph is real
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_backends_sit_below_the_registry_and_the_loop():
    graph = import_graph()
    for backend in ("original.backend", "modern.backend"):
        for above in ("crmn.train", "crmn.cli", "crmn.verify", "crmn.bench", "crmn.plan"):
            assert above not in graph[backend], (backend, above)
    # the registry finds the backends by name at build time: no import of either
    assert not any(d.startswith(("original", "modern")) for d in graph["crmn.registry"])
    assert not any(d.startswith(("original", "modern")) for d in graph["crmn.backend"])


def test_only_the_command_line_imports_the_command_line():
    """The command line sits on top: nothing else under crmn/ imports it (a module that
    needs what the parser knows finds it below, e.g. crmn.schema or crmn.plan)."""
    graph = import_graph()
    assert "crmn.cli.parser" in graph["crmn.cli"]  # the graph sees crmn.cli's own imports
    up = sorted(f"{name} -> {dep}" for name, deps in graph.items() for dep in deps
                if dep.startswith("crmn.cli") and not name.startswith("crmn.cli"))
    assert up == []


def test_backend_names_only_a_software_backend_or_an_array_function():
    """What --backend selects is a backend: "stack" is left for numpy's, torch's and jax's
    stack functions, prose about a software stack, and the JAX mode's depth-first walk."""
    files = subprocess.run(["git", "ls-files", "crmn/*.py", "original/*.py", "modern/*.py"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    allowed = re.compile(r"\b(np|numpy|torch|jnp)\.stack\(|Lasagne stack|software stack")
    words = re.compile(r"\b(stacks?|engines?)\b", re.I)
    bad = [f"{f}:{i}: {line.strip()}" for f in files
           for i, line in enumerate((ROOT / f).read_text().splitlines(), 1)
           if words.search(line) and not allowed.search(line)]
    assert bad == []
    assert words.search("the torch stack") and not allowed.search("the torch stack")


def test_crmn_imports_no_framework_at_import_time():
    names = sorted(n for n in _modules()  # (a __main__ module runs its command)
                   if n.split(".")[0] == "crmn" and not n.endswith(".__main__"))
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in ('torch', 'theano', 'lasagne', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_no_function_over_60_lines():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


ARGPARSE_PRIVATE = {"_actions", "_subparsers", "_group_actions", "_option_string_actions",
                    "_positionals", "_optionals", "_defaults", "_registries"}


def test_the_code_keeps_within_its_line_budgets():
    """The budgets count lines, so a line may not grow past the width the code is kept at."""
    texts = {path.relative_to(ROOT).as_posix(): path.read_text().splitlines()
             for path in _modules().values()}
    sizes = {name: len(lines) for name, lines in texts.items()}
    assert sum(sizes.values()) <= CODE_LINES, sum(sizes.values())
    assert sizes["crmn/gpucheck.py"] <= GPUCHECK_LINES, sizes["crmn/gpucheck.py"]
    wide = [f"{name}:{i}" for name, lines in texts.items()
            for i, line in enumerate(lines, 1) if len(line) > MAX_LINE_WIDTH]
    assert wide == []


def test_nothing_reads_argparse_private_attributes():
    """The parser is reached through its public API only (parse, --help): the launchers get
    plans, not parsers (tests included)."""
    found = []
    for top in ("crmn", "original", "modern", "tests"):
        for path in sorted((ROOT / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in ARGPARSE_PRIVATE:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert found == []


def test_the_checker_sees_a_private_attribute():
    tree = ast.parse("p._subparsers._group_actions[0]")
    assert {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} & ARGPARSE_PRIVATE


def test_train_is_the_protocol_alone():
    """crmn/train.py holds the protocol: no signals, threads or progress bar (crmn.display,
    crmn.cli), and an epoch touches the run folder only to log, checkpoint, and keep and
    reload the best model; the --epochs-cap bookkeeping is crmn.runstate.CapWatch's."""
    tree = ast.parse((ROOT / "crmn" / "train.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names} | {n.module for n in ast.walk(tree)
                                     if isinstance(n, ast.ImportFrom)}
    assert not imported & {"signal", "threading"}, imported
    assert not [n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                and "progress" in n.name.lower()]
    (epoch,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                and n.name == "epoch"]
    folder = {"folder", "self.folder"}  # the local and the attribute
    on_folder = {c.func.attr for c in ast.walk(epoch) if isinstance(c, ast.Call)
                 and isinstance(c.func, ast.Attribute) and ast.unparse(c.func.value) in folder}
    assert on_folder == {"log", "save", "save_best", "best_model"}, on_folder
    names = {ast.unparse(n) for n in ast.walk(epoch) if isinstance(n, (ast.Name, ast.Attribute))}
    assert not [n for n in names if "cap" in n.lower() or "cut" in n.lower()], names
