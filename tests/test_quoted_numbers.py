"""Every number a page quotes from another notebook's run equals what that notebook printed.

The intro promises that every number in the book comes from the code. Numbers computed in a
notebook and quoted on another page (trends, FAQ, corrections, intro, other chapters) are listed in
``tests/quoted_numbers.json``; its ``about`` field states the rule this test applies. When a
chapter is re-executed and a number moves, this test names the page to update.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUOTES = json.loads((ROOT / "tests" / "quoted_numbers.json").read_text())["entries"]
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def _collapse(text: str) -> str:
    return " ".join(text.split())


@cache
def _page_text(path: str) -> str:
    """A page's prose: a markdown file, or the markdown cells of a notebook."""
    if path.endswith(".ipynb"):
        cells = json.loads((ROOT / path).read_text())["cells"]
        text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    else:
        text = (ROOT / path).read_text()
    return _collapse(text)


@cache
def _notebook(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def _cell_output(notebook: str, cell_id: str) -> str:
    """The committed text output (streams and text/plain) of one cell, found by its id."""
    cells = [c for c in _notebook(notebook)["cells"] if c.get("id") == cell_id]
    assert len(cells) == 1, f"{notebook} has {len(cells)} cells with id {cell_id}"
    parts = []
    for output in cells[0].get("outputs", []):
        if output["output_type"] == "stream":
            parts.append("".join(output["text"]))
        elif "text/plain" in output.get("data", {}):
            parts.append("".join(output["data"]["text/plain"]))
    return "".join(parts)


def _check(entry: dict) -> list[str]:
    """What is wrong with one quote: missing from its page, or not what the notebook printed."""
    quote = _collapse(entry["quote"])
    problems = []
    if quote not in _page_text(entry["page"]):
        problems.append("the quote is not on the page")
    quoted = NUMBER.search(quote).group().replace(",", "")
    match = re.search(entry["pattern"], _cell_output(entry["notebook"], entry["cell_id"]))
    if match is None:
        problems.append("the pattern finds nothing in the cell's output")
    else:
        decimals = len(quoted.split(".")[1]) if "." in quoted else 0
        computed = float(match.group(1).replace(",", ""))
        if round(computed, decimals) != float(quoted):
            problems.append(f"quoted {quoted}, the notebook printed {match.group(1)}")
    return problems


@pytest.mark.parametrize("entry", QUOTES, ids=[f"{e['page']}:{e['quote'][:30]}" for e in QUOTES])
def test_quoted_number_matches_the_notebook(entry: dict) -> None:
    assert _check(entry) == [], f"{entry['page']}: {entry['quote']!r}"


def test_the_check_catches_a_wrong_number_and_a_wrong_pattern() -> None:
    """Negative controls: change the quoted number, or the pattern, of a real entry."""
    entry = next(e for e in QUOTES if e["page"].endswith(".md"))
    number = NUMBER.search(entry["quote"]).group()
    wrong_number = dict(entry, quote=entry["quote"].replace(number, number + "9", 1))
    assert any("not on the page" in p or "quoted" in p for p in _check(wrong_number))
    wrong_pattern = dict(entry, pattern=r"no such text (\d+)")
    assert "the pattern finds nothing in the cell's output" in _check(wrong_pattern)
