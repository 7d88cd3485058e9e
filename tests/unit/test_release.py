"""One version, defined once (python/blob2gpu/_version.py): the installed package's metadata,
`blob2gpu.__version__` and `blob2gpu --version` agree with it, CHANGELOG.md has its section, and
scripts/release_notes.py (what the release workflow runs on a tag) refuses a tag or a changelog
that disagrees."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import blob2gpu
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import release_notes  # noqa: E402


def test_metadata_package_and_command_line_report_the_one_version():
    version = release_notes.package_version()
    assert blob2gpu.__version__ == version
    assert importlib.metadata.version("blob2gpu") == version
    out = subprocess.run(
        [sys.executable, "-m", "blob2gpu", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"blob2gpu {version}"


def test_the_changelog_has_the_current_version():
    notes = release_notes.release_notes(blob2gpu.__version__, release_notes.CHANGELOG.read_text())
    assert notes.startswith("- ")


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    script = REPO / "scripts" / "release_notes.py"
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, check=False
    )


def test_a_tag_of_the_package_version_prints_its_notes():
    result = run_script(f"v{blob2gpu.__version__}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == release_notes.release_notes(
        blob2gpu.__version__, release_notes.CHANGELOG.read_text()
    )


def test_a_tag_of_another_version_stops_the_release():
    result = run_script("v99.0.0")
    assert result.returncode == 1
    assert "v99.0.0 is not the package's version" in result.stderr


CHANGELOG = """# Changelog

## 1.1.0 (unreleased)

## 1.0.0 (2026-01-02)

- first
"""


def test_a_missing_or_empty_section_is_an_error():
    assert release_notes.release_notes("1.0.0", CHANGELOG) == "- first"
    with pytest.raises(release_notes.ReleaseError, match="no section '## 1.0.1"):
        release_notes.release_notes("1.0.1", CHANGELOG)
    with pytest.raises(release_notes.ReleaseError, match="section of 1.1.0 is empty"):
        release_notes.release_notes("1.1.0", CHANGELOG)
    # A version is matched whole, not as a prefix of another.
    with pytest.raises(release_notes.ReleaseError, match="no section"):
        release_notes.release_notes("1.0", CHANGELOG)


def test_a_version_file_without_a_version_is_an_error(tmp_path):
    path = tmp_path / "_version.py"
    path.write_text("VERSION = '1'\n")
    with pytest.raises(release_notes.ReleaseError, match="defines no __version__"):
        release_notes.package_version(path)
