"""Stage 3a of the data path: traffic to destinations other than navtwist itself.

The allow list and the SSRF guard (L{policy}), resolve-check-dial
(L{dial}), opaque C{CONNECT} tunnels (L{tunnel}) and absolute-form C{http://}
forwarding (L{forward}).
"""
