"""What a NodeThrottle's record says, as the tests read it."""

from __future__ import annotations

import time

from blob2gpu.sources.azure.throttle import NodeThrottle


def wait_left(node: NodeThrottle) -> float:
    """Seconds until the node's loads may send again."""
    return max(0.0, node.state().until - time.time())
