"""mitmproxy addon for the benchmarks (runs inside mitmdump, imports only mitmproxy).

It streams every response (mitmproxy stores and forwards by default) and
sends requests for inference.local to the bench upstream in plain HTTP,
as navtwist's route does.  Set the upstream with C{--set bench_upstream=HOST:PORT}.
"""
from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader


class BenchRoute:
    def load(self, loader: Loader) -> None:
        loader.add_option("bench_upstream", str, "", "HOST:PORT of the plain-HTTP bench upstream")

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.request.host == "inference.local":
            host, port = ctx.options.bench_upstream.rsplit(":", 1)
            flow.request.scheme = "http"
            flow.request.host = host
            flow.request.port = int(port)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        flow.response.stream = True


addons = [BenchRoute()]
