"""What the client and the worker of the dataspace service share: the wire
protocol (``protocol``), the operations' signatures and checks (``validate``),
the errors a request can end in (``errors``), the datasource interface both
sides implement (``datasource``), broker addresses and their parsing (``urls``),
how a broker connection failure is told in words (``connection_errors``), the
broker's size limits (``limits``) and the pika work-arounds (``pika_patches``).

It imports neither ``dataspace_client`` nor ``dataspace_worker``; both import it.
"""
