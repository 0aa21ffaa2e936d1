"""C{make soak}: navtwist under steady load, watched for leaks.

For C{SOAK_SECONDS} (default 600): 100 concurrent streams (each one after
another on a new connection, 20 events × 100 ms) plus one client downloading
16 MiB at a time through a CONNECT tunnel.  navtwist's RSS and open file
descriptors are sampled every 10 s; descriptors also before the load and
after it has stopped.  Writes bench/out/soak.json and the soak section of
docs/benchmarks.md.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import math
import os
import resource
import subprocess
import time
from collections import Counter
from typing import Any, Awaitable, Callable

from bench import clients, report
from bench.proxies import start_navtwist
from bench.runner import OUT, Bench, machine

STREAMS = 100
EVENTS, INTERVAL, PAD = 20, 0.1, 100
TUNNEL_BYTES = 16 << 20
SAMPLE_S = 10.0
SETTLE_S = 5.0  # after the load, before the "after" sample
MiB = 1 << 20


async def _loop(stop_at: float, work: Callable[[], Awaitable[Any]], counts: Counter[str], name: str) -> None:
    """Repeat C{work} until C{stop_at}, counting successes and errors (bounded: 60 s per try)."""
    while time.monotonic() < stop_at:
        try:
            await asyncio.wait_for(work(), 60)
            counts[name] += 1
        except Exception as e:
            counts[f"{name} error: {type(e).__name__}"] += 1
            await asyncio.sleep(0.5)


async def soak(seconds: float) -> dict[str, Any]:
    OUT.mkdir(exist_ok=True)
    work = OUT / "work"
    work.mkdir(exist_ok=True)
    bench = Bench(work)
    proxy = start_navtwist(work, bench.ports)
    try:
        path = bench.client_path("navtwist", proxy)
        await clients.one_stream(path, 2, 0, PAD)  # warm-up: leaf certificate, upstream connection
        await clients.download(path, 1 << 20)
        await asyncio.sleep(1)
        stats = proxy.stats
        before = {"rss": stats.rss(), "fds": stats.fds(), "cpu_s": stats.cpu_seconds()}
        counts: Counter[str] = Counter()
        samples: list[dict[str, float]] = []
        started = time.monotonic()
        stop_at = started + seconds
        workers = [asyncio.create_task(_loop(stop_at, lambda: clients.one_stream(path, EVENTS, INTERVAL, PAD),
                                             counts, "streams")) for _ in range(STREAMS)]
        workers.append(asyncio.create_task(_loop(stop_at, lambda: clients.download(path, TUNNEL_BYTES),
                                                 counts, "tunnel downloads")))
        while (now := time.monotonic()) < stop_at:
            await asyncio.sleep(min(SAMPLE_S, stop_at - now))
            samples.append({"t": time.monotonic() - started, "rss": stats.rss(), "fds": stats.fds(),
                            "streams": counts["streams"]})
            print(f"soak {samples[-1]['t']:5.0f} s  rss {samples[-1]['rss'] / MiB:6.1f} MiB  "
                  f"fds {samples[-1]['fds']:5}  streams {counts['streams']}", flush=True)
        await asyncio.gather(*workers)
        await asyncio.sleep(SETTLE_S)
        after = {"rss": stats.rss(), "fds": stats.fds(), "cpu_s": stats.cpu_seconds(),
                 "to_upstream": sockets_to(proxy.pid, bench.ports["plain"])}
        proxy.check_alive()
        return {"machine": machine({"soak_seconds": seconds, "streams": STREAMS, "events": EVENTS,
                                    "interval_s": INTERVAL, "tunnel_bytes": TUNNEL_BYTES, "sample_s": SAMPLE_S}),
                "before": before, "after": after, "samples": samples, "counts": dict(counts),
                "hwm": stats.hwm(), "duration_s": time.monotonic() - started}
    finally:
        proxy.stop()
        bench.close()


def sockets_to(pid: int, port: int) -> int | None:
    """How many of C{pid}'s TCP sockets are connected to 127.0.0.1:C{port} (idle keep-alive ones), per C{ss}."""
    try:
        out = subprocess.run(["ss", "-tnp"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(1 for line in out.splitlines() if f"pid={pid}," in line and line.split()[4] == f"127.0.0.1:{port}")


def section(result: dict[str, Any]) -> str:
    """The soak section of docs/benchmarks.md."""
    samples, before, after = result["samples"], result["before"], result["after"]
    rss = [s["rss"] / MiB for s in samples]
    fds = [s["fds"] for s in samples]
    half = samples[len(samples) // 2:]
    slope = ((half[-1]["rss"] - half[0]["rss"]) / MiB / ((half[-1]["t"] - half[0]["t"]) / 60)
             if len(half) > 1 and half[-1]["t"] > half[0]["t"] else float("nan"))
    counts = result["counts"]
    errors = {k: v for k, v in counts.items() if "error" in k}
    m = result["machine"]
    return f"""\
## Soak (`make soak`)

{m['date']}, navtwist commit `{m['commit']}`, {m['sizes']['soak_seconds']:.0f} s: {STREAMS} concurrent streams
({EVENTS} events × {INTERVAL * 1000:g} ms, each stream on a new connection) plus one client downloading
{TUNNEL_BYTES // MiB} MiB at a time through a CONNECT tunnel; navtwist sampled every {SAMPLE_S:g} s.

| | value |
|---|---|
| streams completed | {counts.get('streams', 0)} |
| tunnel downloads completed | {counts.get('tunnel downloads', 0)} ({counts.get('tunnel downloads', 0) * TUNNEL_BYTES // MiB} MiB) |
| errors | {', '.join(f'{k}: {v}' for k, v in errors.items()) or 'none'} |
| navtwist CPU | {after['cpu_s'] - before['cpu_s']:.0f} s |
| RSS before / max during / after (MiB) | {before['rss'] / MiB:.1f} / {max(rss):.1f} / {after['rss'] / MiB:.1f} |
| RSS slope over the second half (MiB/min) | {'n/a' if math.isnan(slope) else f'{slope:+.2f}'} |
| open fds before / max during / after ({SETTLE_S:g} s idle) | {before['fds']} / {max(fds)} / {after['fds']} |
| of those after: idle keep-alive connections to the upstream | {after.get('to_upstream', '?')} |

```
RSS {min(rss):6.1f}–{max(rss):6.1f} MiB  {report.sparkline(rss)}
fds {min(fds):6d}–{max(fds):6d}      {report.sparkline([float(f) for f in fds])}
```
"""


def main() -> None:
    seconds = float(os.environ.get("SOAK_SECONDS", "600"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result = asyncio.run(soak(seconds))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in ("soak.json", f"soak-{stamp}.json"):
        (OUT / name).write_text(json.dumps(result, indent=1))
    report.write_soak(section(result))
    print(f"soak done in {result['duration_s']:.0f} s; section written to {report.PAGE}")


if __name__ == "__main__":
    main()
