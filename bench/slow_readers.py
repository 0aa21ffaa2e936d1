"""Hundreds of steadily reading slow clients on streams through navtwist: memory and drops.

C{python -m bench.slow_readers [--clients N] [--seconds S] [--write-stall S]} (C{make bench-slow-readers}).
Each client opens its own connection (CONNECT inference.local, TLS), asks
for an endless SSE stream the upstream writes as fast as it drains, and reads
it at its own steady rate, drawn between 7 and 9 KB/s.  Once every stream
has started, for C{seconds} (bounded: at most 60), the run samples navtwist's
RSS and the kernel's TCP memory (C{/proc/net/sockstat} "TCP ... mem", pages,
for the whole machine: client, proxy and upstream sockets alike, all on
loopback), then counts streams that ended early and C{client_stalled} in
navtwist's log.  navtwist runs with C{timeouts.write_stall} short (10 s by
default), so a reader wrongly judged stalled is dropped within the window.
Writes bench/out/slow_readers.json and the "slow-readers" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import ssl
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import clients
from bench.measure import percentile
from bench.proxies import Proxy, start_navtwist, start_upstream
from bench.runner import OUT, publish_scenario
from bench.upstream import make_certificate

PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20
EVENT_BYTES = 4096  # padding per SSE event
OPENING_AT_ONCE = 50  # handshakes in flight while the clients connect
CLIENT_RCVBUF = 8192  # a slow client's receive buffer (the kernel doubles it)
STEP = 4096  # bytes a slow client takes from its socket at a time
UPSTREAM_SNDBUF = 65536  # the upstream's send buffers (its memory would be on another host)
MAX_SECONDS = 60


def proxy_socket_memory(pid: int) -> int:
    """Bytes the kernel holds in C{pid}'s TCP sockets now (C{ss} skmem: receive plus send queues)."""
    out = subprocess.run(["ss", "-tmpnH"], capture_output=True, text=True, timeout=30).stdout
    total, mine = 0, False
    for line in out.splitlines():
        if not line.startswith(("\t", " ")):
            mine = f"pid={pid}," in line
        elif mine and (found := re.search(r"skmem:\(r(\d+),rb\d+,t(\d+),tb\d+,f\d+,w(\d+)", line)):
            total += int(found.group(1)) + int(found.group(3))
    return total


def tcp_mem_pages() -> int:
    """The kernel's TCP buffer memory now, in pages (all sockets of the machine)."""
    text = Path("/proc/net/sockstat").read_text()
    return int(re.search(r"^TCP:.* mem (\d+)", text, re.M).group(1))


class SlowReader:
    """One stream read from the socket itself at a steady C{rate} (bytes of plaintext per second).

    asyncio's TLS transport keeps reading the socket while the application is
    paused (up to 256 KiB ahead), which would make a rate-capped reader read in
    bursts.  This one runs TLS over memory BIOs and takes at most L{STEP}
    bytes from the socket at a time, then waits until its rate allows more.
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.read = 0  # plaintext bytes
        self.status = b""
        self.ended: str | None = None  # why the stream ended before we hung up
        self.max_gap = 0.0  # longest time between two reads that returned data (the harness's own steadiness)

    async def open(self, path: clients.Path, gate: asyncio.Semaphore) -> None:
        """Connect (CONNECT inference.local, TLS) and send the request for an endless stream."""
        loop = asyncio.get_running_loop()
        async with gate:
            self._sock = sock = await clients._connect_via(path.proxy, clients.INFERENCE_AUTHORITY, CLIENT_RCVBUF)
            self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self._tls = clients._context(path.ca_file).wrap_bio(self._in, self._out,
                                                               server_hostname=clients.SERVER_NAME)
            while True:
                try:
                    self._tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await self._flush()
                    data = await loop.sock_recv(sock, 65536)
                    if not data:
                        raise ConnectionError("closed during the TLS handshake")
                    self._in.write(data)
            body = json.dumps(clients.chat(True, events=10**9, size=EVENT_BYTES)).encode()
            self._tls.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s"
                            % (clients.CHAT_PATH.encode(), clients.SERVER_NAME.encode(), len(body), body))
            await self._flush()

    async def _flush(self) -> None:
        if self._out.pending:
            await asyncio.get_running_loop().sock_sendall(self._sock, self._out.read())

    async def read_steadily(self) -> None:
        """Read until cancelled (or until the proxy ends the stream: C{ended} says how)."""
        loop = asyncio.get_running_loop()
        began = last = time.monotonic()
        try:
            while True:
                data = await loop.sock_recv(self._sock, STEP)
                now = time.monotonic()
                self.max_gap, last = max(self.max_gap, now - last), now
                if not data:
                    self.ended = "closed"
                    return
                self._in.write(data)
                while True:
                    try:
                        plain = self._tls.read(65536)
                    except ssl.SSLWantReadError:
                        break
                    if not plain:
                        self.ended = "closed"
                        return
                    if not self.status:
                        self.status = plain[:12]
                    self.read += len(plain)
                await self._flush()
                ahead = self.read / self.rate - (time.monotonic() - began)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        except (OSError, ssl.SSLError) as e:
            self.ended = type(e).__name__
        finally:
            self._sock.close()


async def measure(path: clients.Path, proxy: Proxy, n: int, seconds: float) -> dict[str, Any]:
    rng = random.Random(7)
    readers = [SlowReader(rng.uniform(7000, 9000)) for _ in range(n)]
    gate = asyncio.Semaphore(OPENING_AT_ONCE)
    tcp_before, rss_before = tcp_mem_pages(), proxy.stats.rss()
    ramp_start = time.monotonic()
    tasks: list[asyncio.Task] = []

    async def open_and_read(reader: SlowReader) -> None:
        await reader.open(path, gate)
        tasks.append(asyncio.create_task(reader.read_steadily()))  # each reads from the moment it is open

    opened = await asyncio.gather(*(open_and_read(reader) for reader in readers), return_exceptions=True)
    ramp = time.monotonic() - ramp_start
    connect_errors = [type(o).__name__ for o in opened if isinstance(o, BaseException)]
    live = [reader for reader, o in zip(readers, opened) if not isinstance(o, BaseException)]
    read_at_start = [reader.read for reader in live]
    ended_before = sum(1 for reader in live if reader.ended)
    samples: list[tuple[float, int, int, int]] = []
    window_start = time.monotonic()
    while (now := time.monotonic()) - window_start < seconds:
        samples.append((now - window_start, proxy.stats.rss(), tcp_mem_pages(), proxy_socket_memory(proxy.pid)))
        await asyncio.sleep(1.0)
    elapsed = time.monotonic() - window_start
    read = [reader.read - before for reader, before in zip(live, read_at_start)]
    ended = [reader.ended for reader in live if reader.ended]
    bad_status = sum(1 for reader in live if reader.status and not reader.status.startswith(b"HTTP/1.1 200"))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(1)
    log = proxy.log_path.read_text(errors="replace")
    return {
        "clients": n, "connected": len(live), "connect_errors": connect_errors, "ramp_s": ramp,
        "window_s": elapsed, "rates": [reader.rate for reader in live], "read": read,
        "ended_early": len(ended), "ended_during_ramp": ended_before,
        "max_gap_s": [reader.max_gap for reader in live],
        "max_gap_dropped_s": [reader.max_gap for reader in live if reader.ended], "ended_how": ended[:20],
        "bad_status": bad_status, "client_stalled_logged": log.count("client_stalled"),
        "tcp_mem_pages_before": tcp_before, "rss_before": rss_before, "samples": samples,
        "hwm": proxy.stats.hwm(),
    }


def section(result: dict[str, Any]) -> str:
    m = result["machine"]
    samples = result["samples"]
    rss = [s[1] for s in samples]
    tcp = [s[2] for s in samples]
    own = [s[3] for s in samples]
    per_client = [r / result["window_s"] / 1000 for r in result["read"]]
    n = result["connected"]
    dropped = max(result["ended_early"], result["client_stalled_logged"])
    lines = [
        "## Slow readers (`make bench-slow-readers`)",
        "",
        f"{m['date']}, navtwist commit `{m['commit']}`, {m['cores']} cores. {result['clients']} clients, each on its "
        f"own connection (CONNECT inference.local, TLS), each reading an endless SSE stream ({EVENT_BYTES}-byte "
        f"events, written by the upstream as fast as it drains) at a steady 7–9 KB/s from the moment it connects; measured for "
        f"{result['window_s']:.0f} s once all had started (connecting took {result['ramp_s']:.1f} s). navtwist: "
        f"`timeouts.write_stall: {result['write_stall']:g}`, `limits.socket_buffer_bytes: "
        f"{result['socket_buffer'] or 'default (262144)'}`; the upstream's send buffers capped at "
        f"{UPSTREAM_SNDBUF // 1024} KiB (on a real deployment that memory is on the upstream's host).",
        "",
        "| | value |",
        "|---|---|",
        f"| streams started / dropped (ended early or `client_stalled` logged) | {n} / {dropped} |",
        f"| per-client read rate p1 / p50 / p99 (KB/s) | {percentile(per_client, 1):.1f} / "
        f"{percentile(per_client, 50):.1f} / {percentile(per_client, 99):.1f} |",
        f"| longest gap between two reads of one client, p50 / max; of the dropped ones, max (s) | "
        f"{percentile(result['max_gap_s'], 50):.2f} / {max(result['max_gap_s']):.2f}; "
        f"{max(result['max_gap_dropped_s'], default=0):.2f} |",
        f"| navtwist RSS before / peak / end (MiB) | {result['rss_before'] / MiB:.0f} / {max(rss) / MiB:.0f} / "
        f"{rss[-1] / MiB:.0f} |",
        f"| navtwist RSS per stream, peak minus before (KiB) | {(max(rss) - result['rss_before']) / n / 1024:.0f} |",
        f"| kernel TCP memory (sockstat), before / peak / end (MiB, whole machine) | "
        f"{result['tcp_mem_pages_before'] * PAGE / MiB:.1f} / {max(tcp) * PAGE / MiB:.1f} / {tcp[-1] * PAGE / MiB:.1f} |",
        f"| kernel TCP memory per stream, peak (KiB; four sockets each: client, proxy ×2, upstream) | "
        f"{(max(tcp) - result['tcp_mem_pages_before']) * PAGE / n / 1024:.0f} |",
        f"| of which in navtwist's own sockets (`ss` skmem queues), peak / median (MiB) | {max(own) / MiB:.1f} / "
        f"{statistics.median(own) / MiB:.1f} |",
        "",
        f"Connect errors: {', '.join(result['connect_errors']) or 'none'}; streams answered other than 200: "
        f"{result['bad_status']}; median TCP memory over the window "
        f"{statistics.median(tcp) * PAGE / MiB:.1f} MiB.",
    ]
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = OUT / "work-slow-readers"
    work.mkdir(parents=True, exist_ok=True)
    cert, key = make_certificate(work)
    upstream, ports = start_upstream(work, cert, key, UPSTREAM_SNDBUF)
    proxy: Proxy | None = None
    try:
        extra: dict[str, Any] = {"timeouts": {"write_stall": args.write_stall}}
        if args.socket_buffer is not None:
            extra["limits"] = {"max_connections": 10000, "socket_buffer_bytes": args.socket_buffer}
        proxy = start_navtwist(work, ports, extra=extra)
        path = clients.Path("navtwist", str(proxy.ca_file), str(cert), ("127.0.0.1", ports["tls"]),
                            ("127.0.0.1", proxy.port))
        await clients.one_stream(path, 2, 0, 16)  # warm-up: leaf certificate, first upstream connection
        result = await measure(path, proxy, args.clients, min(args.seconds, MAX_SECONDS))
        proxy.check_alive()
    finally:
        if proxy is not None:
            proxy.stop()
        upstream.stop()
    result["write_stall"] = args.write_stall
    result["socket_buffer"] = args.socket_buffer
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=40.0, help=f"measured window, at most {MAX_SECONDS}")
    parser.add_argument("--write-stall", type=float, default=10.0, help="navtwist's timeouts.write_stall")
    parser.add_argument("--socket-buffer", type=int, help="navtwist's limits.socket_buffer_bytes (default: its own)")
    parser.add_argument("--no-report", action="store_true", help="write the JSON only")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    result = asyncio.run(run(args))
    publish_scenario("slow-readers", result,
                     {"clients": args.clients, "seconds": args.seconds, "write_stall": args.write_stall},
                     section, not args.no_report)


if __name__ == "__main__":
    main()
