"""Stage 4 of the data path: inference calls that navtwist answers itself.

The IResource dispatcher (L{dispatch}) recognises the API (L{protocols}), the
router (L{router}) picks a route, rewrites the request for its provider
(L{providers}, L{hooks}) and hands it to L{navtwist.upstream}; L{usage} and
L{observe} watch the answer pass; L{mock} is the built-in backend; L{errors}
words refusals the way each SDK parses them.
"""
