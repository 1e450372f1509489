"""The project version, read from CHANGELOG.md's newest release heading: the one place it is kept."""

from __future__ import annotations

import functools
import re
from pathlib import Path

from serve.errors import ConfigError

CHANGELOG = Path(__file__).resolve().parents[2] / "CHANGELOG.md"
# A release heading as Keep a Changelog writes it: `## [1.2.3] - 2026-12-01`.
_RELEASE = re.compile(r"^## \[(\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?)\]", re.MULTILINE)


@functools.cache
def project_version(changelog: Path = CHANGELOG) -> str:
    """The newest released version; a missing file or heading is a packaging error, said as such (a
    ConfigError: the server exits with the message, no traceback)."""
    try:
        text = changelog.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read the project version from {changelog}: {error.strerror}"
                           " (images must copy CHANGELOG.md beside serve/)") from error
    match = _RELEASE.search(text)
    if match is None:
        raise ConfigError(f"{changelog} has no release heading like '## [1.2.3] - 2026-12-01'")
    return match.group(1)
