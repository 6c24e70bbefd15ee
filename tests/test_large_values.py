"""Large product values: the binary COPY path (worker/dataspace_worker/copy_rows.py)
behaves like the ordinary insert, on both datasources."""

from __future__ import annotations

import os

import pytest

from dataspace_client import DataSpaceExistsError
from dataspace_worker import queries as operations
from dataspace_worker.copy_rows import ProductRowStream
from tests.support.contract import header, metadata, new_taskmanager, sql_rows

LARGE = operations.COPY_FROM_BYTES


@pytest.mark.parametrize("size", [LARGE - 1, LARGE, 3 * 1024 * 1024 + 7])
def test_values_either_side_of_the_copy_threshold_round_trip(dataspace, size):
    _, _, tm = new_taskmanager(dataspace)
    value = os.urandom(size)
    dataspace.insert(tm, 1, "k\u00e9\u2603", value, header(), metadata(state="END_CYCLE"))
    assert dataspace.get_dataproduct(tm, 1, "k\u00e9\u2603") == value
    assert dataspace.get_header(tm, 1, "k\u00e9\u2603")[3] == "k\u00e9\u2603"
    assert dataspace.get_metadata(tm, 1, "k\u00e9\u2603")[4] == "END_CYCLE"


def test_a_large_insert_onto_an_existing_product_raises_exists_and_changes_nothing(
    dataspace, pg_dsn
):
    _, _, tm = new_taskmanager(dataspace)
    first = os.urandom(LARGE + 10)
    dataspace.insert(tm, 1, "k", first, header(), metadata())
    with pytest.raises(DataSpaceExistsError):
        dataspace.insert(tm, 1, "k", os.urandom(LARGE + 10), header(), metadata())
    assert dataspace.get_dataproduct(tm, 1, "k") == first
    rows = sql_rows(pg_dsn, "SELECT count(*) FROM header WHERE taskmanager_id = %s", (tm,))
    assert rows == [(1,)]


def test_a_large_insert_for_a_missing_taskmanager_raises_keyerror(dataspace):
    with pytest.raises(KeyError):
        dataspace.insert(2**62, 1, "k", os.urandom(LARGE), header(), metadata())


def test_the_copy_stream_is_the_binary_copy_format_in_chunks():
    value = b"\x00\xff" * 5
    stream = ProductRowStream(7, -1, "k", value)
    chunks = []
    while chunk := stream.read(4):
        assert len(chunk) <= 4
        chunks.append(chunk)
    data = b"".join(chunks)
    assert data.startswith(b"PGCOPY\n\xff\r\n\x00")
    assert data.endswith(b"\xff\xff")  # the -1 trailer
    assert value in data and (7).to_bytes(8, "big") in data
    assert (-1).to_bytes(8, "big", signed=True) in data


def test_a_large_get_of_a_missing_product_raises_keyerror(dataspace):
    _, _, tm = new_taskmanager(dataspace)
    dataspace.insert(tm, 1, "k", os.urandom(LARGE), header(), metadata())
    with pytest.raises(KeyError):
        dataspace.get_dataproduct(tm, 1, "other")
    assert len(dataspace.get_dataproduct(tm, 1, "k")) == LARGE


def test_a_large_value_with_a_hostile_key_reads_back_through_copy(dataspace):
    """The COPY statement is built with mogrify: its parameters are escaped."""
    _, _, tm = new_taskmanager(dataspace)
    key = "k'); DROP TABLE dataproduct; --\\ \u00e9"
    value = os.urandom(LARGE + 1)
    dataspace.insert(tm, 1, key, value, header(), metadata())
    assert dataspace.get_dataproduct(tm, 1, key) == value
