"""How messages and hints spell what to change: Python syntax for the API (``device='cpu'``,
``staging_slots=16``), command-line syntax for ``blob2gpu`` (``--device cpu``,
``--set staging_slots=16``). This is the one place that decides: the command line switches the
process to its voice once (cli/entry.py), and every message that names an argument or a setting
asks here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_command_line = False


def use_command_line() -> None:
    """Spell advice as the command line takes it, for the rest of this process."""
    global _command_line
    _command_line = True


def device(name: str) -> str:
    """How to ask for device `name`: device='cpu' or --device cpu."""
    return f"--device {name}" if _command_line else f"device='{name}'"


def setting(name: str, value: Any) -> str:
    """How to give setting `name` the value `value`: name=value or --set name=value."""
    if _command_line:
        text = str(value).lower() if isinstance(value, bool) else str(value)
        return f"--set {name}={text}"
    return f"{name}={value!r}"


def count(n: int, noun: str) -> str:
    """'1 tensor', '2 tensors': `n` and `noun`, plural (an s) unless n is 1."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def first_of(names: Sequence[str], shown: int = 3, noun: str = "") -> str:
    """The first `shown` of `names`, joined, and how many more ('a, b, c and 2 more [noun]')."""
    more = f" and {len(names) - shown} more" + (f" {noun}" if noun else "")
    return ", ".join(names[:shown]) + (more if len(names) > shown else "")
