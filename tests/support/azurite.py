"""The tests' Azurite: blob2gpu.tools.emulator's, found in the repo's .azurite/ (scripts/test.sh
installs it there)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blob2gpu.tools import emulator
from blob2gpu.tools.emulator import ACCOUNT, ACCOUNT_KEY

__all__ = ["ACCOUNT", "ACCOUNT_KEY", "Azurite"]

REPO = Path(__file__).resolve().parents[2]


class Azurite(emulator.Azurite):
    def __init__(self, **options: Any) -> None:
        """options: emulator.Azurite's (tls, oauth, port)."""
        launcher = emulator.find_azurite((REPO,))
        if launcher is None:
            raise RuntimeError(
                "azurite-blob not found: run ./scripts/test.sh (it installs the npm "
                "package into .azurite/) or set AZURITE_BLOB"
            )
        super().__init__(launcher, **options)
