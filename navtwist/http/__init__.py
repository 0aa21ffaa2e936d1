"""Stage 2 of the data path: HTTP/1.1 as the proxy speaks it to clients.

Strict head parsing shared by every parser (L{head}), the hardened
twisted.web channel and request with limits and deadlines (L{channel}), and
the sites built on it (L{sites}).
"""
