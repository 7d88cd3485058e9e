"""Private Linux namespaces for tests that need a real resource to themselves: a fresh mount
namespace (small_filesystem.py) or a fresh network namespace, whose loopback has every port free
(a test of a protocol that names a fixed port, as the emulator shortcut names 10000). As root:
`unshare`; otherwise a user namespace maps the caller to root, which unprivileged user namespaces
allow. The namespace vanishes with the command: nothing to clean up if a test dies."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence


def unshare(*namespaces: str) -> list[str]:
    """The command prefix that runs a command in new namespaces ('--mount', '--net', ...)."""
    if os.geteuid() == 0:
        return ["unshare", *namespaces]
    return ["unshare", "--user", "--map-root-user", *namespaces]


# Brings the new namespace's loopback up (it starts down), then becomes the command.
_LOOPBACK_UP_THEN_EXEC = """
import fcntl, os, socket, struct, sys
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    request = struct.pack("16sH14x", b"lo", 0)
    flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, request))[1]
    fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
os.execvp(sys.argv[1], sys.argv[1:])
"""


def run_in_private_network(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run argv in a new network namespace with only a loopback interface, up."""
    return subprocess.run(
        [*unshare("--net"), sys.executable, "-c", _LOOPBACK_UP_THEN_EXEC, *argv],
        env=dict(env if env is not None else os.environ),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
