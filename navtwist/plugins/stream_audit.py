"""Example stream observer: one audit line per response, with sizes but no content.

Enable with C{plugins: [stream_audit]}.  It counts chunks and bytes as they
pass (never keeping them) and logs them with the request's usage record.
"""
from __future__ import annotations

from typing import Any, Mapping
from weakref import WeakKeyDictionary

from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from navtwist.interfaces import InferenceRequest, IStreamObserver

log = Logger(namespace="navtwist.audit")


@implementer(IPlugin, IStreamObserver)
class StreamAudit:
    name = "stream_audit"

    def __init__(self) -> None:
        self._counts: WeakKeyDictionary[InferenceRequest, list[int]] = WeakKeyDictionary()

    def response_started(self, info: InferenceRequest) -> None:
        self._counts[info] = [0, 0]

    def chunk(self, info: InferenceRequest, data: bytes) -> None:
        counts = self._counts[info]
        counts[0] += 1
        counts[1] += len(data)

    def response_ended(self, info: InferenceRequest, record: Mapping[str, Any]) -> None:
        chunks, size = self._counts.pop(info, [0, 0])
        log.info(
            "audit protocol={protocol} route={route} model={model} chunks={chunks} bytes={size} "
            "input_tokens={input_tokens} output_tokens={output_tokens} outcome={outcome}",
            protocol=info.protocol, route=info.route, model=record.get("upstream_model"), chunks=chunks, size=size,
            input_tokens=record.get("input_tokens"), output_tokens=record.get("output_tokens"),
            outcome=record.get("outcome"),
        )


stream_audit = StreamAudit()
