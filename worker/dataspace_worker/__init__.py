"""The dataspace worker: executes DataSpace requests from RabbitMQ against PostgreSQL.

Where to start reading (docs/architecture.md lists every module, and follows one
``insert`` through them):

- ``cli`` the ``dataspace-worker`` command; ``assembly`` builds a worker from its
  settings (``config``);
- the pool: ``worker_pool`` (``WorkerPool``: its parts held together, start, stop),
  ``pool_connection`` (the AMQP connection), ``channels`` (consumer channels and
  deliveries), ``database_thread`` (each consumer's database thread), ``settle``
  (a handled request's fate, decided in one place and carried out);
- requests: ``dispatch`` (request -> datasource call -> reply body), ``admission``;
- the store: ``postgres`` (``PostgresDataSource``, also usable in process),
  ``idempotency`` (the request log, applying writes at most once), ``queries``
  (each operation's body), ``sql`` (the data statements), ``db_pool``, ``retry``
  (the database retry policy), ``schema`` and ``adoption`` (migrations);
- the broker: ``topology``, ``definitions``, ``reaper`` (retention).
"""

__version__ = "0.1.0"
