"""TLS end to end: ``amqps://`` for the client, the ``dataspace`` command and the
worker, and PostgreSQL ``sslmode=verify-full`` for the worker (issue 12).

Against a throwaway RabbitMQ node with a TLS listener and a throwaway PostgreSQL
with ``ssl = on``, both with certificates from a CA this test makes with
``openssl``: the server certificates name ``localhost`` only (no IP address), so
connecting to ``127.0.0.1`` is a certificate for another host name.

- a call through the TLS broker, with the CA given, succeeds (client library, the
  ``dataspace`` command, the worker pool on amqps), also with a client
  certificate and with ``tls_server_name``;
- a certificate for another host name, or from another CA, is refused: one line
  saying so, no retrying for ever;
- the worker reaches PostgreSQL with ``sslmode=verify-full`` (pg_stat_ssl says
  the session is encrypted); given another CA it stops at once with exit 2 and one
  ERROR line, not an endless "database unavailable".
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import psycopg2
import pytest

from dataspace_client.remote import RemoteDataSource
from dataspace_core.errors import DataSpaceConfigurationError, DataSpaceError
from tests import services

from .instances import (
    InstanceUnavailable,
    ThrowawayPostgres,
    ThrowawayRabbitMQ,
    _owned_by,
    _pg_bindir,
    free_port,
)

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs openssl")


def _openssl(cwd: str, *args: str) -> None:
    done = subprocess.run(
        [OPENSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)}: {done.stderr}")


def _make_ca(directory: str, name: str) -> None:
    _openssl(
        directory, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN=dataspace test {name}",
    )  # fmt: skip


def _issue(directory: str, ca: str, name: str, subject: str, extensions: str) -> None:
    with open(os.path.join(directory, f"{name}.ext"), "w") as f:
        f.write(extensions)
    _openssl(
        directory, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
        "-out", f"{name}.csr", "-subj", subject,
    )  # fmt: skip
    _openssl(
        directory, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
        f"{ca}.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
        "-extfile", f"{name}.ext",
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki():
    """A CA, another CA, a server certificate for ``localhost`` only and a client
    certificate, all from the CA; in a directory removed afterwards."""
    directory = tempfile.mkdtemp(prefix="dstls-")
    try:
        os.chmod(directory, 0o755)
        _make_ca(directory, "ca")
        _make_ca(directory, "otherca")
        _issue(
            directory,
            "ca",
            "server",
            "/CN=localhost",
            "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )
        _issue(directory, "ca", "client", "/CN=dataspace-client", "extendedKeyUsage=clientAuth\n")
        for name in os.listdir(directory):
            os.chmod(os.path.join(directory, name), 0o644)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_broker(pki):
    """A throwaway RabbitMQ node with a TLS listener (client certificates verified
    when sent, not required); yields ``(node, tls_port)``."""
    if os.geteuid() != 0:
        pytest.skip("a throwaway RabbitMQ node needs root")
    base = tempfile.mkdtemp(prefix="dstls-mq-")
    node = None
    try:
        os.chmod(base, 0o755)
        port = free_port()
        tls_port = free_port(exclude=(port,))
        node = ThrowawayRabbitMQ(base, port, free_port(exclude=(port, tls_port)))
        certs = os.path.join(base, "certs")
        shutil.copytree(pki, certs)
        with open(os.path.join(base, "rabbitmq.conf"), "a") as f:
            f.write(
                f"listeners.ssl.1 = 127.0.0.1:{tls_port}\n"
                f"ssl_options.cacertfile = {certs}/ca.pem\n"
                f"ssl_options.certfile = {certs}/server.pem\n"
                f"ssl_options.keyfile = {certs}/server.key\n"
                "ssl_options.verify = verify_peer\n"
                "ssl_options.fail_if_no_peer_cert = false\n"
            )
        _owned_by(base, "rabbitmq")
        node.start()
        yield node, tls_port
    except InstanceUnavailable as exc:
        pytest.skip(str(exc))
    finally:
        if node is not None:
            node._destroy()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_postgres(pki):
    """A throwaway PostgreSQL with ``ssl = on`` (certificate for ``localhost``)."""
    if os.geteuid() != 0:
        pytest.skip("a throwaway PostgreSQL here needs root (to run as postgres)")
    base = tempfile.mkdtemp(prefix="dstls-pg-")
    instance = None
    try:
        os.chmod(base, 0o700)
        _owned_by(base, "postgres")
        instance = ThrowawayPostgres(base, free_port(), _pg_bindir())
        instance.init()
        for name in ("server.pem", "server.key"):
            target = os.path.join(instance.data, name)
            shutil.copy(os.path.join(pki, name), target)
            os.chmod(target, 0o600)
        with open(os.path.join(instance.data, "postgresql.conf"), "a") as f:
            f.write("ssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'\n")
        _owned_by(base, "postgres")
        instance.start()
        # every test here finds database dataspace, whichever of them runs first
        instance.create_database()
        yield instance
    finally:
        if instance is not None:
            instance._destroy()
        shutil.rmtree(base, ignore_errors=True)


def _amqps(port: int, host: str = "localhost", **query: str) -> str:
    params = "&".join(f"{k}={v}" for k, v in query.items())
    return f"amqps://guest:guest@{host}:{port}/%2F" + (f"?{params}" if params else "")


def _pg_dsn(postgres, rootcert: str, host: str = "localhost") -> str:
    return (
        f"host={host} port={postgres.port} user=postgres dbname=dataspace "
        f"sslmode=verify-full sslrootcert={rootcert}"
    )


@contextlib.contextmanager
def _remote(url: str):
    source = RemoteDataSource({"url": url, "timeout": 20, "connect_timeout": 5})
    try:
        yield source
    finally:
        source.close()


def test_a_call_through_the_tls_broker_and_a_verified_database(pki, tls_broker, tls_postgres):
    """Client, ``dataspace`` command and worker on amqps; worker on verify-full."""
    _, tls_port = tls_broker
    ca = os.path.join(pki, "ca.pem")
    url = _amqps(tls_port, tls_ca_file=ca)
    dsn = _pg_dsn(tls_postgres, ca)
    with services.running_pool(url, dsn, consumers=1, pool_size=3):
        with _remote(url) as source:
            name = f"tls-{uuid.uuid4().hex[:8]}"
            tm = source.store_taskmanager(name, uuid.uuid4().hex[:32])
            assert source.get_taskmanager(name)["sequence_id"] == tm
        # with a client certificate, and by address with the name to verify given
        client = _amqps(
            tls_port,
            host="127.0.0.1",
            tls_ca_file=ca,
            tls_cert_file=os.path.join(pki, "client.pem"),
            tls_key_file=os.path.join(pki, "client.key"),
            tls_server_name="localhost",
        )
        with _remote(client) as source:
            assert source.get_taskmanager(name)["sequence_id"] == tm
        # the dataspace command, through the same URL
        env = {k: v for k, v in os.environ.items() if not k.startswith("DATASPACE_")}
        done = subprocess.run(
            [str(_script("dataspace")), "put", str(tm), "1", "k", '{"a": 1}', "--url", url],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        encrypted, version = cur.fetchone()
    conn.close()
    assert encrypted and version.startswith("TLS"), version


def _script(name: str):
    from pathlib import Path

    return Path(sys.executable).with_name(name)


@pytest.mark.parametrize(
    "case",
    ["other host name", "other CA", "system CAs"],
)
def test_a_broker_certificate_that_does_not_verify_is_refused(pki, tls_broker, case):
    _, tls_port = tls_broker
    if case == "other host name":  # the certificate names localhost, not 127.0.0.1
        url = _amqps(tls_port, host="127.0.0.1", tls_ca_file=os.path.join(pki, "ca.pem"))
        expected = "IP address mismatch"
    elif case == "other CA":
        url = _amqps(tls_port, tls_ca_file=os.path.join(pki, "otherca.pem"))
        expected = "certificate verify failed"
    else:
        url = _amqps(tls_port)
        expected = "certificate verify failed"
    started = time.monotonic()
    with pytest.raises(DataSpaceConfigurationError) as caught:  # not retried: exit 2
        RemoteDataSource({"url": url, "timeout": 20, "connect_timeout": 5})
    message = str(caught.value)
    print(f"{case}: {message} ({time.monotonic() - started:.1f} s)")
    assert expected in message, message
    assert "\n" not in message and "TLS" in message
    assert time.monotonic() - started < 15
    # the dataspace command: exit 2 (configuration), one line
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATASPACE_")}
    done = subprocess.run(
        [str(_script("dataspace")), "get", "1", "1", "k", "--url", url, "--timeout", "10"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_the_worker_refuses_a_database_certificate_it_cannot_verify(pki, tls_postgres):
    """Another CA: exit 2 at once with one ERROR line, not a retry loop."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATASPACE_")}
    for rootcert, host, expected in (
        (os.path.join(pki, "otherca.pem"), "localhost", "certificate verify failed"),
        (os.path.join(pki, "ca.pem"), "127.0.0.1", "does not match host name"),
    ):
        started = time.monotonic()
        done = subprocess.run(
            [
                str(_script("dataspace-worker")),
                "--pg-dsn",
                _pg_dsn(tls_postgres, rootcert, host),
                "--amqp-url",
                "amqp://guest:guest@127.0.0.1:1/%2F",
                "--metrics-port",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        seconds = time.monotonic() - started
        print(f"worker, {expected}: exit {done.returncode} in {seconds:.1f} s: {done.stderr!r}")
        assert done.returncode == 2, done.stderr
        assert expected in done.stderr
        assert "database unavailable" not in done.stderr
        assert [line for line in done.stderr.splitlines() if "ERROR" in line], done.stderr
        assert seconds < 20


def test_tls_settings_are_checked_at_once(pki):
    with pytest.raises(DataSpaceError, match="tls_ca_file '/nonexistent.pem'"):
        RemoteDataSource({"url": _amqps(5671, tls_ca_file="/nonexistent.pem")})
    with pytest.raises(DataSpaceError, match="need an amqps:// URL"):
        RemoteDataSource({"url": "amqp://guest:guest@localhost/%2F?tls_ca_file=/x.pem"})


def test_the_worker_refuses_a_broker_certificate_it_cannot_verify(pki, tls_broker, tls_postgres):
    """The worker process on amqps to an address the certificate does not name: exit 2
    with the reason, not a reconnection loop."""
    _, tls_port = tls_broker
    ca = os.path.join(pki, "ca.pem")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATASPACE_")}
    started = time.monotonic()
    done = subprocess.run(
        [
            str(_script("dataspace-worker")),
            "--pg-dsn",
            _pg_dsn(tls_postgres, ca),
            "--amqp-url",
            _amqps(tls_port, host="127.0.0.1", tls_ca_file=ca),
            "--metrics-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    seconds = time.monotonic() - started
    print(f"worker, broker certificate: exit {done.returncode} in {seconds:.1f} s")
    assert done.returncode == 2, done.stderr
    assert "IP address mismatch" in done.stderr and "guest:***@" in done.stderr
    assert seconds < 30
