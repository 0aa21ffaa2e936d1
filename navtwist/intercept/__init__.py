"""Stage 3b of the data path: hosts whose traffic navtwist terminates and inspects.

The rules of C{policy.intercept} (L{rules}), the resource that checks each
request and streams it to the origin (L{resource}) over verified TLS to the
address the SSRF guard checked (L{origin}).
"""
