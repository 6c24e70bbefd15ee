"""Administering the tests' broker from outside the service: its management HTTP
API, the committed definitions file (loaded onto a scratch vhost with ``retarget``),
and ``rabbitmqctl`` listings."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

#: the RabbitMQ definitions the deployment loads (deploy/rabbitmq/definitions.json)
DEFINITIONS_FILE = Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq" / "definitions.json"
MANAGEMENT_URL = os.environ.get(
    "DATASPACE_TEST_MANAGEMENT_URL", "http://guest:guest@127.0.0.1:15672"
)


class Management:
    """The management HTTP API, with urllib."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.base = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}/api"
        token = f"{parts.username or 'guest'}:{parts.password or 'guest'}".encode()
        self.auth = "Basic " + base64.b64encode(token).decode()

    def call(self, method: str, path: str, body=None, ok=(200, 201, 204)):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={"Authorization": self.auth, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, payload = exc.code, exc.read()
        assert status in ok, f"{method} {path}: {status} {payload[:500]!r}"
        return json.loads(payload) if payload else None

    def reachable(self) -> bool:
        try:
            self.call("GET", "/overview")
            return True
        except (OSError, AssertionError):
            return False


def retarget(doc: dict, vhost: str) -> dict:
    """A copy of ``doc`` with every vhost field set to ``vhost``."""
    doc = json.loads(json.dumps(doc))
    for key, items in doc.items():
        for item in items:
            if key == "vhosts":
                item["name"] = vhost
            elif "vhost" in item:
                item["vhost"] = vhost
    return doc


def rabbitmqctl_json(vhost_url: str, command: str, *columns: str) -> list[dict]:
    """``rabbitmqctl <command> -p <vhost> <columns>`` as a list of dicts (three tries:
    on a busy machine a listing can time out once)."""
    vhost = unquote(urlsplit(vhost_url).path.lstrip("/")) or "/"
    argv = ["rabbitmqctl", "-q", command, "-p", vhost, *columns, "--formatter", "json"]
    for attempt in range(3):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            return json.loads(done.stdout)
        time.sleep(0.5 * (attempt + 1))
    raise AssertionError(f"{' '.join(argv)} failed: {done.stderr.strip()[:500]}")
