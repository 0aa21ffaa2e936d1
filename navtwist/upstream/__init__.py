"""Stage 5 of the data path: one request to an upstream and its streamed answer.

Shared by the inference router and the C{http://} forwarder: the exchange
with its candidates and deadlines (L{exchange}), the relay that streams each
chunk to the client with backpressure (L{relay}), and the endpoints that dial
exactly the checked address (L{endpoints}).
"""
