"""The built book: a warning-free build, and every page checked in a real browser.

The book is built once per session, by the ``book_build`` fixture, the first time a test needs
it; collecting these tests builds nothing (``pytest -k accountant`` or ``-m unit`` never builds
the book). Every test that needs the build is marked ``book``; the browser tests also
``browser``.

The browser tests serve ``_build/html`` on 127.0.0.1 and open each page in Debian's Chromium,
driven by the ``playwright`` Python package (``playwright install`` is never needed or run).
A page passes when it logs no console error, every request it makes is answered from the local
server, and all of its math has been typeset by the local MathJax. The pages are known before
the build: one per ``_toc.yml`` entry plus the pages Sphinx adds; a test checks that the build
wrote exactly those.

Chromium missing: the browser tests are skipped with a hint, except in CI (``CI=true``), where a
skipped browser test would hide a broken book, so they fail instead.
"""

from __future__ import annotations

import functools
import html
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urljoin, urlsplit

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
HTML_DIR = REPO_ROOT / "_build" / "html"
TOC_FILE = REPO_ROOT / "_toc.yml"
# The CI command (and `make book`'s).
BUILD_COMMAND = ["build", ".", "--all", "-W", "-n", "--keep-going"]
# Pages Sphinx writes besides the chapters: jupyter-book's redirect to the root page, the general
# index, the search page, and the Python module index (book/api.md documents modules).
SPHINX_PAGES = ["index.html", "genindex.html", "search.html", "py-modindex.html"]
LOCAL_HOST = "127.0.0.1"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# How long to wait for one page (or one search) to finish loading; a wait, not a speed test.
PAGE_TIMEOUT_MS = 60_000
# A word every version of this book contains, for the search test.
SEARCH_WORD = "privacy"
# Schemes whose "requests" never leave the browser.
IN_BROWSER_SCHEMES = {"data", "blob", "about"}


# --------------------------------------------------------------------------------------------
# The pages, known without a build
# --------------------------------------------------------------------------------------------

_SOURCE_SUFFIXES = (".md", ".ipynb", ".rst")


def _toc_files(node: Any) -> Iterator[str]:
    """Every ``root:`` and ``file:`` entry of a parsed ``_toc.yml``, in order."""
    if isinstance(node, dict):
        if "glob" in node:
            raise ValueError(f"_toc.yml: glob entries ({node['glob']!r}) cannot be listed here")
        for key in ("root", "file"):
            if key in node:
                yield str(node[key])
        for value in node.values():
            if isinstance(value, dict | list):
                yield from _toc_files(value)
    elif isinstance(node, list):
        for value in node:
            yield from _toc_files(value)


def toc_pages(toc_file: Path = TOC_FILE) -> list[str]:
    """The HTML page of every document in the table of contents (``book/intro.html``)."""
    toc = yaml.safe_load(toc_file.read_text(encoding="utf-8"))
    pages = []
    for name in _toc_files(toc):
        for suffix in _SOURCE_SUFFIXES:
            name = name.removesuffix(suffix)
        pages.append(f"{name}.html")
    return pages


PAGES = sorted({*toc_pages(), *SPHINX_PAGES})


# --------------------------------------------------------------------------------------------
# Building the book (once per session, on first use)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BookBuild:
    """The outcome of one ``jupyter-book build``: exit code, combined stdout/stderr, HTML folder."""

    returncode: int
    output: str = field(repr=False)
    html_dir: Path

    def warning_lines(self) -> list[str]:
        """Lines of the build log that report a Sphinx warning."""
        return [line for line in self.output.splitlines() if "WARNING" in line]


def _jupyter_book() -> Path:
    """The jupyter-book executable of the environment running the tests."""
    return Path(sys.executable).parent / "jupyter-book"


def build_book() -> BookBuild:
    """Build the book with the CI command.

    ``_build/html`` is emptied first: ``--all`` rewrites every page but leaves pages of removed
    chapters behind, and the tests must see exactly what this build produced.
    """
    shutil.rmtree(HTML_DIR, ignore_errors=True)
    completed = subprocess.run(
        [str(_jupyter_book()), *BUILD_COMMAND],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    return BookBuild(completed.returncode, completed.stdout, HTML_DIR)


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
def book_build() -> BookBuild:
    """The book, built once per session on first use; fails every test that uses it unless the
    build was clean."""
    build = build_book()
    tail = "\n".join(build.output.splitlines()[-40:])
    assert build.returncode == 0, f"jupyter-book build exited with {build.returncode}:\n{tail}"
    assert not build.warning_lines(), "the build logged warnings:\n" + "\n".join(
        build.warning_lines()
    )
    return build


# --------------------------------------------------------------------------------------------
# The build and its pages
# --------------------------------------------------------------------------------------------


@pytest.mark.book
def test_build_is_warning_free(book_build) -> None:
    """``jupyter-book build . --all -W -n --keep-going`` exits 0 and logs no warning."""
    assert book_build.returncode == 0
    assert book_build.warning_lines() == []


@pytest.mark.book
def test_notebook_pages_keep_launch_and_repository_buttons(book_build) -> None:
    """Pages built from notebooks still offer Binder, Colab and the repository link.

    jupyter-book generates ``html_theme_options`` from ``launch_buttons`` and ``repository`` in
    ``_config.yml``; setting ``html_theme_options`` under ``sphinx: config:`` would silently
    replace them. This guards against that.
    """
    sources = book_build.html_dir / "_sources"
    notebooks = sorted(sources.rglob("*.ipynb"))
    assert notebooks, "no notebook page was built"
    for source in notebooks:
        page = book_build.html_dir / source.relative_to(sources).with_suffix(".html")
        text = page.read_text(encoding="utf-8")
        for link in ("https://mybinder.org/", "https://colab.research.google.com/", "github.com/"):
            assert link in text, f"{page.name}: no link to {link} (launch/repository button lost)"


@pytest.mark.book
def test_the_build_wrote_exactly_the_pages_the_browser_tests_check(book_build) -> None:
    """The browser tests are parametrized before the build, from ``_toc.yml`` and the pages
    Sphinx adds; the build must have written each of them and no other page."""
    built = set(built_pages(book_build.html_dir))
    assert built, "the build wrote no page"
    assert sorted(built - set(PAGES)) == [], "pages built but never opened in the browser"
    assert sorted(set(PAGES) - built) == [], "pages expected but not built"


def test_toc_pages_lists_every_toc_entry() -> None:
    """``toc_pages`` (no build needed) lists the root and nested files and refuses globs."""
    assert toc_pages()[0] == "book/intro.html"
    assert "book/dp-sgd.html" in PAGES and "search.html" in PAGES
    nested = {"root": "a", "parts": [{"chapters": [{"file": "b.md", "sections": [{"file": "c"}]}]}]}
    assert list(_toc_files(nested)) == ["a", "b.md", "c"]
    with pytest.raises(ValueError, match="glob"):
        list(_toc_files({"root": "a", "chapters": [{"glob": "x/*"}]}))


# --------------------------------------------------------------------------------------------
# Serving the book and driving Chromium
# --------------------------------------------------------------------------------------------


class _QuietHandler(SimpleHTTPRequestHandler):
    """Serves files without printing a log line per request."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib's name)
        pass


@pytest.fixture(scope="session")
def book_url(book_build) -> Iterator[str]:
    """Base URL (ending in ``/``) of ``_build/html`` served on 127.0.0.1 at a free port."""
    handler = functools.partial(_QuietHandler, directory=str(book_build.html_dir))
    server = ThreadingHTTPServer((LOCAL_HOST, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{LOCAL_HOST}:{server.server_port}/"
    server.shutdown()
    server.server_close()
    thread.join()


def _browser_unavailable(reason: str) -> NoReturn:
    """Skip, with how to fix it; but fail in CI, where a skipped browser test hides breakage."""
    message = f"{reason}; install Chromium with `sudo apt-get install chromium`"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true, so this is a failure, not a skip)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """A headless Chromium (Debian's), launched once per session."""
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        _browser_unavailable(f"Chromium not found at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _browser_unavailable("the playwright Python package is not installed")
    executable = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _is_local(url: str) -> bool:
    """True for URLs served by our local server, or that never leave the browser."""
    parts = urlsplit(url)
    return parts.scheme in IN_BROWSER_SCHEMES or parts.hostname == LOCAL_HOST


@pytest.fixture
def browser_context(browser) -> Iterator[Any]:
    """A fresh browser context (empty profile: no cache, no local storage) for one test.

    Requests to any other host are aborted, so a test never waits on the network; they are
    still recorded (and reported) by ``PageLog``.
    """
    context = browser.new_context()
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    context.route(lambda url: not _is_local(url), lambda route: route.abort())
    yield context
    context.close()


@dataclass
class PageLog:
    """Everything a page did that a clean page must not do."""

    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    foreign_requests: list[str] = field(default_factory=list)

    def watch(self, page: Any) -> None:
        """Start recording the page's console errors, uncaught exceptions and requests."""
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.console_errors.append(f"uncaught: {error}"))
        page.on("request", self._on_request)
        page.on("requestfailed", lambda r: self.failed_requests.append(f"{r.url} ({r.failure})"))
        page.on("response", self._on_response)

    def _on_console(self, message: Any) -> None:
        if message.type == "error":
            self.console_errors.append(f"{message.text} at {message.location.get('url')}")

    def _on_request(self, request: Any) -> None:
        if not _is_local(request.url):
            self.foreign_requests.append(request.url)

    def _on_response(self, response: Any) -> None:
        if response.status >= 400:
            self.failed_requests.append(f"{response.url} (HTTP {response.status})")

    def problems(self) -> list[str]:
        """One line per problem seen so far; empty for a clean page."""
        return (
            [f"console error: {text}" for text in self.console_errors]
            + [f"failed request: {text}" for text in self.failed_requests]
            + [f"request to another host: {url}" for url in self.foreign_requests]
        )


_REDIRECT = re.compile(r'<meta\s+http-equiv="refresh"\s+content="\d+;\s*url=([^"]+)"', re.I)


def redirect_target(html_file: Path) -> str | None:
    """The URL a meta-refresh page sends the reader to (``index.html`` is one), else None."""
    match = _REDIRECT.search(html_file.read_text(encoding="utf-8"))
    return html.unescape(match.group(1)) if match else None


def open_page(context: Any, url: str, log: PageLog, *, redirects_to: str | None = None) -> Any:
    """Open ``url`` in a new tab, following a meta refresh, and wait until the network is idle."""
    page = context.new_page()
    log.watch(page)
    page.goto(url, wait_until="networkidle")
    if redirects_to is not None:
        page.wait_for_url(urljoin(url, redirects_to))
        page.wait_for_load_state("networkidle")
    return page


# --------------------------------------------------------------------------------------------
# Math
# --------------------------------------------------------------------------------------------

# Resolves once MathJax has typeset the page; says why not when the page has math but no MathJax.
# Once, in a full run on a loaded two-core machine, api.html had no MathJax started yet when the
# network was idle (and passed when run again): its start is awaited for up to 60 s.
_WAIT_FOR_MATHJAX = """async () => {
    if (!document.querySelector('.math')) return 'no math';
    const started = () => window.MathJax?.startup?.promise;
    for (let tries = 0; tries < 600 && !started(); tries++) {
        await new Promise(resolve => setTimeout(resolve, 100));
    }
    if (!started()) return 'MathJax not loaded';
    await window.MathJax.startup.promise;
    return 'typeset';
}"""

# Math elements (Sphinx writes span.math inline and div.math for display) without MathJax output.
_UNTYPESET_MATH = """() => Array.from(document.querySelectorAll('.math'))
    .filter(el => !el.querySelector('mjx-container'))
    .map(el => el.outerHTML.slice(0, 120))"""

# Visible text outside code, scripts and typeset math: where raw TeX must not show.
_VISIBLE_PROSE = """() => {
    const skip = 'pre, code, script, style, textarea, mjx-container, .highlight';
    const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
    const parts = [];
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
        const el = node.parentElement;
        if (el && !el.closest(skip) && el.checkVisibility()) parts.push(node.data);
    }
    return parts.join(' ');
}"""

# TeX delimiters left in the text: \( \) \[ \] $$, \begin{...}, or $...$ around TeX-like content
# (a backslash, ^, _ or brace between the dollars; "$5 and $10" is not matched).
_RAW_TEX = re.compile(r"\\[()\[\]]|\$\$|\\begin\{|\$[^$\s][^$]*?[\\^_{}][^$]*?\$")


def math_problems(page: Any) -> list[str]:
    """Wait for MathJax, then list math left untypeset and raw TeX still visible."""
    state = page.evaluate(_WAIT_FOR_MATHJAX)
    if state == "MathJax not loaded":
        return ["the page has math but MathJax did not load"]
    problems = [f"untypeset math: {snippet}" for snippet in page.evaluate(_UNTYPESET_MATH)]
    raw_tex = _RAW_TEX.findall(page.evaluate(_VISIBLE_PROSE))
    problems += [f"raw TeX visible: {snippet!r}" for snippet in raw_tex]
    return problems


# --------------------------------------------------------------------------------------------
# The browser tests
# --------------------------------------------------------------------------------------------


@pytest.mark.book
@pytest.mark.browser
@pytest.mark.parametrize("page", PAGES, ids=PAGES)
def test_page_is_clean_in_browser(page: str, book_build, book_url: str, browser_context) -> None:
    """The page loads with no console error, no failed or foreign request, and typeset math."""
    assert (book_build.html_dir / page).is_file(), f"{page} was not built"
    log = PageLog()
    redirect = redirect_target(book_build.html_dir / page)
    tab = open_page(browser_context, book_url + page, log, redirects_to=redirect)
    problems = math_problems(tab) + log.problems()
    assert not problems, f"{page}:\n  " + "\n  ".join(problems)


@pytest.mark.book
@pytest.mark.browser
def test_search_finds_pages(book_build, book_url: str, browser_context) -> None:
    """Searching for a word the book contains lists at least one page, with no errors."""
    log = PageLog()
    tab = open_page(browser_context, f"{book_url}search.html?q={SEARCH_WORD}", log)
    summary = tab.locator("#search-results p.search-summary")
    tab.wait_for_function(
        "() => document.querySelector('#search-results p.search-summary')?.innerText.length > 0"
    )
    results = tab.locator("#search-results ul.search li a").all()
    assert results, f"no result for {SEARCH_WORD!r}: {summary.inner_text()}"
    first = urlsplit(urljoin(tab.url, results[0].get_attribute("href"))).path.lstrip("/")
    assert (book_build.html_dir / first).is_file(), f"first result links to a missing page {first}"
    assert not log.problems(), "search page:\n  " + "\n  ".join(log.problems())
