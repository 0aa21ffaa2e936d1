"""An intercepted download vs the same through a plain tunnel vs mitmproxy intercepting it, in one run.

C{python -m bench.intercept [--mib N] [--repeats N] [--requests N] [--profile]} (C{make bench-intercept}).
The bench upstream's second TLS port is the origin: navtwist intercepts it
(C{policy.intercept: [{host: 127.0.0.1, port: P, access: read-only, upstream_ca: <its cert>}]}),
mitmproxy intercepts it (trusting that cert upstream); navtwist's tunnel goes
to the first TLS port (C{policy.allow}).  Every path is two TLS legs except
direct and the tunnel (one, end to end).  The paths take turns, download by
download, because this VM's speed drifts.  Also: the latency of a small
intercepted GET on a keep-alive connection, median of N, against direct.
Writes bench/out/intercept.json and the "intercept" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from bench import clients
from bench.measure import percentile
from bench.proxies import Proxy, start_mitmproxy, start_navtwist, start_upstream
from bench.runner import OUT, publish_scenario
from bench.upstream import make_certificate

MiB = 1 << 20
SMALL = 100  # bytes of the small GET's body


async def _download(open_: Callable[[], Awaitable[clients.HttpClient]], nbytes: int) -> float:
    """One GET /bytes/N on a new connection; bytes/s from the request to the last byte."""
    client = await open_()
    try:
        response = await client.request("GET", f"/bytes/{nbytes}", keep_body=False, parse_events=False)
    finally:
        client.close()
    if response.status != 200 or response.body_bytes != nbytes:
        raise RuntimeError(f"got {response.status} with {response.body_bytes} of {nbytes} bytes")
    return nbytes / (response.done_at - response.sent_at)


async def measure(cert: Path, ports: dict[str, int], navtwist: Proxy, mitm: Proxy, nbytes: int, repeats: int,
                  requests: int) -> dict[str, Any]:
    origin = ("127.0.0.1", ports["origin"])
    nav = ("127.0.0.1", navtwist.port)
    tunnel_path = clients.Path("navtwist", str(navtwist.ca_file), str(cert), ("127.0.0.1", ports["tls"]), nav)
    opens: dict[str, Callable[[], Awaitable[clients.HttpClient]]] = {
        "direct": lambda: clients.open_origin(origin, str(cert)),
        "navtwist_tunnel": lambda: clients.open_client(tunnel_path, tunnel=True),
        "navtwist_intercept": lambda: clients.open_origin(origin, str(navtwist.ca_file), nav),
        "mitmproxy_intercept": lambda: clients.open_origin(origin, str(mitm.ca_file), ("127.0.0.1", mitm.port)),
    }
    owner = {"navtwist_tunnel": navtwist, "navtwist_intercept": navtwist, "mitmproxy_intercept": mitm}
    for name, open_ in opens.items():  # warm-up: leaf certificates, lazy imports, first origin connection
        await _download(open_, MiB)
    rates: dict[str, list[float]] = {name: [] for name in opens}
    cpu: dict[str, float] = {name: 0.0 for name in owner}
    for _ in range(repeats):
        for name, open_ in opens.items():
            before = owner[name].stats.cpu_seconds() if name in owner else 0.0
            rates[name].append(await _download(open_, nbytes))
            if name in owner:
                cpu[name] += owner[name].stats.cpu_seconds() - before
    # Small GETs: one keep-alive connection per path, the paths taking turns request by request.
    latency: dict[str, list[float]] = {}
    opened = {name: await opens[name]() for name in ("direct", "navtwist_intercept", "mitmproxy_intercept")}
    try:
        for name, client in opened.items():
            await client.request("GET", f"/bytes/{SMALL}")
            latency[name] = []
        for _ in range(requests):
            for name, client in opened.items():
                response = await client.request("GET", f"/bytes/{SMALL}")
                assert response.status == 200 and response.body_bytes == SMALL, (name, response.status)
                latency[name].append(response.done_at - response.sent_at)
    finally:
        for client in opened.values():
            client.close()
    return {"bytes": nbytes, "repeats": repeats, "requests": requests, "bytes_per_s": rates,
            "proxy_cpu_s": {name: cpu[name] / repeats for name in cpu}, "latency_s": latency}


def section(result: dict[str, Any]) -> str:
    m = result["machine"]
    rates = {name: statistics.median(values) / MiB for name, values in result["bytes_per_s"].items()}
    spread = {name: f"{min(v) / MiB:.0f}–{max(v) / MiB:.0f}" for name, v in result["bytes_per_s"].items()}
    tunnel, nav, mitm = rates["navtwist_tunnel"], rates["navtwist_intercept"], rates["mitmproxy_intercept"]
    lat = {name: percentile(values, 50) * 1000 for name, values in result["latency_s"].items()}
    p99 = {name: percentile(values, 99) * 1000 for name, values in result["latency_s"].items()}
    cpu = result["proxy_cpu_s"]
    mib = result["bytes"] // MiB
    lines = [
        "## Intercepted download (`make bench-intercept`)",
        "",
        f"{m['date']}, navtwist commit `{m['commit']}`, {m['cores']} cores, Python speed check "
        f"{m['python_speed_us']:.1f} µs. A {mib} MiB download from a local HTTPS origin (the bench upstream's "
        f"second TLS port), × {result['repeats']} per path, the paths taking turns, median; each on a new "
        "connection. Intercepting paths are two TLS legs (client → proxy with the proxy's leaf, proxy → origin "
        "verified against the origin's own CA); the tunnel and direct are one, end to end.",
        "",
        "| path | throughput, median (MiB/s) | lowest–highest | % of navtwist's tunnel | proxy CPU per download (s) |",
        "|---|---:|---:|---:|---:|",
        f"| direct | {rates['direct']:.0f} | {spread['direct']} | — | — |",
        f"| navtwist, tunnel (`policy.allow`) | {tunnel:.0f} | {spread['navtwist_tunnel']} | 100 % | "
        f"{cpu['navtwist_tunnel']:.2f} |",
        f"| navtwist, intercepted (`policy.intercept`, read-only) | {nav:.0f} | {spread['navtwist_intercept']} | "
        f"{nav / tunnel * 100:.0f} % | {cpu['navtwist_intercept']:.2f} |",
        f"| mitmproxy 11, intercepted | {mitm:.0f} | {spread['mitmproxy_intercept']} | {mitm / tunnel * 100:.0f} % | "
        f"{cpu['mitmproxy_intercept']:.2f} |",
        "",
        f"Targets: intercepted faster than mitmproxy — **{'pass' if nav > mitm else 'FAIL'}** "
        f"({nav / mitm:.2f}×); ≥ 50 % of the plain tunnel — **{'pass' if nav >= tunnel / 2 else 'FAIL'}** "
        f"({nav / tunnel * 100:.0f} %).",
        "",
        f"Small intercepted GET ({SMALL}-byte body, keep-alive TLS, {result['requests']} sequential, interleaved):",
        "",
        "| path | latency p50 (ms) | p99 (ms) | added p50 over direct (ms) |",
        "|---|---:|---:|---:|",
    ]
    for name, label in (("direct", "direct"), ("navtwist_intercept", "navtwist, intercepted"),
                        ("mitmproxy_intercept", "mitmproxy 11, intercepted")):
        lines.append(f"| {label} | {lat[name]:.2f} | {p99[name]:.2f} | {lat[name] - lat['direct']:.2f} |")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = OUT / "work-intercept"
    work.mkdir(parents=True, exist_ok=True)
    cert, key = make_certificate(work)
    upstream, ports = start_upstream(work, cert, key)
    proxies: list[Proxy] = []
    profiler: subprocess.Popen | None = None
    try:
        navtwist = start_navtwist(work, ports, cert)
        proxies.append(navtwist)
        mitm = start_mitmproxy(work, ports, cert)
        proxies.append(mitm)
        if args.profile:
            py_spy = Path(sys.executable).with_name("py-spy")
            profiler = subprocess.Popen(
                [str(py_spy), "record", "--pid", str(navtwist.pid), "--duration", str(args.profile), "--rate", "250",
                 "--format", "raw", "-o", str(OUT / "profile-intercept.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.monotonic()
        result = await measure(cert, ports, navtwist, mitm, args.mib * MiB, args.repeats, args.requests)
        result["elapsed_s"] = time.monotonic() - started
        for proxy in proxies:
            proxy.check_alive()
    finally:
        if profiler is not None:
            profiler.wait(args.profile + 30)
        for proxy in proxies:
            proxy.stop()
        upstream.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="download size in MiB (256)")
    parser.add_argument("--repeats", type=int, default=5, help="downloads per path (5)")
    parser.add_argument("--requests", type=int, default=500, help="small GETs per path (500)")
    parser.add_argument("--profile", type=int, default=0, metavar="S",
                        help="record navtwist with py-spy for S seconds (bench/out/profile-intercept.txt)")
    parser.add_argument("--no-report", action="store_true", help="write the JSON only")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    result = asyncio.run(run(args))
    publish_scenario("intercept", result, {"mib": args.mib, "repeats": args.repeats, "requests": args.requests},
                     section, not args.no_report)


if __name__ == "__main__":
    main()
