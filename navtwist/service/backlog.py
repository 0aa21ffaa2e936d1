"""A listen backlog that suits bursts of sandbox connections.

Twisted's server endpoints listen with a backlog of 50: 500 sandboxes
connecting at once leave hundreds waiting about a second for a SYN retry.
Unless the configured endpoint string names a backlog, the proxy listens
with L{DEFAULT_BACKLOG}, capped by the kernel's C{net.core.somaxconn}.
"""
from __future__ import annotations

import re
from pathlib import Path

DEFAULT_BACKLOG = 1024
SOMAXCONN = Path("/proc/sys/net/core/somaxconn")
# Endpoint types whose server parser takes a backlog argument.
_WITH_BACKLOG = frozenset({"tcp", "tcp6", "ssl", "unix"})


def kernel_backlog_cap(path: Path = SOMAXCONN) -> int | None:
    """The kernel's cap on listen backlogs, when it can be read."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def with_backlog(endpoint: str, cap: int | None = None) -> str:
    """C{endpoint} with C{backlog=} added when its type takes one and it names none.

    C{cap} defaults to the kernel's C{somaxconn}; other endpoint types (e.g.
    C{systemd:} sockets, whose backlog was set by their creator) are unchanged.
    """
    parts = re.split(r"(?<!\\):", endpoint)
    if len(parts) < 2 or parts[0].lower() not in _WITH_BACKLOG:
        return endpoint
    if any(part.startswith("backlog=") for part in parts[1:]):
        return endpoint
    if cap is None:
        cap = kernel_backlog_cap()
    backlog = DEFAULT_BACKLOG if cap is None else max(1, min(DEFAULT_BACKLOG, cap))
    return f"{endpoint}:backlog={backlog}"
