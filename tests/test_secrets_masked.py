"""No configuration error shows a password, or a piece of one (issue 12, finding 9).

A password with an unencoded ``#``, ``/``, ``?`` or ``@`` makes a URL parser cut
it somewhere, and the parser's complaint then quotes the piece (pika: "Port could
not be cast to integer value as 'se'"); libpq quotes the text it stumbled on
("missing "=" after "cret""). The worker command, the client library and the
``dataspace`` command are each given such settings: they refuse them (exit 2 /
an exception naming the setting) without showing any piece of the password.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dataspace_client import cli
from dataspace_client.management import ManagementClient
from dataspace_client.remote import RemoteDataSource
from dataspace_core.amqp.addresses import BrokerAddresses
from dataspace_core.errors import DataSpaceError
from dataspace_core.urls import mask_password

#: pieces a leak would show; each is distinctive enough not to occur by chance
PIECES = ("Zq9", "Wv8", "Xk7", "Yj6", "Rt5")
PASSWORDS = (
    "Zq9#Wv8",  # '#' starts a fragment: urlsplit sees port 'Zq9'
    "Zq9/Wv8Xk7",  # '/' starts the path
    "Zq9?Wv8",  # '?' starts the query
    "Zq9@Wv8#Xk7",  # both
    "Zq9 Wv8[Xk7]",  # a bracket: "Invalid IPv6 URL"
)
BAD_DSNS = (
    "host=127.0.0.1 password=Zq9 Wv8Xk7 dbname=x",  # libpq: missing "=" after "Wv8Xk7"
    "host=127.0.0.1 password=Zq9 Wv8=Xk7",  # libpq: invalid connection option "Wv8"
    "postgresql://u:Zq9/Wv8@127.0.0.1/db",  # libpq: host u, port "Zq9"
    "postgresql://u:Zq9%zzWv8@127.0.0.1/db",  # libpq: invalid percent-encoded token
    "host=127.0.0.1 port=Zq9Wv8 password=Xk7",  # a password-like port
)
ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(sys.executable).with_name("dataspace-worker")
CLI = Path(sys.executable).with_name("dataspace")


def _assert_masked(text: str) -> None:
    leaked = [p for p in PIECES if p in text]
    assert not leaked, f"password pieces {leaked} in: {text!r}"


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("DATASPACE_")}


@pytest.mark.parametrize("password", PASSWORDS)
def test_mask_password_hides_any_password(password):
    url = f"amqp://ops:{password}@mq.example:5672/prod"
    masked = mask_password(url)
    _assert_masked(masked)
    assert masked.startswith("amqp://ops:***@")
    try:
        BrokerAddresses(url, lambda _params: None)
    except ValueError as exc:
        _assert_masked(str(exc))
        assert "invalid broker URL amqp://ops:***@" in str(exc)


@pytest.mark.parametrize("password", PASSWORDS[:3])
def test_the_worker_refuses_a_bad_amqp_url_without_the_password(password):
    done = subprocess.run(
        [str(WORKER), "--amqp-url", f"amqp://ops:{password}@127.0.0.1:1/x", "--metrics-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert done.returncode == 2, done.stderr
    _assert_masked(done.stdout + done.stderr)
    assert "setting 'amqp_url': invalid broker URL amqp://ops:***@127.0.0.1:1/x" in done.stderr
    assert "percent-encode" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("dsn", BAD_DSNS)
def test_the_worker_refuses_a_bad_dsn_without_the_password(dsn):
    done = subprocess.run(
        [
            str(WORKER),
            "--pg-dsn",
            dsn,
            "--amqp-url",
            "amqp://guest:guest@127.0.0.1:1/nowhere",
            "--metrics-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert done.returncode == 2, done.stderr
    _assert_masked(done.stdout + done.stderr)
    assert done.stderr.startswith("dataspace-worker: setting 'pg_dsn'"), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


@pytest.mark.parametrize("password", PASSWORDS)
def test_the_client_refuses_a_bad_url_without_the_password(password):
    url = f"amqp://ops:{password}@127.0.0.1:1/x"
    with pytest.raises(DataSpaceError) as caught:
        RemoteDataSource({"url": url, "connect_timeout": 1, "timeout": 1})
    _assert_masked(str(caught.value))
    with pytest.raises(DataSpaceError) as caught:
        ManagementClient(f"http://ops:{password}@127.0.0.1:1/")
    _assert_masked(str(caught.value))


COMMANDS = (
    ["status"],
    ["dead", "list"],
    ["dead", "replay", "--yes"],
    ["get", "1", "1", "k"],
    ["reap", "--now", "--days", "30"],
)


@pytest.mark.parametrize("command", COMMANDS)
def test_the_dataspace_command_refuses_a_bad_url_without_the_password(capsys, command):
    for password in PASSWORDS[:4]:
        url = f"amqp://ops:{password}@127.0.0.1:1/x"
        code = cli.main([*command, "--url", url, "--timeout", "2"])
        out, err = capsys.readouterr()
        assert code == 2, (command, password, err)
        _assert_masked(out + err)
        assert "amqp://ops:***@127.0.0.1:1/x" in err


def test_the_dataspace_command_masks_a_bad_management_url(capsys):
    code = cli.main(
        ["status", "--management-url", "http://ops:Zq9#Wv8@127.0.0.1:1/", "--timeout", "2"]
    )
    out, err = capsys.readouterr()
    assert code == 2, err
    _assert_masked(out + err)
    assert "invalid management URL http://127.0.0.1:1/" in err
