"""tools/planted_bugs.py's list never goes stale: every snippet it plants a bug in still occurs exactly
once in the current code, and every test named to catch it exists (the script itself is run by hand)."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _planted_bugs():
    spec = importlib.util.spec_from_file_location("planted_bugs", REPO / "tools" / "planted_bugs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("planted_bugs", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_planted_snippet_occurs_exactly_once_and_changes_the_code():
    pb = _planted_bugs()
    assert len(pb.BUGS) >= 13 and len({b.name for b in pb.BUGS}) == len(pb.BUGS)
    assert pb.snippet_counts() == {b.name: 1 for b in pb.BUGS}
    for b in pb.BUGS:
        assert b.mutated != b.original and b.mutated not in (REPO / b.path).read_text(), b.name


def test_every_catching_test_exists():
    pb = _planted_bugs()
    for b in pb.BUGS:
        assert b.tests, b.name
        for test in b.tests:
            path, name = test.split("::")
            tree = ast.parse((REPO / path).read_text())
            names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert name in names, (b.name, test)
