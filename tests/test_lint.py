"""The code is lint-clean and formatted: ``ruff check`` and ``ruff format --check``.

The rules are in pyproject.toml (``[tool.ruff]``): lines of at most 100 characters, pycodestyle,
pyflakes, import sorting with ``companion`` first-party, bugbear, pyupgrade and flake8-builtins.
``ruff format`` keeps the statements that end in ``# fmt: skip`` as written (hand-aligned
argument lists), so the format check and those comments agree.

To fix a failure: ``.venv/bin/ruff check --fix companion tests benchmarks scripts`` and
``.venv/bin/ruff format companion tests benchmarks scripts``, then edit what remains by hand.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
LINTED = ["companion", "tests", "benchmarks", "scripts"]


def ruff(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ruff of the test environment from the repository root (so it reads pyproject)."""
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args],
        cwd=REPO_ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture(scope="module", autouse=True)
def _ruff_installed() -> None:
    """ruff is a test dependency (the ``test`` extra); say how to get it instead of a traceback."""
    version = ruff("--version")
    assert version.returncode == 0, (
        "ruff is not installed in the test environment: `pip install -e .[test]` "
        f"(or `make test`)\n{version.stderr}"
    )


def test_ruff_check_is_clean() -> None:
    result = ruff("check", "--no-fix", "--output-format", "concise", *LINTED)
    assert result.returncode == 0, (
        "ruff check found problems; `ruff check --fix` fixes some, the rest need hand edits:\n"
        + result.stdout
        + result.stderr
    )


def test_ruff_format_leaves_the_code_unchanged() -> None:
    result = ruff("format", "--check", "--output-format", "concise", *LINTED)
    assert result.returncode == 0, (
        "these files are not formatted; run `ruff format companion tests benchmarks`:\n"
        + result.stdout
        + result.stderr
    )


# --- the configuration catches what it should (negative controls) ---------------------------


def _check_source(source: str) -> set[str]:
    """The rule codes ruff reports for ``source`` as if it were a file of the package."""
    result = ruff(
        "check",
        "--no-fix",
        "--output-format",
        "concise",
        "--stdin-filename",
        "companion/_lint_probe.py",
        "-",
        stdin=source,
    )
    assert result.returncode in (0, 1), result.stderr
    codes = set()
    for line in result.stdout.splitlines():
        # "companion/_lint_probe.py:1:101: E501 Line too long (101 > 100)"
        parts = line.split(": ", 1)
        if len(parts) == 2 and parts[0].startswith("companion/_lint_probe.py:"):
            codes.add(parts[1].split()[0])
    return codes


def test_lines_of_100_characters_pass_and_101_fail() -> None:
    at_limit = "x = '" + "a" * 94 + "'\n"
    assert len(at_limit.rstrip("\n")) == 100
    assert _check_source(at_limit) == set()
    assert _check_source("x = '" + "a" * 95 + "'\n") == {"E501"}


def test_companion_is_sorted_as_first_party() -> None:
    """``companion`` comes after third-party imports, in its own block."""
    ordered = (
        "import math\n\nimport numpy as np\n\nimport companion\n\nprint(math, np, companion)\n"
    )
    assert _check_source(ordered) == set()
    companion_with_third_party = (
        "import math\n\nimport companion\nimport numpy as np\n\nprint(math, np, companion)\n"
    )
    assert _check_source(companion_with_third_party) == {"I001"}


def test_bugbear_pyupgrade_pyflakes_and_builtins_are_on() -> None:
    assert _check_source("def f(x=[]):\n    return x\n") == {"B006"}
    assert _check_source("from typing import List\n\nx: List[int] = []\n") == {"UP035", "UP006"}
    assert _check_source("import os\n") == {"F401"}
    assert _check_source("def f(list):\n    return list\n") == {"A002"}
