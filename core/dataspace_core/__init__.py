"""What the client and the worker of the dataspace service share:

- ``catalog``: every operation described once (parameters and their checks,
  read or write, lane, reply known in advance, which accounts may call it);
  ``validate.SIGNATURES``, ``protocol.OPERATIONS`` and the method lists are
  derived from it;
- ``checks`` and ``validate``: the value checks, and checking a call's arguments;
- ``protocol``: the wire format (names, frames, encoding requests and replies,
  error codes);
- ``errors``: the errors a request can end in;
- ``datasource``: the interface both sides implement;
- ``urls``: broker URLs, TLS, passwords masked; ``limits``: the broker's sizes;
- ``amqp``: the AMQP layer (connection parameters, reconnecting, publisher
  confirms, failures in words, pika work-arounds).

It imports neither ``dataspace_client`` nor ``dataspace_worker``; both import it.
"""
