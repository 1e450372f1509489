"""The documentation site builds with `mkdocs build --strict` (as `make docs` does), and strict means what
mkdocs.yml says: a page left out of the navigation and a broken anchor fail the build, not only a missing
file (at MkDocs' defaults both are INFO)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from support import ROOT


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_the_site_builds_strict(tmp_path):
    proc = build(ROOT, tmp_path / "site")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "site/architecture/index.html").read_text().count('class="mermaid"') == 1
    # docs/hooks/repo_links.py: a page's link to the code lands on a copy of the file in the site
    assert 'href="../_repo/protos/charrnn/v1/charrnn.proto"' in (tmp_path / "site/serving/index.html").read_text()
    assert (tmp_path / "site/_repo/protos/charrnn/v1/charrnn.proto").read_bytes() == (
        ROOT / "protos/charrnn/v1/charrnn.proto").read_bytes()


def test_strict_fails_on_an_unlisted_page_a_broken_anchor_and_a_missing_code_file(tmp_path):
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    (tmp_path / "docs/unlisted.md").write_text("# Not in the navigation\n")
    with (tmp_path / "docs/serving.md").open("a") as page:
        page.write("\n[a](export.md#no-such-heading) [b](../serve/no_such_module.py)\n")
    proc = build(tmp_path, tmp_path / "site")
    assert proc.returncode != 0
    assert "unlisted.md" in proc.stderr
    assert "does not contain an anchor '#no-such-heading'" in proc.stderr
    assert "_repo/serve/no_such_module.py" in proc.stderr
