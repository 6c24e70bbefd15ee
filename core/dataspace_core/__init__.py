"""What the client and the worker of the dataspace service share: the wire
protocol (``protocol``), the operations' signatures and checks (``validate``),
the errors a request can end in (``errors``), the datasource interface both
sides implement (``datasource``), broker URLs and their parsing (``urls``), the
broker's size limits (``limits``) and the AMQP layer (``amqp``: connection
parameters, reconnecting, publisher confirms, failures in words, pika
work-arounds).

It imports neither ``dataspace_client`` nor ``dataspace_worker``; both import it.
"""
