"""Shared fixtures: build the book once per test session and list the pages it produced.

The build runs the same command as CI and ``make book``. It happens the first time something
needs it: either the ``book_build`` fixture, or collection of a test that takes a ``page``
argument (those tests are parametrized by the HTML files the build wrote, so the build has to
exist before they can be listed). Either way it runs at most once per session.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
HTML_DIR = REPO_ROOT / "_build" / "html"
BUILD_COMMAND = ["build", ".", "--all", "-W", "-n", "--keep-going"]


@dataclass(frozen=True)
class BookBuild:
    """The outcome of one ``jupyter-book build``: exit code, combined stdout/stderr, HTML folder."""

    returncode: int
    output: str = field(repr=False)
    html_dir: Path

    def warning_lines(self) -> list[str]:
        """Lines of the build log that report a Sphinx warning."""
        return [line for line in self.output.splitlines() if "WARNING" in line]


_BUILD_KEY = pytest.StashKey[BookBuild]()


def _jupyter_book() -> Path:
    """The jupyter-book executable of the environment running the tests."""
    return Path(sys.executable).parent / "jupyter-book"


def build_book(config: pytest.Config) -> BookBuild:
    """Build the book with the CI command, once per session (the result is kept in the stash).

    ``_build/html`` is emptied first: ``--all`` rewrites every page but leaves pages of removed
    chapters behind, and the browser tests must see exactly what this build produced.
    """
    if _BUILD_KEY not in config.stash:
        shutil.rmtree(HTML_DIR, ignore_errors=True)
        completed = subprocess.run(
            [str(_jupyter_book()), *BUILD_COMMAND],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )
        config.stash[_BUILD_KEY] = BookBuild(completed.returncode, completed.stdout, HTML_DIR)
    return config.stash[_BUILD_KEY]


def built_pages(html_dir: Path) -> list[str]:
    """Every HTML page of the build, as paths relative to ``html_dir`` (``book/intro.html``).

    Folders whose name starts with ``_`` hold assets, not pages (``_static`` has template
    fragments such as ``webpack-macros.html``), so they are left out.
    """
    pages = (
        path.relative_to(html_dir).as_posix()
        for path in html_dir.rglob("*.html")
        if not any(part.startswith("_") for part in path.relative_to(html_dir).parts)
    )
    return sorted(pages)


@pytest.fixture(scope="session")
def book_build(request: pytest.FixtureRequest) -> BookBuild:
    """The book, built once; fails every test that uses it unless the build was clean."""
    build = build_book(request.config)
    tail = "\n".join(build.output.splitlines()[-40:])
    assert build.returncode == 0, f"jupyter-book build exited with {build.returncode}:\n{tail}"
    assert not build.warning_lines(), "the build logged warnings:\n" + "\n".join(
        build.warning_lines()
    )
    return build


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize every test that takes ``page`` by the pages the build produced."""
    if "page" in metafunc.fixturenames:
        pages = built_pages(build_book(metafunc.config).html_dir)
        metafunc.parametrize("page", pages, ids=pages)
