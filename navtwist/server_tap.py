"""The twistd plugin's options and service: C{twistd navtwist --config PATH}."""
from __future__ import annotations

import gc
import os
from typing import Callable

from twisted.application import service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.client import Agent

from navtwist.admin import make_admin_site
from navtwist.ca import CAError, CertificateAuthority
from navtwist.config import Config, ConfigError, load_config, with_overrides
from navtwist.dispatch import InferenceDispatcher
from navtwist.drain import DrainService
from navtwist.egress import Egress
from navtwist.endpoints import UpstreamEndpoints
from navtwist.forward import ForwardResource
from navtwist.httpchannel import HardenedSite
from navtwist.intercept import InterceptSite
from navtwist.listeners import Listener
from navtwist.logs import Rotation, twistd_service
from navtwist.metrics import Metrics
from navtwist.observe import MetricsListener
from navtwist.exchange import Deadlines
from navtwist.proxy import ProxyFactory
from navtwist.reload import ConfigReloader
from navtwist.hooks import select
from navtwist.router import Extensions, InferenceRouter, UpstreamClients
from navtwist.interrupts import quiet_until_running
from navtwist.startup import check_before_start

log = Logger(namespace="navtwist")


class Options(usage.Options):
    """Command line of C{twistd navtwist}; the config file holds the rest."""

    optParameters = [
        ["config", "c", None, "YAML config file (default: the embedded default config)."],
        ["listen", "l", None, "Server endpoint string to listen on, overriding the config."],
        ["ca-dir", None, None, "Directory of ca.pem and ca.key, overriding the config."],
        ["watch-interval", None, 2.0, "Seconds between checks of the config file with --watch.", float],
        ["log-max-bytes", None, Rotation.max_bytes, "Rotate the JSON log file when it reaches this size.", int],
        ["log-keep", None, Rotation.keep, "Rotated JSON log files to keep (PATH.1 ... PATH.N).", int],
    ]
    optFlags = [
        ["watch", "w", "Reload the config file whenever it changes (SIGHUP always reloads)."],
    ]

    def postOptions(self) -> None:
        # Validation happens here so that a bad config stops twistd before it
        # daemonizes.  SystemExit, not UsageError: twistd would print its
        # option summary above the one line that matters.
        try:
            self["navtwist-config"] = self.load()
        except ConfigError as e:
            raise SystemExit(f"navtwist: {e}") from None
        if self["watch"] and not self["config"]:
            raise usage.UsageError("--watch needs --config")
        if self["watch-interval"] <= 0:
            raise usage.UsageError("--watch-interval must be positive")
        if self["log-max-bytes"] < 1 or self["log-keep"] < 1:
            raise usage.UsageError("--log-max-bytes and --log-keep must be at least 1")

    def load(self) -> Config:
        """The config as the command line says: the file (or default) plus overrides."""
        return with_overrides(load_config(self["config"], os.environ), self["listen"], self["ca-dir"])


class _UpstreamPoolService(service.Service):
    """Closes cached upstream connections when twistd stops."""

    def __init__(self, clients: UpstreamClients) -> None:
        self._clients = clients

    def stopService(self):  # type: ignore[no-untyped-def]
        super().stopService()
        return self._clients.close()


def extensions(config: Config, metrics: Metrics) -> Extensions:
    """The plugins C{config} enables (their names were checked when it was loaded)."""
    hooks, observers = select(config.plugins)
    return Extensions(hooks=hooks, observers=observers, metrics=metrics)


def make_service(
    config: Config,
    reactor: IReactorTime,
    reload: Callable[[], Config] | None = None,
    config_path: str | None = None,
    watch_interval: float | None = None,
    exit_zero_on_sigterm: bool = False,
) -> service.MultiService:
    """The proxy as a MultiService listening on C{config.listen}.

    With C{reload}, SIGHUP (and C{watch_interval} polling of C{config_path})
    re-reads the config through it.  With C{exit_zero_on_sigterm}, SIGTERM
    drains and stops the reactor as a normal stop (twistd would otherwise
    re-raise the signal and exit 143).
    """
    try:
        ca = CertificateAuthority.load_or_create(config.ca_dir)
    except CAError as e:
        raise SystemExit(f"navtwist: {e}") from None
    timeouts = config.timeouts
    metrics = Metrics(route.name for route in config.routes)
    clients = UpstreamClients(reactor)
    router = InferenceRouter(
        config.routes, reactor, clients.client_for, timeouts.write_stall, extensions(config, metrics)
    )
    site = InterceptSite(InferenceDispatcher(router), config.limits, timeouts, reactor)
    egress = Egress(reactor, reactor, reactor.nameResolver, config.policy, timeouts.connect)
    forward = ForwardResource(
        egress,
        Agent.usingEndpointFactory(reactor, UpstreamEndpoints(reactor, timeouts.connect), pool=clients.pool),
        reactor,
        Deadlines(timeouts.upstream_idle, timeouts.upstream_idle, timeouts.write_stall),
        MetricsListener(metrics),
    )
    forward_site = HardenedSite(forward, config.limits, timeouts, reactor)
    factory = ProxyFactory(ca, site, forward_site, egress, config.limits, timeouts, reactor, metrics)

    top = service.MultiService()
    Listener("listen", config.listen, factory, reactor, "navtwist").setServiceParent(top)
    DrainService(factory, reactor, config.drain_timeout, exit_zero_on_sigterm).setServiceParent(top)
    _UpstreamPoolService(clients).setServiceParent(top)
    if config.admin_listen is not None:

        def readiness() -> dict[str, bool]:
            return {
                "config_loaded": True,
                "listener_bound": factory.numPorts > 0 and not factory.draining,
                "ca_ready": ca.cert_path.exists(),
            }

        admin = make_admin_site(metrics, readiness, reactor)
        Listener("admin_listen", config.admin_listen, admin, reactor, "navtwist admin").setServiceParent(top)
    if reload is not None:

        def apply(new: Config) -> None:
            router.replace_routes(new.routes)
            router.extensions = extensions(new, metrics)
            metrics.set_routes(route.name for route in new.routes)
            clients.retain(new.routes)
            egress.policy = new.policy

        ConfigReloader(config, reload, apply, reactor, config_path, watch_interval).setServiceParent(top)
    log.info("navtwist CA certificate: {path}", path=str(ca.cert_path))
    for route in config.routes:
        log.info(
            "route {name}: {protocols} via {provider}",
            name=route.name,
            protocols=",".join(route.protocols),
            provider=route.provider_type or ("mock" if route.is_mock else "openai-compatible"),
        )
    return top


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    quiet_until_running(reactor)
    check_before_start(options["navtwist-config"], options.parent)
    top = make_service(
        options["navtwist-config"],
        reactor,
        reload=options.load,
        config_path=options["config"],
        watch_interval=options["watch-interval"] if options["watch"] else None,
        exit_zero_on_sigterm=True,
    )
    reactor.callWhenRunning(tune_gc)
    # twistd's own options (--logfile, --nodaemon) pick the log observer.
    return twistd_service(top, options.parent, Rotation(options["log-max-bytes"], options["log-keep"]))


def tune_gc() -> None:
    """Fewer, shorter collector pauses under load.

    Everything alive once the proxy runs (modules, config, certificates) is
    moved out of the collector's view, and young-generation collections run
    less often: a burst of a thousand streams otherwise triggered several
    full collections of 130-500 ms each (measured in bench/).
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
