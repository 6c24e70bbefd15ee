"""The dataspace worker: executes DataSpace requests from RabbitMQ against PostgreSQL.

Modules, one concern each:

- ``postgres``  the PostgresDataSource (also usable in process)
- ``sql``       every SQL statement
- ``schema``    versioned migrations from ``migrations/*.sql``
- ``pool``      the blocking connection pool
- ``retry``     the database retry policy (tenacity)
- ``topology``  the exchanges and queues the worker declares
- ``dispatch``  request -> datasource call -> reply body
- ``consumer``  the consumer pool and its AMQP I/O loop
- ``config``    settings from flags, environment and file
- ``cli``       the ``dataspace-worker`` command
"""

__version__ = "0.1.0"
