"""Print the release notes of a version from CHANGELOG.md, after checking that the version is the
package's own (python/blob2gpu/_version.py). The release workflow runs it on the pushed tag and
stops the release when it fails.

    python scripts/release_notes.py [TAG]     TAG: vX.Y.Z or X.Y.Z (default: the package's version)

Exits 1, saying why, when the tag is not the package's version or CHANGELOG.md has no section
`## X.Y.Z ...` with text in it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VERSION_FILE = REPO / "python" / "blob2gpu" / "_version.py"
CHANGELOG = REPO / "CHANGELOG.md"


class ReleaseError(Exception):
    """The tag, the package's version and the changelog disagree (the message says how)."""


def package_version(version_file: Path = VERSION_FILE) -> str:
    """The version string `__version__ = "..."` in version_file defines."""
    match = re.search(r'^__version__ = "([^"]+)"$', version_file.read_text(), re.MULTILINE)
    if match is None:
        raise ReleaseError(f"{version_file} defines no __version__")
    return match.group(1)


def release_notes(version: str, changelog: str) -> str:
    """The text of `## {version} ...` in changelog, up to the next `## ` heading."""
    sections = re.split(r"^## ", changelog, flags=re.MULTILINE)[1:]
    for section in sections:
        heading, _, body = section.partition("\n")
        if heading.split()[0] == version:
            if not body.strip():
                raise ReleaseError(f"CHANGELOG.md: the section of {version} is empty")
            return body.strip()
    raise ReleaseError(f"CHANGELOG.md has no section '## {version} (DATE)'")


def main(argv: list[str]) -> int:
    try:
        version = package_version()
        tag = argv[0] if argv else version
        if tag.removeprefix("v") != version:
            raise ReleaseError(f"tag {tag} is not the package's version {version} ({VERSION_FILE})")
        print(release_notes(version, CHANGELOG.read_text()))
    except ReleaseError as e:
        print(f"release_notes: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
