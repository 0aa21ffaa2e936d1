"""The twistd plugin's options and service: C{twistd navtwist --config PATH}."""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Callable, cast

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.python import usage
from twisted.web.client import Agent

from navtwist.service.admin import make_admin_site
from navtwist.ca import CAError, load_for, permitted_hosts
from navtwist.config import Config, ConfigError
from navtwist.inference.dispatch import InferenceDispatcher
from navtwist.decisions import DecisionLog
from navtwist.http.streaming import StreamingRequest
from navtwist.intercept.credentials import CredentialSet, load_or_create_seed
from navtwist.intercept.origin import OriginClients
from navtwist.intercept.rules import startup_notes
from navtwist.intercept.resource import InterceptResource
from navtwist.service.collect import ClosedCollector
from navtwist.service.drain import DrainService
from navtwist.egress.dial import Egress
from navtwist.upstream.descriptors import DescriptorWatch, IdleBudget, raise_nofile_limit
from navtwist.upstream.endpoints import UpstreamEndpoints
from navtwist.egress.forward import ForwardResource
from navtwist.http.channel import HardenedSite
from navtwist.http.sites import InterceptSite
from navtwist.service.interrupts import quiet_until_running
from navtwist.service.listen import Listener
from navtwist.service.logs import Rotation, twistd_service
from navtwist.service.options import ConfigOptions
from navtwist.service.startup import check_before_start
from navtwist.service.metrics import Metrics
from navtwist.inference.observe import MetricsListener
from navtwist.upstream.exchange import Deadlines
from navtwist.listener import ProxyFactory
from navtwist.service.backlog import with_backlog
from navtwist.service.reload import ConfigReloader
from navtwist.inference.hooks import select
from navtwist.inference.router import Extensions, InferenceRouter, UpstreamClients
from navtwist.interfaces import IProxyReactor

log = Logger(namespace="navtwist")


class Options(ConfigOptions):
    """Command line of C{twistd navtwist}; the config file holds the rest."""

    synopsis = "[options]"
    longdesc = (
        "navtwist: the egress proxy of AI-agent sandboxes. It serves inference.local and the "
        "providers' hosts itself (streamed, credentials swapped), inspects the hosts of "
        "policy.intercept per request, tunnels policy.allow, and refuses everything else. "
        "SIGHUP reloads the config, SIGTERM drains. See docs/config.md."
    )
    optParameters: list[list[Any]] = [
        ["listen", "l", None, "Server endpoint string to listen on, overriding the config."],
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

    def load(self, previous: Config | None = None) -> Config:
        """The config as the command line says: the file (or default) plus overrides.

        On a reload, C{previous} is the config in use (credentials whose
        secret cannot be read now keep their previous value).
        """
        return self.read_config(self["listen"], previous, require_keys=True)


class _UpstreamPoolService(service.Service):
    """Closes cached upstream connections when twistd stops."""

    def __init__(self, clients: UpstreamClients | OriginClients) -> None:
        self._clients = clients

    def stopService(self) -> Deferred[None] | Deferred[list[tuple[bool, object]]]:
        super().stopService()
        return self._clients.close()


class _AfterDrain(service.Service):
    """Runs C{inner} and stops it only once the drain is over, so that the admin
    endpoint answers (/readyz: 503) until the end and load balancers stop sending."""

    def __init__(self, inner: service.Service, drain: DrainService) -> None:
        self._inner = inner
        self._drain = drain

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._inner.privilegedStartService()

    def startService(self) -> None:
        super().startService()
        self._inner.startService()

    def stopService(self):  # type: ignore[no-untyped-def]
        super().stopService()
        return self._drain.when_drained().addCallback(lambda _: self._inner.stopService())


class _DescriptorWatchService(service.Service):
    """Counts the listener's accept failures from Twisted's log while running (Twisted survives them)."""

    def __init__(self, watch: DescriptorWatch) -> None:
        self._watch = watch
        self._observer = cast(ILogObserver, watch.observe)  # a callable is all a log observer is

    def startService(self) -> None:
        super().startService()
        globalLogPublisher.addObserver(self._observer)

    def stopService(self):  # type: ignore[no-untyped-def]
        globalLogPublisher.removeObserver(self._observer)
        self._watch.stop()
        return super().stopService()


def extensions(config: Config, metrics: Metrics) -> Extensions:
    """The plugins C{config} enables (their names were checked when it was loaded)."""
    hooks, observers = select(config.plugins)
    return Extensions(hooks=hooks, observers=observers, metrics=metrics)


def make_service(
    config: Config,
    reactor: IProxyReactor,
    reload: Callable[[Config], Config] | None = None,
    config_path: str | None = None,
    watch_interval: float | None = None,
    exit_zero_on_sigterm: bool = False,
) -> service.MultiService:
    """The proxy as a MultiService listening on C{config.listen}.

    With C{reload}, SIGHUP (and C{watch_interval} polling of C{config_path}
    and of the credentials' secret files) re-reads the config through it,
    given the config in use.  With C{exit_zero_on_sigterm}, SIGTERM
    drains and stops the reactor as a normal stop (twistd would otherwise
    re-raise the signal and exit 143).
    """
    try:
        ca = load_for(config)
    except CAError as e:
        raise SystemExit(f"navtwist: {e}") from None
    if ca.unconstrained and config.ca_name_constraints:
        log.warn("CA certificate {path} has no name constraints (made by an earlier navtwist): a leaked ca.key "
                 "could impersonate any site; re-issue it with: navtwist ca rotate --config PATH", path=str(ca.cert_path))
    timeouts = config.timeouts
    metrics = Metrics(route.name for route in config.routes)
    parent = config.upstream_proxy  # read at start: a reload reports a change, not applies it
    descriptors = DescriptorWatch(reactor, metrics.fd_exhausted)
    idle = IdleBudget.for_soft_limit()
    clients = UpstreamClients(reactor, config.limits, parent, descriptors, idle)
    router = InferenceRouter(
        config.routes, reactor, clients.client_for, timeouts.write_stall, extensions(config, metrics)
    )
    site = InterceptSite(InferenceDispatcher(router), config.limits, timeouts, reactor)
    egress = Egress(reactor, reactor, reactor.nameResolver, config.policy, timeouts.connect, parent=parent,
                    descriptors=descriptors)
    forward = ForwardResource(
        egress,
        Agent.usingEndpointFactory(reactor, UpstreamEndpoints(reactor, timeouts.connect, parent=parent,
                                                              descriptors=descriptors), pool=clients.pool),
        reactor,
        Deadlines(timeouts.upstream_idle, timeouts.upstream_idle, timeouts.write_stall),
        MetricsListener(metrics),
    )
    forward_site = HardenedSite(forward, config.limits, timeouts, reactor, requestFactory=StreamingRequest)
    decisions = DecisionLog(config.audit_log, metrics)
    origins = OriginClients(reactor, timeouts.connect, config.limits, parent=parent, descriptors=descriptors,
                            idle=idle)
    credentials = CredentialSet.create(config.credentials, load_or_create_seed(Path(config.ca_dir)))
    forward.credentials = credentials
    intercept = InterceptResource(
        lambda: egress.policy,
        egress,
        origins,
        reactor,
        Deadlines(timeouts.upstream_idle, timeouts.upstream_idle, timeouts.write_stall),
        decisions,
        MetricsListener(metrics),
        credentials,
        config.limits.max_response_head_bytes,
    )
    intercept_site = HardenedSite(intercept, config.limits, timeouts, reactor, requestFactory=StreamingRequest)
    forward.intercept = intercept
    forward.decisions = decisions
    collector = ClosedCollector(reactor, lambda: factory.active)
    factory = ProxyFactory(
        ca, site, forward_site, egress, config.limits, timeouts, reactor, metrics,
        intercept_site=intercept_site, decisions=decisions, closed=collector.closed,
    )

    top = service.MultiService()
    Listener("listen", with_backlog(config.listen), factory, reactor, "navtwist").setServiceParent(top)
    drain = DrainService(factory, reactor, config.drain_timeout, exit_zero_on_sigterm)
    drain.setServiceParent(top)
    _UpstreamPoolService(clients).setServiceParent(top)
    _UpstreamPoolService(origins).setServiceParent(top)
    _DescriptorWatchService(descriptors).setServiceParent(top)
    if config.admin_listen is not None:

        def readiness() -> dict[str, bool]:
            return {
                "config_loaded": True,
                "listener_bound": factory.numPorts > 0 and not factory.draining,
                "ca_ready": ca.cert_path.exists(),
            }

        admin = make_admin_site(metrics, readiness, reactor)
        _AfterDrain(Listener("admin_listen", config.admin_listen, admin, reactor, "navtwist admin"), drain).setServiceParent(top)
    if reload is not None:

        def apply(new: Config) -> None:
            for route in new.routes:
                if route.key_kept_because:
                    log.warn("{warning}", warning=route.key_kept_because)
            router.replace_routes(new.routes)
            router.extensions = extensions(new, metrics)
            metrics.set_routes(route.name for route in new.routes)
            clients.retain(new.routes)
            egress.policy = new.policy
            current = intercept.credentials
            assert current is not None
            renewed, warnings = current.updated(new.credentials)
            for warning in warnings:
                log.warn("{warning}", warning=warning)
            intercept.credentials = forward.credentials = renewed
            for note in startup_notes(new.policy.intercept):
                log.warn("{note}", note=note)

        def load_checked(previous: Config) -> Config:
            new = reload(previous)
            uncovered = ca.covers(permitted_hosts(new))
            if uncovered is not None:
                raise ConfigError(f"the CA's name constraints do not permit {uncovered}; "
                                  "re-issue the CA with: navtwist ca rotate --config PATH, then restart")
            return new

        ConfigReloader(
            config, load_checked, apply, reactor, config_path, watch_interval,
            watched=lambda current: [c.location for c in current.credentials if c.source == "file"],
        ).setServiceParent(top)
    log.info("navtwist CA certificate: {path}", path=str(ca.cert_path))
    if parent is not None:
        log.info("upstream connections go through the parent proxy {parent}", parent=str(parent))
    for note in startup_notes(config.policy.intercept):
        log.warn("{note}", note=note)
    for credential in config.credentials:
        log.info("credential {name}: {variable} holds its placeholder; bound to {hosts}", name=credential.name,
                 variable=credential.sandbox_env, hosts=", ".join(str(b) for b in credential.hosts))
    for route in config.routes:
        log.info(
            "route {name}: {protocols} via {provider}",
            name=route.name,
            protocols=",".join(route.protocols),
            provider=route.provider_type or ("mock" if route.is_mock else "openai-compatible"),
        )
    return top


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor as installed

    # Twisted types the installed reactor by only a few of the interfaces every reactor provides.
    reactor = cast(IProxyReactor, installed)
    quiet_until_running(reactor)
    check_before_start(options["navtwist-config"], options.parent)
    old, new = raise_nofile_limit()  # before make_service sizes the idle-connection budget from it
    log.info("file descriptor limit (soft RLIMIT_NOFILE): {new} (was {old})", new=new, old=old)
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
