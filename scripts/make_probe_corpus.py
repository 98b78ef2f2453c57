#!/usr/bin/env python3
"""Regenerate the default probe corpus from the Debian python3.11-doc HTML pages.

The corpus is the prose of the Python 3.11 Tutorial and of three FAQ pages,
one paragraph per block separated by blank lines. Code listings, tables,
tables of contents, navigation and admonition titles are dropped, and inline
code is kept as plain text. Fetch the source first (see
nerve_cli/data/probe/SOURCE.md):

    apt-get download python3.11-doc
    dpkg -x python3.11-doc_*_all.deb /tmp/python3.11-doc
    python scripts/make_probe_corpus.py \
        --html-dir /tmp/python3.11-doc/usr/share/doc/python3.11/html

Only the Python standard library is used.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

log = logging.getLogger("make_probe_corpus")

# Pages in the order of the Tutorial's and the FAQ's tables of contents.
# The FAQ pages that are mostly about C extensions, Windows or GUI toolkits are left out.
PAGES = [
    "tutorial/appetite.html",
    "tutorial/interpreter.html",
    "tutorial/introduction.html",
    "tutorial/controlflow.html",
    "tutorial/datastructures.html",
    "tutorial/modules.html",
    "tutorial/inputoutput.html",
    "tutorial/errors.html",
    "tutorial/classes.html",
    "tutorial/stdlib.html",
    "tutorial/stdlib2.html",
    "tutorial/venv.html",
    "tutorial/whatnow.html",
    "tutorial/interactive.html",
    "tutorial/floatingpoint.html",
    "tutorial/appendix.html",
    "faq/general.html",
    "faq/programming.html",
    "faq/design.html",
]

# Elements whose text becomes one paragraph of the corpus.
BLOCK_TAGS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "dt"}

# Void elements never get an end tag, so they must not be pushed on the element stack.
VOID_TAGS = {"br", "img", "hr", "meta", "link", "input", "wbr", "col", "area", "base", "source"}

# An element with one of these tags or classes is dropped with everything inside it.
# "sig" marks API signatures such as "list.append(x)", "rubric" the "Footnotes" headings.
SKIP_TAGS = {"pre", "table", "script", "style", "nav"}
SKIP_CLASSES = {
    "highlight",
    "headerlink",
    "section-number",
    "admonition-title",
    "toctree-wrapper",
    "linenos",
    "fn-bracket",
    "rubric",
    "sig",
}


class ProseExtractor(HTMLParser):
    """Collect the prose paragraphs inside the `div role="main"` body of a Sphinx page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        # One entry per open element: (tag, starts_main_body, skipped, starts_block).
        self._stack: list[tuple[str, bool, bool, bool]] = []
        self._main_depth = 0
        self._skip_depth = 0
        self._block_depth = 0
        self._buffer: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in VOID_TAGS:
            return
        attributes = dict(attrs)
        classes = set((attributes.get("class") or "").split())
        is_main = tag == "div" and attributes.get("role") == "main"
        is_skipped = (
            tag in SKIP_TAGS
            or bool(classes & SKIP_CLASSES)
            or any(name.startswith("highlight-") for name in classes)
        )
        in_body = self._main_depth > 0 or is_main
        starts_block = (
            in_body and tag in BLOCK_TAGS and self._block_depth == 0 and self._skip_depth == 0
        )
        self._stack.append((tag, is_main, is_skipped, starts_block))
        self._main_depth += is_main
        self._skip_depth += is_skipped
        if starts_block:
            self._block_depth += 1
            self._buffer = []

    def handle_endtag(self, tag: str) -> None:
        # A stray end tag without an open element of that name is ignored.
        if tag in VOID_TAGS or all(entry[0] != tag for entry in self._stack):
            return
        # Pop up to the matching start tag, so an unclosed inner element cannot leak state.
        while self._stack:
            open_tag, is_main, is_skipped, starts_block = self._stack.pop()
            self._main_depth -= is_main
            self._skip_depth -= is_skipped
            if starts_block:
                self._block_depth -= 1
                self._flush()
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._block_depth > 0 and self._skip_depth == 0:
            self._buffer.append(data)

    def _flush(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self._buffer)).strip()
        self._buffer = []
        if text:
            self.paragraphs.append(text)


def extract_page(path: Path) -> list[str]:
    """Return the prose paragraphs of one Sphinx HTML page."""
    parser = ProseExtractor()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser.paragraphs


def build_corpus(html_dir: Path) -> str:
    """Concatenate the paragraphs of all pages in PAGES, blank-line separated."""
    paragraphs: list[str] = []
    for page in PAGES:
        path = html_dir / page
        if not path.is_file():
            raise FileNotFoundError(
                f"page not found: {path}. Pass --html-dir pointing at "
                "usr/share/doc/python3.11/html of the unpacked python3.11-doc package."
            )
        page_paragraphs = extract_page(path)
        log.info("%s: %d paragraphs", page, len(page_paragraphs))
        paragraphs.extend(page_paragraphs)
    return "\n\n".join(paragraphs) + "\n"


def main(argv: list[str] | None = None) -> int:
    repo_root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--html-dir",
        type=Path,
        required=True,
        help="the html/ folder of the unpacked python3.11-doc package",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=repo_root / "nerve_cli" / "data" / "probe" / "default.txt",
        help="output text file (default: nerve_cli/data/probe/default.txt)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    corpus = build_corpus(args.html_dir)
    data = corpus.encode("utf-8")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    log.info(
        "wrote %s: %d bytes, %d paragraphs, sha256 %s",
        args.out,
        len(data),
        corpus.count("\n\n") + 1,
        hashlib.sha256(data).hexdigest(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
