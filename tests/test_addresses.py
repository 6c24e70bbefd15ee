"""Several broker addresses (a cluster's nodes): parsing, masking, and connecting past
an address that does not answer, for the client and the worker."""

from __future__ import annotations

import pytest

from dataspace_client import DataSpace, DataSpaceConfigurationError, DataSpaceConnectionError
from dataspace_core.amqp.addresses import BrokerAddresses
from dataspace_core.urls import mask_password, split_urls
from tests.support.configs import remote_config
from tests.support.contract import header, metadata, new_taskmanager
from tests.support.urls import dead_url


def test_split_urls_takes_lists_and_comma_separated_strings():
    assert split_urls("amqp://a/%2F") == ["amqp://a/%2F"]
    assert split_urls(" amqp://a/x , amqp://b/x ") == ["amqp://a/x", "amqp://b/x"]
    assert split_urls(["amqp://a/x", "amqp://b/x"]) == ["amqp://a/x", "amqp://b/x"]
    for bad in ("", " , ", [], ["amqp://a/x", ""], "amqp://a/x,,amqp://b/x"):
        with pytest.raises(ValueError):
            split_urls(bad)


def test_every_password_is_masked():
    masked = mask_password("amqp://u:s1@a:5672/v,amqp://u:s2@b:5672/v")
    assert masked == "amqp://u:***@a:5672/v, amqp://u:***@b:5672/v"
    assert "s1" not in mask_password(["amqp://u:s1@a/v"])


def test_addresses_go_round_and_say_when_a_round_starts():
    seen = []
    addresses = BrokerAddresses("amqp://a/x,amqp://b/x,amqp://c/x", seen.append)
    assert len(seen) == 3 and len(addresses) == 3
    hosts = [addresses.current.host]
    rounds = []
    for _ in range(3):
        rounds.append(addresses.advance())
        hosts.append(addresses.current.host)
    assert hosts == ["a", "b", "c", "a"] and rounds == [False, False, True]


def test_a_bad_url_among_several_is_a_configuration_error():
    with pytest.raises(DataSpaceConfigurationError, match="url"):
        DataSpace(remote_config("amqp://guest:guest@127.0.0.1:5672/%2F,"))


def test_the_client_connects_past_an_address_that_does_not_answer(worker_pool, amqp_url):
    config = remote_config(amqp_url, timeout=10)
    config["dataspace"]["datasource"]["config"]["url"] = [dead_url(amqp_url), amqp_url]
    config["dataspace"]["datasource"]["config"]["connect_timeout"] = 2
    with DataSpace(config) as space:
        _, _, tm = new_taskmanager(space)
        space.insert(tm, 1, "k", b"v", header(), metadata())
        assert space.get_dataproduct(tm, 1, "k") == b"v"


def test_the_client_reports_every_address_when_none_answers(amqp_url):
    config = remote_config(",".join([dead_url(amqp_url), dead_url(amqp_url)]), timeout=5)
    config["dataspace"]["datasource"]["config"]["connect_timeout"] = 1
    with pytest.raises(DataSpaceConnectionError) as info:
        DataSpace(config)
    assert str(info.value).count("127.0.0.1:") == 2
    assert "guest:guest" not in str(info.value)


def test_the_worker_consumes_through_the_second_address(own_vhost, pool_factory):
    pool_factory(f"{dead_url(own_vhost)},{own_vhost}", consumers=1)
    with DataSpace(remote_config(own_vhost, timeout=20)) as space:
        _, _, tm = new_taskmanager(space)
        space.insert(tm, 1, "k", b"v", header(), metadata())
        assert space.get_dataproduct(tm, 1, "k") == b"v"
