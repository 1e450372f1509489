"""The project version comes from one place, CHANGELOG.md's newest release heading."""

from __future__ import annotations

import re

import pytest

from serve.errors import ConfigError
from serve.ops.version import CHANGELOG, project_version


def test_the_version_is_the_newest_release_heading_of_the_changelog():
    # Keep a Changelog's `## [Unreleased]` above the releases gathers what the next one will hold: not a version
    headings = [h for h in re.findall(r"^## \[([^\]]+)\]", CHANGELOG.read_text(encoding="utf-8"), re.MULTILINE)
                if h != "Unreleased"]
    assert headings, "CHANGELOG.md lists no release"
    assert project_version() == headings[0]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project_version())


def test_a_changelog_without_a_release_or_missing_is_a_clear_error(tmp_path):
    empty = tmp_path / "CHANGELOG.md"
    empty.write_text("# Changelog\n\n## Unreleased\n- nothing yet\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no release heading"):
        project_version(empty)
    with pytest.raises(ConfigError, match=r"images must copy CHANGELOG\.md"):
        project_version(tmp_path / "absent.md")


def test_a_prerelease_heading_counts(tmp_path):
    changelog = tmp_path / "CHANGELOG.md"
    changelog.write_text("## [1.4.0-rc.1] - 2026-12-01\n\n## [1.3.2] - 2026-11-01\n", encoding="utf-8")
    assert project_version(changelog) == "1.4.0-rc.1"


def test_an_unreleased_heading_above_the_releases_is_not_the_version(tmp_path):
    changelog = tmp_path / "CHANGELOG.md"
    changelog.write_text("## [Unreleased]\n\n### Added\n- x\n\n## [0.2.0] - 2026-12-01\n", encoding="utf-8")
    assert project_version(changelog) == "0.2.0"
