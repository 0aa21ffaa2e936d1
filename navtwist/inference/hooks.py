"""Running operator plugins on the inference path, isolated from the proxy.

Request hooks (L{IRequestHook}) see each request before it goes upstream and
may change or refuse it; stream observers (L{IStreamObserver}) watch each
relayed response.  A hook refuses by returning a L{navtwist.outcome.Refusal}:
the client gets its status, code and message in its SDK's error shape.  A
plugin that raises is logged and isolated: a failing hook answers its
request with a 500, a failing observer is dropped for the rest of that
response, and the process never dies.
"""
from __future__ import annotations

from functools import cache
from typing import Any, Iterable, Mapping, Sequence

from twisted.logger import Logger
from twisted.plugin import getPlugins

from navtwist.interfaces import InferenceRequest, IRequestHook, IStreamObserver
from navtwist.outcome import Refusal

log = Logger(namespace="navtwist.hooks")


# A hook that raises refuses its request with this.
HOOK_FAILED = Refusal(500, "request_refused", "a request hook of the proxy failed")


@cache
def available() -> dict[str, IRequestHook | IStreamObserver]:
    """Every hook and observer plugin installed, by name."""
    import navtwist.plugins

    found: dict[str, IRequestHook | IStreamObserver] = {}
    kinds: tuple[type[IRequestHook | IStreamObserver], ...] = (IRequestHook, IStreamObserver)
    for interface in kinds:
        for plugin in getPlugins(interface, navtwist.plugins):
            found[plugin.name] = plugin
    return found


def select(names: Iterable[str]) -> tuple[list[IRequestHook], list[IStreamObserver]]:
    """The enabled (hooks, observers), in config order.

    @raise KeyError: naming the first unknown plugin.
    """
    plugins = [available()[name] for name in names]
    return (
        [p for p in plugins if IRequestHook.providedBy(p)],
        [p for p in plugins if IStreamObserver.providedBy(p)],
    )


def run_request_hooks(hooks: Sequence[IRequestHook], request: InferenceRequest) -> Refusal | None:
    """Run C{hooks} in order; the first refusal (or failure) stops the request."""
    for hook in hooks:
        try:
            result = hook.before_upstream(request)
        except Exception:
            log.failure("request hook {name} failed", name=getattr(hook, "name", repr(hook)))
            return HOOK_FAILED
        if isinstance(result, Refusal):
            log.info("request hook {name} refused a request: {status} {code}", name=hook.name,
                     status=result.status, code=result.code)
            return result
    return None


class ObserverFanout:
    """The stream observers of one response, each isolated from the others."""

    def __init__(self, observers: Sequence[IStreamObserver], info: InferenceRequest) -> None:
        self._observers = list(observers)
        self._info = info

    def _each(self, method: str, *args: object) -> None:
        for observer in list(self._observers):
            try:
                getattr(observer, method)(self._info, *args)
            except Exception:
                log.failure("stream observer {name} failed; ignoring it for this response",
                            name=getattr(observer, "name", repr(observer)))
                self._observers.remove(observer)

    def started(self) -> None:
        self._each("response_started")

    def chunk(self, data: bytes) -> None:
        self._each("chunk", data)

    def ended(self, record: Mapping[str, Any]) -> None:
        self._each("response_ended", record)
