"""Process statistics from /proc and the summary statistics the report uses."""
from __future__ import annotations

import asyncio
import math
import os
from typing import Sequence

_TICKS = os.sysconf("SC_CLK_TCK")


class ProcStats:
    """Reads CPU time, memory and open descriptors of one process from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_seconds(self) -> float:
        """User plus system CPU time so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            # The command name (field 2) may contain spaces: split after it.
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime

    def _status_kb(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def rss(self) -> int:
        """Resident set size now, in bytes."""
        return self._status_kb("VmRSS") * 1024

    def hwm(self) -> int:
        """Peak resident set size since the process started (VmHWM), in bytes."""
        return self._status_kb("VmHWM") * 1024

    def fds(self) -> int:
        """Number of open file descriptors."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))


class RssSampler:
    """Samples a process's RSS in the background while a scenario runs."""

    def __init__(self, stats: ProcStats, interval: float = 0.05) -> None:
        self._stats = stats
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self.before = 0
        self.peak = 0
        self.after = 0

    async def __aenter__(self) -> RssSampler:
        self.before = self.peak = self._stats.rss()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.after = self._stats.rss()
        self.peak = max(self.peak, self.after)

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self._stats.rss())
            await asyncio.sleep(self._interval)

    @property
    def growth(self) -> int:
        """Peak RSS during the scenario minus RSS before it, in bytes."""
        return self.peak - self.before


def percentile(values: Sequence[float], p: float) -> float:
    """The C{p}-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Sequence[float]) -> dict[str, float]:
    """Count, median, p99 and max of C{values}."""
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else math.nan,
    }
