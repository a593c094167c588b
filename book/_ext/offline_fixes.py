"""Small Sphinx fixes so that every page of the book loads with a clean browser console.

A stock jupyter-book 1.0.4 page (Sphinx 7.4, sphinx-book-theme 1.3, pydata-sphinx-theme 0.17)
logs two errors in Chromium; ``tests/test_book.py`` opens every page and fails on any of them.

1. ``Uncaught SyntaxError: Identifier 'THEBE_JS_URL' has already been declared``.
   Fixed here, see ``_add_js_file_without_duplicates`` below.
2. ``Got invalid theme mode: . Resetting to auto.`` (pydata-sphinx-theme writes
   ``dataset.mode = "{{ default_mode }}"`` and that template variable is empty unless the
   project sets it). Fixed in ``_config.yml`` with ``html_context: {default_mode: light}``,
   the setting the theme documents; nothing to do here.

The other offline pieces are plain configuration as well: MathJax is served from
``book/_static/mathjax`` (``mathjax_path``) and the favicon from ``book/_static/favicon.png``.
"""

from __future__ import annotations

import functools
from typing import Any

from sphinx.application import Sphinx


def _add_js_file_without_duplicates(app: Sphinx) -> None:
    """Make ``app.add_js_file(None, body=...)`` emit its inline script once, not twice.

    Error removed: ``Uncaught SyntaxError: Identifier 'THEBE_JS_URL' has already been declared``
    (the same bug also writes ``var togglebuttonSelector = ...`` twice, which is harmless).

    Why: sphinx-thebe (at ``env-before-read-docs``) and sphinx-togglebutton (at
    ``builder-inited``) add inline scripts with ``app.add_js_file(None, body=...)`` after the
    HTML builder has been initialised. Sphinx 7 hands the builder the filename ``None`` at that
    moment, and again ``''`` when it re-reads its registry before writing; the builder's
    duplicate check compares filenames, sees ``None != ''`` and writes the script twice. Two
    ``const THEBE_JS_URL = ...`` declarations in one page are a SyntaxError.

    This is the upstream fix (sphinx-doc/sphinx PR #13402, merged for Sphinx 8): pass ``''``
    instead of ``None``, which Sphinx treats identically everywhere else. It only changes how
    this ``app`` object forwards the call; it can go when the book moves to a Sphinx that has it.
    """
    original = app.add_js_file

    @functools.wraps(original)
    def add_js_file(filename: str | None, *args: Any, **kwargs: Any) -> None:
        original("" if filename is None else filename, *args, **kwargs)

    app.add_js_file = add_js_file  # type: ignore[method-assign]


def setup(app: Sphinx) -> dict[str, Any]:
    """Register the fixes; they hold no state, so parallel reads and writes are safe."""
    _add_js_file_without_duplicates(app)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
