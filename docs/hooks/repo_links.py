"""MkDocs hook: links from the docs to the repository's own files work on the site as they do on GitHub.

A page links to code as GitHub resolves it, relative to the page: `[charrnn.proto](../protos/charrnn/v1/
charrnn.proto)`. Such a target lies outside docs/, so MkDocs would not know it. This hook copies each file a
page links to from outside docs/ into the site under `_repo/` (as it is, never rendered as a page) and
points the link there. MkDocs then validates the rewritten link like any other: a file that does not exist
is a broken link and `mkdocs build --strict` fails; so does a link to a folder (unrecognized_links).
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

PREFIX = "_repo"
# [text](target) and ![alt](target): the target up to a space, a closing parenthesis or a fragment.
LINK = re.compile(r"(\]\()(\.\./[^)\s#]*)")


class RepoFile(File):
    """A repository file copied into the site as it is: never a page, even when it is Markdown."""

    def is_documentation_page(self) -> bool:
        return False

    def is_static_page(self) -> bool:
        return False


def _outside(page_src_uri: str, target: str) -> str | None:
    """The repository path a link from a page points to, when it lies outside docs/; else None."""
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(page_src_uri), target))
    if not joined.startswith("../"):
        return None
    return joined[len("../"):]


def on_files(files: Files, config: MkDocsConfig) -> Files:
    docs = Path(config.docs_dir)
    root = docs.parent
    for page in list(files.documentation_pages()):
        text = Path(page.abs_src_path or "").read_text(encoding="utf-8")
        for match in LINK.finditer(text):
            path = _outside(page.src_uri, match.group(2))
            if path is None or not (root / path).is_file():  # missing: MkDocs reports the rewritten link
                continue
            src_uri = f"{PREFIX}/{path}"
            if files.get_file_from_path(src_uri) is None:
                files.append(RepoFile.generated(config, src_uri, abs_src_path=str(root / path)))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    depth = page.file.src_uri.count("/")

    def rewrite(match: re.Match[str]) -> str:
        path = _outside(page.file.src_uri, match.group(2))
        if path is None:
            return match.group(0)
        return match.group(1) + "../" * depth + f"{PREFIX}/{path}"

    return LINK.sub(rewrite, markdown)
