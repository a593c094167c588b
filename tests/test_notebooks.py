"""Hygiene of the book's notebooks: each was run top to bottom and shows the output it should.

nbval (run on ``book/`` by the same pytest command) re-executes every notebook and compares the
outputs with the committed ones; these tests catch what nbval cannot: a notebook committed
after running cells out of order or skipping some, or a cell whose output was cleared.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parent.parent / "book"
NOTEBOOKS = sorted(p for p in BOOK.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
DISPLAY_CALLS = {"print", "display", "show"}  # print(...), display(...), plt.show()


def _called_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            names.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    return names


def expects_output(source: str) -> bool:
    """Whether a code cell must have produced output: it prints, displays or shows a figure, or
    ends with an expression that is not silenced by a trailing semicolon."""
    tree = ast.parse(source)
    if _called_names(tree) & DISPLAY_CALLS:
        return True
    return (
        bool(tree.body)
        and isinstance(tree.body[-1], ast.Expr)
        and not source.rstrip().endswith(";")
    )


def hygiene_problems(notebook: dict) -> list[str]:
    """Everything wrong with a notebook's committed state, one sentence each."""
    problems = []
    code_cells = [
        c for c in notebook["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()
    ]
    counts = [c.get("execution_count") for c in code_cells]
    if None in counts:
        problems.append(f"{counts.count(None)} code cell(s) were never executed")
    elif counts != list(range(1, len(counts) + 1)):
        problems.append(
            f"execution counts {counts} are not 1, 2, 3, ...: run the notebook top to bottom"
        )
    for index, cell in enumerate(code_cells, start=1):
        source = "".join(cell["source"])
        tags = cell.get("metadata", {}).get("tags", [])
        errors = [o for o in cell.get("outputs", []) if o["output_type"] == "error"]
        if errors and "raises-exception" not in tags:
            problems.append(f"code cell {index} raised {errors[0]['ename']}")
        if expects_output(source) and not cell.get("outputs"):
            problems.append(
                f"code cell {index} should show output but has none: {source.splitlines()[0]!r}"
            )
    if notebook.get("metadata", {}).get("kernelspec", {}).get("name") != "python3":
        problems.append("the kernel is not python3")
    return problems


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_was_run_top_to_bottom_with_outputs(path):
    assert hygiene_problems(json.loads(path.read_text())) == []


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebook found under book/"


# --- the checks themselves catch what they should ---------------------------------------------


def _notebook(*cells):
    return {"cells": list(cells), "metadata": {"kernelspec": {"name": "python3"}}}


def _code(source, count, outputs=(), tags=()):
    return {
        "cell_type": "code",
        "source": source,
        "execution_count": count,
        "outputs": list(outputs),
        "metadata": {"tags": list(tags)},
    }


STREAM = {"output_type": "stream", "name": "stdout", "text": "1\n"}


def test_a_clean_notebook_passes():
    nb = _notebook(_code("x = 1", 1), _code("print(x)", 2, [STREAM]), _code("x;", 3))
    assert hygiene_problems(nb) == []


def test_out_of_order_and_unexecuted_cells_are_caught():
    assert "not 1, 2, 3" in hygiene_problems(_notebook(_code("x = 1", 2), _code("y = 2", 1)))[0]
    assert (
        "never executed" in hygiene_problems(_notebook(_code("x = 1", 1), _code("y = 2", None)))[0]
    )


def test_missing_output_and_errors_are_caught():
    assert "should show output" in hygiene_problems(_notebook(_code("print(1)", 1)))[0]
    assert "should show output" in hygiene_problems(_notebook(_code("1 + 1", 1)))[0]
    assert "should show output" in hygiene_problems(_notebook(_code("plt.show()", 1)))[0]
    error = {"output_type": "error", "ename": "ValueError", "evalue": "", "traceback": []}
    assert "raised ValueError" in hygiene_problems(_notebook(_code("f()", 1, [error])))[0]
    assert hygiene_problems(_notebook(_code("f()", 1, [error], tags=["raises-exception"]))) == []
