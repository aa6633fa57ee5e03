"""House rules of src/ that a review would otherwise have to re-check by hand: short functions and no
private names imported across modules."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "sbir"
MAX_FUNCTION_LINES = 80


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def test_no_function_over_80_lines():
    long = [f"{path.relative_to(SRC.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, tree in _modules() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "split these functions:\n" + "\n".join(long)


def test_no_private_name_imported_from_another_module():
    found = [f"{path.relative_to(SRC.parent)}:{node.lineno} from {node.module} import {alias.name}"
             for path, tree in _modules() for node in ast.walk(tree)
             if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sbir")
             for alias in node.names if alias.name.startswith("_")]
    assert not found, "make these public where they are defined:\n" + "\n".join(found)
