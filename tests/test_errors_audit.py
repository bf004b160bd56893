"""The audit of every fault message: docs/errors.md lists each CRMNError site of
crmn/, original/ and modern/ and each stderr line of the shell scripts, with what to do next
(crmn/tools/errors.py). A new message fails here until the table is written again and the
message reviewed in its diff."""
import textwrap

import pytest

from crmn.tools import errors as audit

pytestmark = pytest.mark.current  # framework-free: runs in the current environment too


def test_every_fault_message_is_in_the_table():
    listed = set(audit.listed_ids((audit.ROOT / audit.DOC).read_text()))
    sites = {s.id for s in audit.all_sites()}
    missing = sorted(sites - listed)
    assert not missing, ("fault messages missing from docs/errors.md (review them, then run "
                         f"python -m crmn.tools.errors): {missing}")
    assert not sorted(listed - sites), "docs/errors.md lists messages the source no longer has"


def test_the_table_is_what_the_source_says():
    assert (audit.ROOT / audit.DOC).read_text() == audit.render(audit.all_sites()), \
        "docs/errors.md is out of date: run python -m crmn.tools.errors and review its diff"


def test_every_message_names_a_way_on():
    assert [s.id for s in audit.all_sites() if not s.way_on] == []


def test_sites_are_found_in_raises_helpers_and_scripts(tmp_path):
    (tmp_path / "crmn").mkdir()
    (tmp_path / "crmn" / "m.py").write_text(textwrap.dedent('''
        from crmn.errors import DataError, RunError
        def f(path):
            raise DataError(f"{path}: gone; download it again")
        class C:
            def g(self):
                if self:
                    raise RunError("one")
                raise RunError("two; run again")
        def helper(x):
            return DataError(f"bad {x}")  # built here, raised by a caller
    '''))
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "s.sh").write_text(textwrap.dedent('''
        x_die() { echo "s: $*" >&2; exit 1; }
        echo "s: no disk; free some space" >&2
        test -d y || x_die "y is missing; create it"
    '''))
    py = {s.id: s for s in audit.python_sites(tmp_path)}
    assert sorted(py) == ["crmn/m.py:C.g:RunError", "crmn/m.py:C.g:RunError#2",
                          "crmn/m.py:f:DataError", "crmn/m.py:helper:DataError"]
    assert py["crmn/m.py:f:DataError"].message == "{path}: gone; download it again"
    assert py["crmn/m.py:f:DataError"].way_on == "download it again"
    assert py["crmn/m.py:C.g:RunError"].way_on is None
    sh = [s.message for s in audit.shell_sites(tmp_path)]
    assert sh == ["s: no disk; free some space", "y is missing; create it"]
