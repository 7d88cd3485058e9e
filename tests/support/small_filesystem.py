"""A real, small filesystem for full-disk tests: a tmpfs mounted in a private mount namespace.

`run_on_small_filesystem` runs a command in a new mount namespace (namespaces.py) in which
`mount_point` is a fresh tmpfs of the given size and inode count. Writes past them fail with the
kernel's own ENOSPC, as on a full NVMe drive. The mount vanishes with the namespace: no clean-up,
nothing left mounted if a test dies.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from .namespaces import unshare


def run_on_small_filesystem(
    mount_point: Path,
    argv: Sequence[str],
    size: str = "64k",
    inodes: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run argv with a tmpfs of `size` bytes (and at most `inodes` inodes) at mount_point."""
    mount_point.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    script = (
        f"mount -t tmpfs -o {options} blob2gpu-test {shlex.quote(str(mount_point))} && "
        f"exec {shlex.join(argv)}"
    )
    return subprocess.run(
        [*unshare("--mount"), "sh", "-c", script],
        env=dict(env if env is not None else os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
