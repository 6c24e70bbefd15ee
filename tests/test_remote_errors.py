"""Failures of the remote path reach the caller typed, named and in time."""

from __future__ import annotations

import time

import pika
import pytest

from dataspace_client import (
    DataSpace,
    DataSpaceConfigurationError,
    DataSpaceConnectionError,
    DataSpaceError,
    DataSpaceTimeoutError,
)
from dataspace_worker.topology import declare_blocking, topology
from tests.support.configs import remote_config


@pytest.fixture
def empty_vhost(own_vhost):
    """A vhost of its own with nothing declared in it (no worker serves it)."""
    return own_vhost


def test_unreachable_broker_raises_connection_error_with_masked_url():
    url = "amqp://svc:s3cret-pw@127.0.0.1:1/%2F"  # nothing listens on port 1
    started = time.monotonic()
    with pytest.raises(DataSpaceConnectionError) as info:
        DataSpace(remote_config(url))
    message = str(info.value)
    assert "amqp://svc:***@127.0.0.1:1/%2F" in message
    assert "s3cret-pw" not in message
    assert time.monotonic() - started < 20


def test_wrong_password_is_a_connection_error_without_the_password(amqp_url):
    bad = amqp_url.replace("guest:guest@", "guest:not-the-password@")
    with pytest.raises(DataSpaceConnectionError) as info:
        DataSpace(remote_config(bad))
    assert "not-the-password" not in str(info.value)
    assert "guest:***@" in str(info.value)


def test_no_topology_on_vhost_fails_fast_naming_the_cause(empty_vhost):
    space = DataSpace(remote_config(empty_vhost, timeout=20))
    try:
        started = time.monotonic()
        with pytest.raises(DataSpaceConnectionError, match="is a dataspace worker running"):
            space.get_taskmanagers()
        assert time.monotonic() - started < 5
        # the client recovers its channel and keeps failing clearly, not hanging
        with pytest.raises(DataSpaceConnectionError):
            space.get_taskmanagers()
    finally:
        space.close()


def test_unroutable_request_fails_fast(empty_vhost):
    """Exchange declared but no queue bound: mandatory publish comes back at once."""
    connection = pika.BlockingConnection(pika.URLParameters(empty_vhost))
    connection.channel().exchange_declare("dataspace", "topic", durable=True)
    connection.close()
    space = DataSpace(remote_config(empty_vhost, timeout=20))
    try:
        started = time.monotonic()
        with pytest.raises(DataSpaceConnectionError, match="unroutable"):
            space.store_taskmanager("tm", "ID")
        assert time.monotonic() - started < 5
    finally:
        space.close()


def test_no_reply_within_timeout_names_operation_and_timeout(empty_vhost):
    """The topology exists but no worker consumes: the call times out, typed."""
    connection = pika.BlockingConnection(pika.URLParameters(empty_vhost))
    declare_blocking(connection.channel(), topology())
    connection.close()
    space = DataSpace(remote_config(empty_vhost, timeout=1.5))
    try:
        started = time.monotonic()
        with pytest.raises(DataSpaceTimeoutError) as info:
            space.get_dataproduct(1, 1, "k")
        elapsed = time.monotonic() - started
        assert 1.4 < elapsed < 4
        assert info.value.operation == "get_dataproduct"
        assert info.value.timeout == 1.5
        assert "get_dataproduct" in str(info.value) and "1.5 s" in str(info.value)
        assert isinstance(info.value, DataSpaceError)
    finally:
        space.close()


@pytest.mark.parametrize(
    "config, message",
    [
        ({"url": 5}, "'url' must be a URL, or a list of URLs"),
        ({"timeout": 0}, "'timeout' must be a positive number"),
        ({"timeout": "soon"}, "'timeout' must be a positive number"),
    ],
)
def test_bad_client_settings_are_configuration_errors(config, message):
    settings = remote_config("amqp://guest:guest@127.0.0.1:5672/%2F")
    settings["dataspace"]["datasource"]["config"].update(config)
    with pytest.raises(DataSpaceConfigurationError, match=message):
        DataSpace(settings)


def test_a_call_after_close_reconnects(amqp_url, worker_pool):
    space = DataSpace(remote_config(amqp_url))
    space.close()
    # close() drops the client; a new call reconnects transparently
    assert isinstance(space.get_taskmanagers("nobody-has-this-name"), list)
    space.close()
