"""twistd plugin: C{twistd navtwist}.  The real code is imported only when used."""
from twisted.application.service import ServiceMaker


class _ServiceMaker(ServiceMaker):
    @property
    def options(self) -> type:
        # twistd asks for this only once navtwist is the chosen command; the
        # imports it starts are most of start-up, so a Ctrl-C from here on
        # is one line, not a traceback.
        from navtwist.service.interrupts import quiet_interrupts

        quiet_interrupts()
        return super().options


navtwist = _ServiceMaker(
    "navtwist",
    "navtwist.service.server_tap",
    "Egress proxy for AI-agent sandboxes with streaming inference.local interception",
    "navtwist",
)
