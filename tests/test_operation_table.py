"""Every class that offers the operations agrees with ``dataspace_core.catalog``.

The catalog describes each operation once; the methods of the backends, of
``DataSpace`` and of ``Producer`` are still written out by hand, so this checks
each against it: the same operations, the same parameters in the same order,
and the worker's SQL bodies, reply-known set and broker permissions as the
table says. No broker or database needed.
"""

from __future__ import annotations

import inspect
import re

import pytest

from dataspace_client.dataspace import DataSpace
from dataspace_client.producer import WRITES, Producer
from dataspace_client.remote import RemoteDataSource
from dataspace_core import protocol, validate
from dataspace_core.catalog import CATALOG, OperationSpec
from dataspace_core.datasource import REQUIRED_METHODS, DataSource
from dataspace_worker import definitions, queries
from dataspace_worker.postgres import PostgresDataSource

#: (class, operation) -> parameters a method takes beyond the operation's, last and
#: with a default: RemoteDataSource.reap's own wait
EXTRA = {(RemoteDataSource, "reap"): ("timeout",)}


def method_params(cls: type, name: str) -> list[str]:
    """A method's positional parameters (``self`` and keyword-only ones left out)."""
    parameters = inspect.signature(getattr(cls, name)).parameters.values()
    return [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD][1:]


def offers(cls: type, spec: OperationSpec) -> bool:
    """Whether the catalog says ``cls`` has a method for ``spec``."""
    if cls is DataSpace:
        return spec.on_dataspace
    if cls is Producer:
        return spec.fire_and_forget
    if cls is DataSource:
        return not spec.by_reaper
    return True  # RemoteDataSource and PostgresDataSource: every operation


CLASSES = [DataSource, RemoteDataSource, PostgresDataSource, DataSpace, Producer]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_each_class_has_a_method_per_operation_with_the_tables_parameters(cls):
    for name, spec in CATALOG.items():
        if not offers(cls, spec):
            assert not callable(getattr(cls, name, None)), f"{cls.__name__}.{name}: not in table"
            continue
        expected = [*spec.method_params, *EXTRA.get((cls, name), ())]
        assert method_params(cls, name) == expected, f"{cls.__name__}.{name}"


def test_method_params_would_catch_a_parameter_order_that_differs():
    class Swapped:
        def get_header(self, generation_id, taskmanager_id, key):
            pass

    assert method_params(Swapped, "get_header") != list(CATALOG["get_header"].method_params)


def test_the_derived_tables_follow_the_catalog():
    assert validate.SIGNATURES == {name: dict(spec.checks) for name, spec in CATALOG.items()}
    assert list(protocol.OPERATIONS) == list(CATALOG)
    for name, op in protocol.OPERATIONS.items():
        spec = CATALOG[name]
        assert (op.params, op.write, op.lane_argument) == (
            spec.params,
            spec.write,
            spec.lane_argument,
        )
        assert op.routing_key == ("admin.reap" if spec.by_reaper else f"data.{name}")
    assert REQUIRED_METHODS == ("close", *(n for n, s in CATALOG.items() if s.engine_api))
    assert set(WRITES) == {n for n, s in CATALOG.items() if s.fire_and_forget}
    assert all(CATALOG[n].write for n in WRITES)


def test_every_operation_has_a_registered_sql_body():
    transactional = {name for name, spec in CATALOG.items() if spec.transactional}
    assert set(queries.BODIES) == transactional
    for name, body in queries.BODIES.items():
        assert body.__name__ == name, f"BODIES[{name!r}] is {body.__name__}"
    # the others run on their own: a reap in many transactions of its own
    for name in set(CATALOG) - transactional:
        assert callable(getattr(PostgresDataSource, name))


def test_the_replies_known_in_advance_are_the_tables():
    assert queries.RETURN_NOTHING == {n for n, s in CATALOG.items() if s.returns_nothing}
    # a reply known in advance is the reply to None: only for writes that return nothing
    assert all(CATALOG[n].write for n in queries.RETURN_NOTHING)


def _routing_keys(spec: OperationSpec) -> list[str]:
    if spec.by_reaper:
        return [protocol.REAP_ROUTING_KEY]
    return [protocol.ROUTING_PREFIX + spec.name, protocol.LANE_ROUTING_PREFIX + spec.name]


@pytest.mark.parametrize("role", ["reader", "writer", "maintainer", "ops"])
def test_every_accounts_routing_keys_come_from_the_table(role):
    account = definitions.ACCOUNT[role]
    allowed = re.compile(account.keys or definitions.NOTHING)
    for spec in CATALOG.values():
        for key in _routing_keys(spec):
            assert bool(allowed.fullmatch(key)) == (role in spec.callers), (role, key)


def test_only_reads_are_open_to_every_client_account():
    for name, spec in CATALOG.items():
        assert (not spec.write) == ("reader" in spec.callers), name
