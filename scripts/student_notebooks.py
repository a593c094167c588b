"""Write the chapters as student notebooks: solution cells removed, outputs cleared.

``make student-notebooks`` runs ``python scripts/student_notebooks.py``, which reads every
``book/*.ipynb`` and writes ``_build/student/<chapter>.ipynb``. It needs only the standard
library, so a teacher can run it without installing the book's environment.

Which cells are solutions (the rule chapter authors follow):

1. Every code cell in a chapter's exercises section is a solution. The section starts at a
   markdown heading whose text is ``Exercises`` (any level) and ends at the next heading of the
   same or a higher level, or at the end of the notebook. The exercise statements are markdown
   cells and stay.
2. A cell of any kind tagged ``solution`` is a solution wherever it is (a worked answer in a
   markdown cell, or a solution outside the exercises section).
3. In the exercises section, a markdown cell that follows a solution is the solution's
   discussion, up to the next exercise statement: a markdown cell that starts with
   ``**Exercise`` (or ``Exercise``), holds a heading, or is tagged ``exercise``.
4. A code cell in the exercises section tagged ``exercise`` is starter code for the students and
   stays.
5. In the markdown that stays, a fenced ``dropdown``/``admonition``/``toggle`` directive whose
   title starts with ``Solution`` or ``Answer`` is removed (for prose answers written inside the
   exercise statement).

Each run of consecutive removed code cells is replaced by one empty code cell that says where
the student's solution goes. Every output and execution count is cleared.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

SOLUTION_TAG = "solution"
STARTER_TAG = "exercise"
EXERCISES_TITLE = "exercises"
PLACEHOLDER = "# Your solution to the exercise above.\n"

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_STATEMENT = re.compile(r"^\s*(?:\*\*|__)?Exercise\b", re.IGNORECASE)
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
_SOLUTION_DIRECTIVE = re.compile(
    r"^(?P<fence>`{3,}|:{3,})\{(?:dropdown|admonition|toggle)\}\s*(?:Solution|Answer)\b",
    re.IGNORECASE,
)


def _source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _tags(cell: dict) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def markdown_headings(text: str) -> list[tuple[int, str]]:
    """The ATX headings of a markdown cell as (level, title), skipping fenced code blocks."""
    headings, fence = [], None
    for line in text.splitlines():
        match = _FENCE.match(line)
        if match:
            mark = match.group(1)
            if fence is None:
                fence = mark
            elif mark[0] == fence[0] and len(mark) >= len(fence):
                fence = None
            continue
        if fence is None:
            heading = _HEADING.match(line)
            if heading:
                headings.append((len(heading.group(1)), heading.group(2)))
    return headings


def is_exercise_statement(cell: dict) -> bool:
    """Whether a markdown cell states an exercise (or opens a section) rather than answers one."""
    text = _source(cell)
    return bool(STARTER_TAG in _tags(cell) or _STATEMENT.match(text) or markdown_headings(text))


def solution_cells(notebook: dict) -> list[int]:
    """The indices of the cells the rule of this module's docstring calls solutions."""
    solutions = []
    section_level = None  # the level of the Exercises heading while inside its section
    answering = False  # inside the section, after a solution and before the next statement
    for index, cell in enumerate(notebook["cells"]):
        tags, kind = _tags(cell), cell["cell_type"]
        if kind == "markdown":
            for level, title in markdown_headings(_source(cell)):
                if title.strip().lower().rstrip(".") == EXERCISES_TITLE:
                    section_level = level
                elif section_level is not None and level <= section_level:
                    section_level = None
            if section_level is None or is_exercise_statement(cell):
                answering = False
        if SOLUTION_TAG in tags:
            solution = True
        elif section_level is None:
            solution = False
        elif kind == "code":  # an earlier run's placeholder is no solution: runs are idempotent
            text = _source(cell)
            solution = STARTER_TAG not in tags and bool(text.strip()) and text != PLACEHOLDER
        else:
            solution = kind == "markdown" and answering
        if solution:
            solutions.append(index)
        answering = section_level is not None and (solution or (answering and kind != "code"))
    return solutions


def strip_solution_directives(text: str) -> str:
    """``text`` without its fenced directives titled Solution/Answer (dropdowns, admonitions)."""
    kept, closing = [], None
    for line in text.splitlines(keepends=True):
        if closing is None:
            match = _SOLUTION_DIRECTIVE.match(line)
            if match:
                closing = match.group("fence")
                continue
            kept.append(line)
        elif (
            line.strip() and set(line.strip()) == {closing[0]} and len(line.strip()) >= len(closing)
        ):
            closing = None
    return "".join(kept)


def _clear(cell: dict) -> dict:
    cell = copy.deepcopy(cell)
    cell.get("metadata", {}).pop("execution", None)
    if cell["cell_type"] == "code":
        cell["outputs"] = []
        cell["execution_count"] = None
    elif cell["cell_type"] == "markdown":
        cell["source"] = strip_solution_directives(_source(cell))
    return cell


def _placeholder(after: dict, taken: set[str]) -> dict:
    cell = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": []}
    cell["source"] = PLACEHOLDER
    if "id" in after:  # nbformat 4.5 cell ids: unique, [a-zA-Z0-9-_]{1,64}
        base = f"{after['id']}"[:55] + "-student"
        new_id, n = base, 1
        while new_id in taken:
            new_id, n = f"{base}{n}", n + 1
        cell["id"] = new_id
        taken.add(new_id)
    return cell


def student_version(notebook: dict) -> dict:
    """A copy of ``notebook`` without solutions, outputs or execution counts."""
    removed = set(solution_cells(notebook))
    taken = {c["id"] for c in notebook["cells"] if "id" in c}
    cells: list[dict] = []
    previous_removed_code = False
    for index, cell in enumerate(notebook["cells"]):
        if index in removed:
            if cell["cell_type"] == "code" and not previous_removed_code:
                cells.append(_placeholder(cell, taken))
            previous_removed_code = previous_removed_code or cell["cell_type"] == "code"
            continue
        previous_removed_code = False
        cells.append(_clear(cell))
    student = copy.deepcopy({k: v for k, v in notebook.items() if k != "cells"})
    student["cells"] = cells
    return student


def write_student_notebooks(book: Path, out: Path) -> dict[str, int]:
    """Write every ``book/*.ipynb`` without solutions into ``out``; return removed counts."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for path in sorted(book.glob("*.ipynb")):
        notebook = json.loads(path.read_text(encoding="utf-8"))
        counts[path.name] = len(solution_cells(notebook))
        text = json.dumps(student_version(notebook), indent=1, ensure_ascii=False) + "\n"
        (out / path.name).write_text(text, encoding="utf-8")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--book", type=Path, default=Path("book"), help="the chapters (book/)")
    parser.add_argument(
        "--out", type=Path, default=Path("_build/student"), help="where to write them"
    )
    args = parser.parse_args(argv)
    counts = write_student_notebooks(args.book, args.out)
    if not counts:
        print(f"error: no notebook found in {args.book}/", file=sys.stderr)
        return 1
    for name, count in counts.items():
        note = "" if count else "  (no solution cell found: is there an Exercises heading?)"
        print(f"{args.out / name}: {count} solution cell(s) removed{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
