"""Runs every scenario on each path (direct, navtwist, mitmproxy) and writes the results.

C{python -m bench.runner [--quick] [--only NAME,...] [--size KEY=VALUE] [--profile NAME]} (from the
repository root, in the bench venv; C{make bench} does this).  Each scenario
gets a freshly started proxy, so CPU time and peak RSS belong to it alone.
Raw results go to C{bench/out/results.json}; the report to C{docs/benchmarks.md}
and C{docs/benchmarks.png}.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
import timeit
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Awaitable, Callable

from bench import clients, report
from bench.clients import Path as ClientPath
from bench.measure import RssSampler
from bench.proxies import BENCH_DIR, Proxy, mitmproxy_version, start_mitmproxy, start_navtwist, start_upstream
from bench.upstream import make_certificate

OUT = BENCH_DIR / "out"
PATHS = ("direct", "navtwist", "mitmproxy")
MiB = 1 << 20

# Sized so that the whole run stays well under 10 minutes on 2 cores.
SIZES: dict[str, Any] = {
    "latency_requests": 1000, "latency_warmup": 50,
    "stream_events": 200, "stream_interval_s": 0.010, "stream_repeats": 5, "event_pad_bytes": 100,
    "concurrency": [100, 500, 1000], "concurrent_events": 20, "concurrent_interval_s": 0.100,
    "stream_timeout_s": 60,
    "slow_total_bytes": 320 * MiB, "slow_event_bytes": 64 * 1024, "slow_rate_bytes_per_s": 1 * MiB, "slow_seconds": 10,
    "tunnel_bytes": 256 * MiB, "tunnel_repeats": 7,
}
# For trying the harness itself: every scenario, much smaller.
QUICK: dict[str, Any] = {
    **SIZES, "latency_requests": 100, "latency_warmup": 10, "stream_events": 50, "stream_repeats": 1,
    "concurrency": [20, 50], "slow_seconds": 3, "tunnel_bytes": 32 * MiB, "tunnel_repeats": 1,
}
SCENARIO_LIMIT_S = 180  # no scenario on one path may take longer than this


@dataclass(frozen=True)
class Scenario:
    """One measurement over a list of paths, returning a result per path name.

    An C{interleaved} scenario gets all paths at once (all proxies up) and lets
    them take turns, so that the machine's drift affects each path alike; the
    others (load tests) get one path at a time, with a freshly started proxy.
    Either way each proxy is warmed up (one stream, one tunnel) before measuring.
    """

    name: str
    run: Callable[[list[ClientPath]], Awaitable[dict[str, dict]]]
    interleaved: bool = False


def one_by_one(measure: Callable[[ClientPath], Awaitable[dict]]) -> Callable[[list[ClientPath]], Awaitable[dict]]:
    """A per-path measurement as a scenario over a list of (one) paths."""
    async def run(paths: list[ClientPath]) -> dict[str, dict]:
        return {path.name: await measure(path) for path in paths}
    return run


def scenarios(sizes: dict[str, Any], stats_address: tuple[str, int]) -> list[Scenario]:
    s = sizes
    found = [
        Scenario("latency", lambda ps: clients.request_latency(ps, s["latency_requests"], s["latency_warmup"]), True),
        Scenario("events", lambda ps: clients.event_timing(
            ps, s["stream_repeats"], s["stream_events"], s["stream_interval_s"], s["event_pad_bytes"]), True),
    ]
    for n in s["concurrency"]:
        found.append(Scenario(f"concurrency_{n}", one_by_one(lambda p, n=n: clients.concurrent_streams(
            p, n, s["concurrent_events"], s["concurrent_interval_s"], s["event_pad_bytes"], s["stream_timeout_s"]))))
    found += [
        Scenario("slow_reader", one_by_one(lambda p: clients.slow_reader(
            p, stats_address, s["slow_total_bytes"], s["slow_event_bytes"], s["slow_rate_bytes_per_s"],
            s["slow_seconds"]))),
        Scenario("tunnel", lambda ps: clients.tunnel_throughput(ps, s["tunnel_bytes"], s["tunnel_repeats"]), True),
    ]
    return found


class Bench:
    """The upstream, and freshly started proxies for each measurement."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.cert, key = make_certificate(work)
        self.upstream, self.ports = start_upstream(work, self.cert, key)

    def close(self) -> None:
        self.upstream.stop()

    def start_proxy(self, name: str) -> Proxy | None:
        if name == "navtwist":
            return start_navtwist(self.work, self.ports)
        if name == "mitmproxy":
            return start_mitmproxy(self.work, self.ports)
        return None

    def client_path(self, name: str, proxy: Proxy | None) -> ClientPath:
        tls = ("127.0.0.1", self.ports["tls"])
        if proxy is None:
            return ClientPath(name, str(self.cert), str(self.cert), tls)
        return ClientPath(name, str(proxy.ca_file), str(self.cert), tls, ("127.0.0.1", proxy.port))

    async def measure(self, scenario: Scenario, names: list[str], profile_s: int | None = None) -> dict[str, dict]:
        """Run C{scenario} on the paths C{names}, with fresh proxies; a result per path,
        each with its proxy's CPU time and memory (C{proc}) and the harness's CPU time.

        With C{profile_s}, py-spy records navtwist meanwhile (bench/out/profile-SCENARIO.txt).
        """
        proxies: dict[str, Proxy] = {}
        profiler: subprocess.Popen | None = None
        try:
            for name in names:
                if (proxy := self.start_proxy(name)) is not None:
                    proxies[name] = proxy
            if profile_s and "navtwist" in proxies:
                profiler = _start_profiler(proxies["navtwist"], OUT / f"profile-{scenario.name}.txt", profile_s)
            paths = [self.client_path(name, proxies.get(name)) for name in names]
            for path in paths:  # one-time costs (leaf certificate, lazy imports, first upstream connection)
                await clients.one_stream(path, 2, 0, 16)
                await clients.download(path, 1 << 20)
            cpu = {name: proxy.stats.cpu_seconds() for name, proxy in proxies.items()}
            harness = (self.upstream.stats.cpu_seconds(), _own_cpu())
            started = time.monotonic()
            async with contextlib.AsyncExitStack() as stack:
                rss = {name: await stack.enter_async_context(RssSampler(proxy.stats)) for name, proxy in proxies.items()}
                try:
                    results = await asyncio.wait_for(scenario.run(paths), SCENARIO_LIMIT_S)
                except Exception as e:  # recorded, so that one failing path does not lose the others
                    results = {name: {"error": f"{type(e).__name__}: {e}"} for name in names}
            shared = {
                "paths": names,
                "elapsed_s": time.monotonic() - started,
                "upstream_cpu_s": self.upstream.stats.cpu_seconds() - harness[0],
                "client_cpu_s": _own_cpu() - harness[1],
            }
            for name in names:
                results[name]["harness"] = shared
            for name, proxy in proxies.items():
                proxy.check_alive()
                results[name]["proc"] = {
                    "cpu_s": proxy.stats.cpu_seconds() - cpu[name],
                    "rss_before": rss[name].before, "rss_peak": rss[name].peak, "rss_growth": rss[name].growth,
                    "hwm": proxy.stats.hwm(), "fds_after": proxy.stats.fds(),
                }
        finally:
            if profiler is not None:
                profiler.wait(profile_s + 30)
            for proxy in proxies.values():
                proxy.stop()
        return results


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _start_profiler(proxy: Proxy, out: Path, seconds: int) -> subprocess.Popen:
    """py-spy sampling the proxy for C{seconds}, collapsed stacks to C{out} (see bench/profile.py)."""
    py_spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen([str(py_spy), "record", "--pid", str(proxy.pid), "--duration", str(seconds), "--rate", "250",
                             "--format", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def python_speed_us() -> float:
    """Best time of C{sum(range(1000))}, in µs: how fast this machine runs Python right now."""
    return min(timeit.repeat("sum(range(1000))", number=2000, repeat=5)) / 2000 * 1e6


def machine(sizes: dict[str, Any]) -> dict[str, Any]:
    """What the numbers were measured on."""
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=BENCH_DIR.parent).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(), "cpu": model, "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": metadata.version("twisted"), "treq": metadata.version("treq"),
        "pyopenssl": metadata.version("pyopenssl"), "mitmproxy": mitmproxy_version(),
        "python_speed_us": python_speed_us(),
        "commit": commit, "sizes": sizes,
    }


def publish_scenario(name: str, result: dict[str, Any], sizes: dict[str, Any],
                     section: Callable[[dict[str, Any]], str], to_report: bool) -> None:
    """The end of a one-scenario run (`make bench-NAME`): C{result}, with the machine and C{sizes}, to
    bench/out/NAME.json (dashes as underscores); its section printed and, with C{to_report}, put in the page."""
    result["machine"] = machine(sizes)
    (OUT / f"{name.replace('-', '_')}.json").write_text(json.dumps(result, indent=1))
    text = section(result)
    print(text)
    if to_report:
        report.write_section(name, text)


async def run(sizes: dict[str, Any], only: set[str] | None, profile: str | None, profile_seconds: int
              ) -> dict[str, Any]:
    OUT.mkdir(exist_ok=True)
    work = OUT / "work"
    work.mkdir(exist_ok=True)
    started = time.monotonic()
    results: dict[str, Any] = {"machine": machine(sizes), "scenarios": {}}
    bench = Bench(work)
    try:
        for scenario in scenarios(sizes, ("127.0.0.1", bench.ports["plain"])):
            if only and scenario.name not in only:
                continue
            profile_s = profile_seconds if profile == scenario.name else None
            groups = [list(PATHS)] if scenario.interleaved else [[name] for name in PATHS]
            results["scenarios"][scenario.name] = by_path = {}
            for names in groups:
                by_path.update(await bench.measure(scenario, names, profile_s))
                took = by_path[names[0]]["harness"]["elapsed_s"]
                errors = [f"{name}: {by_path[name]['error']}" for name in names if "error" in by_path[name]]
                print(f"{scenario.name:16} {'+'.join(names):28} {took:6.1f} s  {'; '.join(errors) or 'ok'}", flush=True)
    finally:
        bench.close()
    results["machine"]["duration_s"] = time.monotonic() - started
    results["machine"]["python_speed_us_end"] = python_speed_us()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="much smaller sizes, for trying the harness")
    parser.add_argument("--only", help="comma-separated scenario names")
    parser.add_argument("--size", action="append", default=[], metavar="KEY=JSON",
                        help="override one size, e.g. latency_requests=5000 or concurrency=[1000]")
    parser.add_argument("--profile", metavar="SCENARIO", help="record navtwist with py-spy during this scenario")
    parser.add_argument("--profile-seconds", type=int, default=20, metavar="N", help="py-spy's duration (20)")
    parser.add_argument("--no-report", action="store_true", help="write the JSON only")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sizes = dict(QUICK if args.quick else SIZES)
    for item in args.size:
        key, _, value = item.partition("=")
        if key not in sizes:
            parser.error(f"unknown size {key!r} (known: {', '.join(sizes)})")
        sizes[key] = json.loads(value)
    only = set(args.only.split(",")) if args.only else None
    results = asyncio.run(run(sizes, only, args.profile, args.profile_seconds))
    OUT.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in ("results.json", f"results-{stamp}.json"):
        (OUT / name).write_text(json.dumps(results, indent=1))
    if not (args.no_report or args.only or args.quick or args.size):
        report.write_bench(results)
    print(f"done in {results['machine']['duration_s']:.0f} s; raw results in {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
