"""Fire-and-forget writes for decoupled producers: ``DataSpace.producer()``.

A program that produces data faster than it wants to wait for each write gets a
``Producer``: its write methods take the same arguments as the DataSpace's,
check them at once (a bad call raises TypeError/ValueError there), and return
without waiting for the worker. ``flush()`` waits until every write so far is
safe: over RabbitMQ, confirmed by the broker (on a quorum queue, stored on a
quorum of nodes), from where a worker applies it exactly once.

What a producer does not get back: results (``delete`` and ``mark_demented``
counts) and errors raised while applying a write (a missing product for
``update``, say). Those writes are kept in the ``dataspace.dead`` queue with the
reason (``dataspace dead list``). Writes from one producer are published in
order; see docs/api.md for what that orders on the worker side.

In process (``PostgresDataSource``) every write is applied before the method
returns, and its errors raise there.
"""

from __future__ import annotations

from dataspace_core.catalog import named
from dataspace_core.datasource import DataSource

#: the operations a producer sends (the catalog's ``fire_and_forget``); each returns
#: None on the producer
WRITES = named(lambda spec: spec.fire_and_forget)


class Producer:
    """Write methods that return at once; ``flush`` waits for them to be safe.

    Each write method returns the request's message_id (over RabbitMQ; None in
    process): the id under which a failed write shows in ``dataspace dead list``.
    """

    def __init__(self, datasource: DataSource):
        self.datasource = datasource
        if not callable(getattr(datasource, "publish", None)):
            # A datasource class from elsewhere (the engine's): apply each write at once.
            self.datasource = _Applying(datasource)

    def insert(self, taskmanager_id, generation_id, key, value, header, metadata) -> str | None:
        return self.datasource.publish("insert", locals())

    def update(self, taskmanager_id, generation_id, key, value, header, metadata) -> str | None:
        return self.datasource.publish("update", locals())

    def duplicate_datablock(self, taskmanager_id, generation_id, new_generation_id) -> str | None:
        return self.datasource.publish("duplicate_datablock", locals())

    def mark_expired(self, taskmanager_id, generation_id, key, expiry_time) -> str | None:
        return self.datasource.publish("mark_expired", locals())

    def mark_demented(self, taskmanager_id, keys, generation_id=None) -> str | None:
        return self.datasource.publish("mark_demented", locals())

    def delete(self, taskmanager_id, all_generations=False) -> str | None:
        return self.datasource.publish("delete", locals())

    @property
    def pending(self) -> int:
        """Writes handed over and not yet safe."""
        return self.datasource.pending

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every write so far is safe (see the module docstring).

        Raises DataSpacePublishError for writes the broker refused for good,
        DataSpaceTimeoutError if some are still unconfirmed after ``timeout``
        seconds (default: the datasource's call timeout); those stay pending.
        """
        self.datasource.flush(timeout)

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        if exc_type is None:
            self.flush()


class _Applying:
    """Fire-and-forget on a datasource without ``publish``: each write applied at once."""

    pending = 0

    def __init__(self, datasource):
        self._datasource = datasource

    def publish(self, operation: str, args: dict) -> None:
        return DataSource.publish(self._datasource, operation, args)

    def flush(self, timeout: float | None = None) -> None:
        return None
