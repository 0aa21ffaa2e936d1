"""Memory after aborted TLS handshakes: do 25,000 leave navtwist where 1,000 do?

C{python -m bench.tls_abort [--first N] [--total N] [--at-once N]} (C{make bench-tls-abort}).
Each connection sends C{CONNECT inference.local:443}, reads the 200 and hangs
up without a ClientHello (navtwist has already made the TLS layer and the
site's channel for it).  navtwist's RSS is read once it is warm, after the
first C{first} connections and after C{total}, each time after a pause (the
connections' teardown done), and its peak (VmHWM).  Loopback only, bounded.
Writes bench/out/tls_abort.json and the "tls-abort" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from bench import clients
from bench.proxies import Proxy, start_navtwist, start_upstream
from bench.runner import OUT, publish_scenario
from bench.upstream import make_certificate

MiB = 1 << 20
SETTLE_S = 3.0
CONNECT = f"CONNECT {clients.INFERENCE_AUTHORITY} HTTP/1.1\r\nHost: {clients.INFERENCE_AUTHORITY}\r\n\r\n".encode()


async def _abort_one(port: int) -> str:
    """One connection: CONNECT, the 200, then hang up before any ClientHello; the status line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(CONNECT)
        head = await reader.readuntil(b"\r\n\r\n")
        return head.split(b"\r\n", 1)[0].decode("latin-1")
    finally:
        writer.close()


async def abort_many(port: int, n: int, at_once: int) -> dict[str, Any]:
    gate = asyncio.Semaphore(at_once)
    errors: dict[str, int] = {}
    statuses: dict[str, int] = {}

    async def one() -> None:
        async with gate:
            try:
                status = await asyncio.wait_for(_abort_one(port), 30)
                statuses[status] = statuses.get(status, 0) + 1
            except Exception as e:  # counted: a refused connection is a finding, not a harness failure
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(n)))
    ok = statuses.get("HTTP/1.1 200 Connection Established", 0)
    return {"n": n, "ok": ok, "statuses": statuses, "errors": errors, "seconds": time.monotonic() - started}


async def settled_rss(proxy: Proxy) -> int:
    await asyncio.sleep(SETTLE_S)
    return proxy.stats.rss()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = OUT / "work-tls-abort"
    work.mkdir(parents=True, exist_ok=True)
    cert, key = make_certificate(work)
    upstream, ports = start_upstream(work, cert, key)
    proxy: Proxy | None = None
    try:
        proxy = start_navtwist(work, ports)
        path = clients.Path("navtwist", str(proxy.ca_file), str(cert), ("127.0.0.1", ports["tls"]),
                            ("127.0.0.1", proxy.port))
        for _ in range(3):  # warm: leaf certificate, lazy imports, gc.freeze() done
            await clients.one_stream(path, 2, 0, 16)
        await abort_many(proxy.port, 100, args.at_once)
        warm = await settled_rss(proxy)
        first = await abort_many(proxy.port, args.first, args.at_once)
        after_first = await settled_rss(proxy)
        rest = await abort_many(proxy.port, args.total - args.first, args.at_once)
        after_total = await settled_rss(proxy)
        await clients.one_stream(path, 2, 0, 16)  # still serving
        proxy.check_alive()
        return {"warm_rss": warm, "after_first_rss": after_first, "after_total_rss": after_total,
                "hwm": proxy.stats.hwm(), "first": first, "rest": rest, "fds_after": proxy.stats.fds(),
                "settle_s": SETTLE_S}
    finally:
        if proxy is not None:
            proxy.stop()
        upstream.stop()


def section(result: dict[str, Any], label: str) -> str:
    m = result["machine"]
    first, rest = result["first"], result["rest"]
    total = first["n"] + rest["n"]
    grow_first = (result["after_first_rss"] - result["warm_rss"]) / MiB
    grow_total = (result["after_total_rss"] - result["warm_rss"]) / MiB
    errors = {k: first["errors"].get(k, 0) + rest["errors"].get(k, 0) for k in {**first["errors"], **rest["errors"]}}
    return "\n".join([
        "## Aborted TLS handshakes (`make bench-tls-abort`)",
        "",
        f"{m['date']}, navtwist commit `{m['commit']}` ({label}). Each connection: `CONNECT inference.local:443`, "
        f"the 200, then hang up without a ClientHello; {result['at_once']} at a time; RSS read "
        f"{result['settle_s']:g} s after each batch.",
        "",
        "| | navtwist RSS (MiB) | growth over warm (MiB) |",
        "|---|---:|---:|",
        f"| warm (3 streams, 100 aborted handshakes) | {result['warm_rss'] / MiB:.1f} | — |",
        f"| after {first['n']:,} aborted handshakes | {result['after_first_rss'] / MiB:.1f} | {grow_first:+.1f} |",
        f"| after {total:,} aborted handshakes | {result['after_total_rss'] / MiB:.1f} | {grow_total:+.1f} |",
        f"| peak during the run (VmHWM) | {result['hwm'] / MiB:.1f} | |",
        "",
        f"{first['ok'] + rest['ok']:,} of {total:,} got their 200 (errors: "
        f"{', '.join(f'{k} {v}' for k, v in errors.items()) or 'none'}); {total / (first['seconds'] + rest['seconds']):.0f} "
        f"connections/s; open descriptors after: {result['fds_after']}.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--first", type=int, default=1000)
    parser.add_argument("--total", type=int, default=25000)
    parser.add_argument("--at-once", type=int, default=200)
    parser.add_argument("--label", default="as committed", help="what this run measures, for the report")
    parser.add_argument("--no-report", action="store_true", help="write the JSON only")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    result = asyncio.run(run(args))
    result["at_once"] = args.at_once
    publish_scenario("tls-abort", result, {"first": args.first, "total": args.total, "at_once": args.at_once},
                     lambda result: section(result, args.label), not args.no_report)


if __name__ == "__main__":
    main()
