"""twistd plugin: C{twistd navtwist}.  The real code is imported only when used."""
from twisted.application.service import ServiceMaker

navtwist = ServiceMaker(
    "navtwist",
    "navtwist.service.server_tap",
    "Egress proxy for AI-agent sandboxes with streaming inference.local interception",
    "navtwist",
)
