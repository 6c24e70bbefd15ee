"""DataSpace configurations for the tests: in process on PostgreSQL, or remote
through the broker."""

from __future__ import annotations


def inprocess_config(pg_dsn: str, **extra) -> dict:
    return {
        "dataspace": {
            "datasource": {
                "module": "dataspace_worker.postgres",
                "name": "PostgresDataSource",
                "config": {"dsn": pg_dsn, "pool_size": 4},
            },
            **extra,
        }
    }


def remote_config(amqp_url: str, timeout: float = 30, **extra) -> dict:
    return {
        "dataspace": {
            "datasource": {
                "module": "dataspace_client.remote",
                "name": "RemoteDataSource",
                "config": {"url": amqp_url, "timeout": timeout, "app_id": "dataspace-tests"},
            },
            **extra,
        }
    }
