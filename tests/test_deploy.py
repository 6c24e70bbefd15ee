"""The deployment files (deploy/): they parse, they say what the worker needs, and
the broker definitions agree with the worker's topology.

The last tests load the definitions into the local broker through its management
API (a scratch vhost and scratch users, removed afterwards), let the worker
declare its topology over them, and run a round trip as the restricted worker
and client users. They are skipped when the management API is not reachable.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import pika
import pytest
import yaml
from pika.exceptions import ChannelClosedByBroker

from dataspace_client import DataBlock, DataSpace, Header
from dataspace_core.protocol import DEAD_LETTER_QUEUE, DIRECT_REPLY_TO, EXCHANGE
from dataspace_worker import definitions as defs
from dataspace_worker.config import SETTINGS
from dataspace_worker.topology import declare_blocking, topology
from tests import services
from tests.support.broker_admin import DEFINITIONS_FILE, MANAGEMENT_URL, Management, retarget
from tests.support.configs import remote_config
from tests.support.urls import user_url

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SETTING_ENVS = {s.env for s in SETTINGS}
DEFAULT_DRAIN_TIMEOUT = next(s.default for s in SETTINGS if s.name == "drain_timeout")


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def _load_all(path: Path) -> list:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _seconds(duration) -> float:
    """A compose duration ('45s', '1m30s') or a number of seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", str(duration))
    assert parts and any(parts.groups()), f"not a duration: {duration!r}"
    h, m, s = (float(g or 0) for g in parts.groups())
    return h * 3600 + m * 60 + s


# -- the definitions file ---------------------------------------------------------


def test_definitions_file_is_current():
    committed = json.loads(DEFINITIONS_FILE.read_text(encoding="utf-8"))
    assert committed == defs.definitions(), (
        "deploy/rabbitmq/definitions.json is stale: regenerate it with\n"
        "  python -m dataspace_worker.definitions > deploy/rabbitmq/definitions.json"
    )


def _expected_bindings(topo) -> set[tuple[str, str, str]]:
    """(source, destination, routing key) of every binding: to the durable queues
    (a transient queue, the fast read queue, is the workers' to declare) and to
    exchanges."""
    return {(e, q.name, k) for q in topo.queues if q.durable for e, k in q.bindings} | set(
        topo.exchange_bindings
    )


def _transient(topo) -> set[str]:
    return {q.name for q in topo.queues if not q.durable}


def test_definitions_follow_the_topology_and_hold_no_secrets():
    doc = defs.definitions()
    topo = topology()
    assert [(e["name"], e["type"]) for e in doc["exchanges"]] == list(topo.exchanges)
    # transient queues (the fast read queue) are the workers' to declare
    assert {q["name"]: q["arguments"] for q in doc["queues"]} == {
        q.name: q.arguments for q in topo.queues if q.durable
    }
    assert all(q["durable"] and not q["auto_delete"] for q in doc["queues"])
    assert {
        (b["source"], b["destination"], b["routing_key"]) for b in doc["bindings"]
    } == _expected_bindings(topo)
    assert doc["users"] == doc["permissions"] == doc["topic_permissions"] == []
    limit = {q["name"]: q["arguments"].get("x-delivery-limit") for q in doc["queues"]}
    assert limit[topo.request_queue.name] == 10
    assert defs.definitions(delivery_limit=3)["queues"][0]["arguments"]["x-delivery-limit"] == 3


def test_worker_permissions_cover_every_name_it_declares():
    topo = topology()
    names = [n for n, _ in topo.exchanges] + [q.name for q in topo.queues]
    for kind in ("configure", "read", "write"):
        pattern = re.compile(defs.WORKER_PERMISSIONS[kind])
        assert all(pattern.match(n) for n in names), kind
    assert re.match(defs.WORKER_PERMISSIONS["write"], "amq.default")  # replies, schedule
    client = defs.client_permissions(topo)
    assert re.match(client["write"], EXCHANGE)
    # ordering lanes go through exchange dataspace too (lane.<op>): checked by topic
    for other in ("dataspace.lanes", "dataspace.lanes.hash", "dataspace.dead", "amq.default"):
        assert not re.match(client["write"], other), other
    assert not any(re.match(client[k], n) for k in ("configure", "read") for n in names)


def test_hash_password_matches_rabbitmq():
    # RabbitMQ's documentation gives this hash for the password "guest".
    known = "9/1i+jKFRpbTRV1PtRnzFFYibT3cEpP92JeZ8YKGtflf4e/u"
    salt = base64.b64decode(known)[:4]
    assert defs.hash_password("guest", salt) == known
    assert defs.hash_password("guest") != defs.hash_password("guest")  # salted


def test_accounts_command(tmp_path, capsys):
    assert defs.main(["--accounts"], environ={}) == 2
    assert defs.WORKER_PASSWORD_ENV in capsys.readouterr().err
    out = tmp_path / "accounts.json"
    environ = {
        defs.WORKER_PASSWORD_ENV: "w",
        defs.CLIENT_PASSWORD_ENV: "c",
        defs.ADMIN_USER_ENV: "ops",  # the older names of the ops account's variables
        defs.ADMIN_PASSWORD_ENV: "a",
    }
    assert defs.main(["--accounts", "--vhost", "prod", "--output", str(out)], environ) == 0
    doc = json.loads(out.read_text())
    assert set(doc) == set(defs.ACCOUNT_KEYS)
    assert [(u["name"], u["tags"]) for u in doc["users"]] == [
        (defs.WORKER_USER, ""),
        (defs.CLIENT_USER, ""),
        ("ops", "management,policymaker"),  # no longer a broker-wide administrator
    ]
    assert {p["vhost"] for p in doc["permissions"]} == {"prod"} and doc["vhosts"] == [
        {"name": "prod"}
    ]


# -- files under deploy/ ------------------------------------------------------------


def test_every_yaml_file_parses():
    files = _yaml_files()
    assert files, "no YAML under deploy/"
    for path in files:
        assert _load_all(path), f"{path} is empty"


@pytest.fixture(scope="module")
def compose() -> dict:
    (doc,) = _load_all(DEPLOY / "compose.yaml")
    return doc


def _env(service: dict) -> dict:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping"
    return env


def test_compose_services(compose):
    services_ = compose["services"]
    assert {"rabbitmq", "postgres", "worker", "reaper"} <= set(services_)
    assert services_["rabbitmq"]["image"].startswith("rabbitmq:3.10-management")
    assert services_["postgres"]["image"] == "postgres:15"
    for name in ("rabbitmq", "postgres"):
        assert "test" in services_[name]["healthcheck"], name
    for name in ("worker", "reaper"):
        service = services_[name]
        assert "container_name" not in service and "ports" not in service, name
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        for dependency in ("rabbitmq", "postgres"):
            assert service["depends_on"][dependency]["condition"] == "service_healthy"
        drain = float(_env(service).get("DATASPACE_DRAIN_TIMEOUT", DEFAULT_DRAIN_TIMEOUT))
        assert _seconds(service["stop_grace_period"]) > drain, name
        env = _env(service)
        assert set(env) <= SETTING_ENVS, f"{name}: unknown settings {set(env) - SETTING_ENVS}"
        assert env["DATASPACE_METRICS_HOST"] == "0.0.0.0"
        amqp = urlsplit(re.sub(r"\$\{[^}]*\}", "x", env["DATASPACE_AMQP_URL"]))
        assert amqp.username == defs.WORKER_USER and amqp.hostname == "rabbitmq"
        assert "DATASPACE_DELIVERY_LIMIT" not in env  # the definitions' (10)
    reaper = _env(services_["reaper"])
    assert reaper["DATASPACE_CONSUMERS"] == "1" and reaper["DATASPACE_RETENTION_DAYS"]
    assert "DATASPACE_RETENTION_DAYS" not in _env(services_["worker"])


def test_compose_loads_the_definitions(compose):
    services_ = compose["services"]
    conf = (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text()
    (path,) = re.findall(r"^load_definitions\s*=\s*(\S+)", conf, re.M)
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services_["rabbitmq"]["volumes"]}
    assert mounts[path] == "broker-definitions"
    assert mounts["/etc/rabbitmq/conf.d/20-dataspace.conf"] == "./rabbitmq/rabbitmq.conf"
    assert mounts["/etc/rabbitmq/enabled_plugins"] == "./rabbitmq/enabled_plugins"
    job = services_["broker-definitions"]
    assert services_["rabbitmq"]["depends_on"]["broker-definitions"]["condition"] == (
        "service_completed_successfully"
    )
    job_mounts = {v.split(":")[1]: v.split(":")[0] for v in job["volumes"]}
    assert job_mounts["/src/definitions.json"] == "./rabbitmq/definitions.json"
    assert "--accounts" in job["command"][0] and "10-dataspace.json" in job["command"][0]
    plugins = (DEPLOY / "rabbitmq" / "enabled_plugins").read_text()
    assert "rabbitmq_management" in plugins and plugins.strip().endswith("].")


def test_compose_files_and_variables_exist(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} undeclared"
    text = (DEPLOY / "compose.yaml").read_text()
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
    example = (DEPLOY / ".env.example").read_text()
    defined = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", example, re.M))
    assert used <= defined, f"not in .env.example: {sorted(used - defined)}"
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()


@pytest.fixture(scope="module")
def k8s() -> dict:
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in _load_all(path):
            docs[doc["kind"]] = (path.name, doc)
    return docs


def test_k8s_kinds_and_kustomization(k8s):
    assert {
        "Deployment",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "Service",
        "Kustomization",
    } <= set(k8s)
    _, kustomization = k8s["Kustomization"]
    for resource in kustomization["resources"]:
        assert (DEPLOY / "k8s" / resource).exists(), resource
    # the placeholder secret is never applied over the real one
    assert k8s["Secret"][0] not in kustomization["resources"]


def test_k8s_deployment(k8s):
    _, deployment = k8s["Deployment"]
    _, config = k8s["ConfigMap"]
    _, secret = k8s["Secret"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    data = config["data"]
    assert set(data) <= SETTING_ENVS, f"unknown settings {set(data) - SETTING_ENVS}"
    assert not {"DATASPACE_AMQP_URL", "DATASPACE_PG_DSN"} & set(data), "secrets in a ConfigMap"
    assert data["DATASPACE_METRICS_HOST"] == "0.0.0.0"
    drain = float(data.get("DATASPACE_DRAIN_TIMEOUT", DEFAULT_DRAIN_TIMEOUT))
    assert pod["terminationGracePeriodSeconds"] > max(drain, 30)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == int(data["DATASPACE_METRICS_PORT"])
    probes = {
        kind: (container[kind]["httpGet"]["path"], container[kind]["httpGet"]["port"])
        for kind in ("livenessProbe", "readinessProbe")
    }
    assert probes == {
        "livenessProbe": ("/livez", "metrics"),
        "readinessProbe": ("/readyz", "metrics"),
    }
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    for name in ("DATASPACE_AMQP_URL", "DATASPACE_PG_DSN"):
        assert refs[name] == {"name": secret["metadata"]["name"], "key": name}
        assert name in secret["stringData"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == _dockerfile_uid()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    _, pdb = k8s["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    _, service = k8s["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert int(service["metadata"]["annotations"]["prometheus.io/port"]) == ports["metrics"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders():
    out = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "k8s")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    kinds = {doc["kind"] for doc in yaml.safe_load_all(out) if doc}
    assert {"Deployment", "ConfigMap", "PodDisruptionBudget", "Service"} <= kinds


def _dockerfile() -> dict[str, list[str]]:
    """Instruction -> its arguments, continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    instructions: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.setdefault(word.upper(), []).append(rest.strip())
    return instructions


def _dockerfile_uid() -> int:
    (user,) = _dockerfile()["USER"]
    return int(user.split(":")[0])


def test_dockerfile():
    d = _dockerfile()
    assert d["FROM"] == ["python:3.11-slim"]
    assert _dockerfile_uid() != 0
    assert json.loads(d["ENTRYPOINT"][0]) == ["dataspace-worker"]
    assert d["STOPSIGNAL"] == ["SIGTERM"]
    assert d["EXPOSE"] == ["9464"]
    assert any("DATASPACE_METRICS_HOST=0.0.0.0" in env for env in d["ENV"])
    (healthcheck,) = d["HEALTHCHECK"]
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"] and "/healthz" in command[2]
    compile(command[2], "HEALTHCHECK", "exec")
    for copy in d["COPY"]:
        for source in copy.split()[:-1]:
            assert (REPO / source).exists(), source


def test_systemd_unit_outlasts_the_drain():
    unit = (DEPLOY / "dataspace-worker.service").read_text()
    (timeout,) = re.findall(r"^TimeoutStopSec=(\d+)", unit, re.M)
    assert int(timeout) > DEFAULT_DRAIN_TIMEOUT


# -- the definitions on a real broker -------------------------------------------------


@dataclass
class Broker:
    api: Management
    vhost: str
    worker_url: str
    client_url: str
    accounts: dict
    maintainer_url: str = ""

    @property
    def path(self) -> str:
        return quote(self.vhost, safe="")


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """A scratch vhost set up only from the definitions: the committed file through
    the per-vhost endpoint, then accounts for scratch users as ``--accounts``
    makes them. Removed, with the users, afterwards."""
    api = Management(MANAGEMENT_URL)
    if not api.reachable():
        pytest.skip(f"the RabbitMQ management API is not reachable at {api.base}")
    suffix = uuid.uuid4().hex[:10]
    vhost = f"dataspace-deploy-{suffix}"
    worker_user, client_user = f"dataspace-deploy-{suffix}", f"dataspace-deploy-client-{suffix}"
    maintainer_user = f"dataspace-deploy-maintainer-{suffix}"
    worker_password, client_password = secrets.token_hex(12), secrets.token_hex(12)
    maintainer_password = secrets.token_hex(12)
    path = quote(vhost, safe="")
    try:
        api.call("PUT", f"/vhosts/{path}")
        committed = json.loads(DEFINITIONS_FILE.read_text(encoding="utf-8"))
        api.call("POST", f"/definitions/{path}", retarget(committed, vhost))
        accounts = tmp_path_factory.mktemp("definitions") / "accounts.json"
        environ = {
            defs.WORKER_PASSWORD_ENV: worker_password,
            defs.CLIENT_PASSWORD_ENV: client_password,
            defs.MAINTAINER_PASSWORD_ENV: maintainer_password,
        }
        args = ["--accounts", "--vhost", vhost, "--user", worker_user]
        args += ["--client-user", client_user, "--maintainer-user", maintainer_user]
        args += ["--output", str(accounts)]
        assert defs.main(args, environ) == 0
        accounts = json.loads(accounts.read_text())
        api.call("POST", "/definitions", accounts)
        yield Broker(
            api,
            vhost,
            user_url(worker_user, worker_password, vhost),
            user_url(client_user, client_password, vhost),
            accounts,
            user_url(maintainer_user, maintainer_password, vhost),
        )
    finally:
        api.call("DELETE", f"/vhosts/{path}", ok=(204, 404))
        for user in (worker_user, client_user, maintainer_user):
            api.call("DELETE", f"/users/{quote(user, safe='')}", ok=(204, 404))


def _queue_arguments(broker: Broker) -> dict:
    """The durable queues' arguments (transient ones come and go with the workers)."""
    queues = broker.api.call("GET", f"/queues/{broker.path}")
    return {q["name"]: q["arguments"] for q in queues if q["durable"]}


def _assert_matches_topology(broker: Broker) -> None:
    topo = topology()
    assert _queue_arguments(broker) == {q.name: q.arguments for q in topo.queues if q.durable}
    for name, kind in topo.exchanges:
        exchange = broker.api.call("GET", f"/exchanges/{broker.path}/{quote(name, safe='')}")
        assert (exchange["type"], exchange["durable"]) == (kind, True)
    bindings = {
        (b["source"], b["destination"], b["routing_key"])
        for b in broker.api.call("GET", f"/bindings/{broker.path}")
        if b["source"]  # the default exchange's implicit bindings
        and b["destination"] not in _transient(topo)
    }
    assert bindings == _expected_bindings(topo)


def test_definitions_load_and_the_worker_declares_over_them(broker):
    _assert_matches_topology(broker)
    connection = pika.BlockingConnection(pika.URLParameters(broker.worker_url))
    try:
        declare_blocking(connection.channel(), topology())  # as the worker user: no 403, no 406
        # a worker with another delivery limit is refused: the check above has teeth
        with pytest.raises(ChannelClosedByBroker) as refused:
            declare_blocking(connection.channel(), topology(delivery_limit=3))
        assert refused.value.reply_code == 406 and "inequivalent arg" in refused.value.reply_text
    finally:
        connection.close()
    _assert_matches_topology(broker)


def test_definitions_load_over_a_worker_declared_topology(broker):
    """The other order: the accounts only, the worker declares everything itself
    (creating a queue checks more permissions than redeclaring it: read on the
    queue and write on its dead-letter exchange), then the definitions load over
    it (an import never changes an existing queue: the arguments must agree)."""
    api = broker.api
    vhost = broker.vhost + "-first"
    scratch = Broker(api, vhost, "", "", {})
    try:
        api.call("POST", "/definitions", retarget(broker.accounts, vhost))
        parts = urlsplit(broker.worker_url)
        worker_url = parts._replace(path="/" + quote(vhost, safe="")).geturl()
        connection = pika.BlockingConnection(pika.URLParameters(worker_url))
        try:
            declare_blocking(connection.channel(), topology())
        finally:
            connection.close()
        _assert_matches_topology(scratch)
        committed = json.loads(DEFINITIONS_FILE.read_text(encoding="utf-8"))
        api.call("POST", f"/definitions/{scratch.path}", retarget(committed, vhost), ok=(204,))
        _assert_matches_topology(scratch)
    finally:
        api.call("DELETE", f"/vhosts/{scratch.path}", ok=(204, 404))


@pytest.fixture(scope="module")
def restricted_pool(broker, pg_dsn):
    """A worker pool (and its reaper consumer) as the restricted worker user."""
    with services.running_pool(broker.worker_url, pg_dsn, consumers=1, pool_size=2) as pool:
        yield pool


def test_round_trip_as_the_restricted_users(broker, restricted_pool):
    space = DataSpace(remote_config(broker.client_url, timeout=20))
    try:
        block = DataBlock(space, "deploy_check")
        block.put("resources", {"cpus": 4}, Header(block.taskmanager_id))
        assert block["resources"] == {"cpus": 4}
    finally:
        space.close()
    # admin.reap is the maintainer's (the writer's is refused by the broker: test_accounts)
    maintenance = DataSpace(remote_config(broker.maintainer_url, timeout=20))
    try:
        assert maintenance.datasource.reap(3650)["taskmanagers"] == 0
    finally:
        maintenance.close()
    assert restricted_pool.fatal is None


def test_worker_user_dead_letters_and_arms_the_schedule(broker, restricted_pool):
    from dataspace_worker.reaper import Schedule

    # a request that breaks the protocol: the worker publishes it to dataspace.dead
    client = pika.BlockingConnection(pika.URLParameters(broker.client_url))
    try:
        channel = client.channel()
        replies = []
        channel.basic_consume(DIRECT_REPLY_TO, lambda *a: replies.append(a[3]), auto_ack=True)
        channel.basic_publish(
            EXCHANGE,
            "data.insert",
            b"not json",
            pika.BasicProperties(
                content_type="application/json", message_id="m1", reply_to=DIRECT_REPLY_TO
            ),
        )
        deadline = time.monotonic() + 15
        while not replies and time.monotonic() < deadline:
            client.process_data_events(0.2)
        assert replies and json.loads(replies[0])["error"]["code"] == "bad_request"
    finally:
        client.close()
    worker = pika.BlockingConnection(pika.URLParameters(broker.worker_url))
    try:
        channel = worker.channel()
        deadline = time.monotonic() + 15
        body = None
        while body is None and time.monotonic() < deadline:
            _method, _props, body = channel.basic_get(DEAD_LETTER_QUEUE, auto_ack=True)
            if body is None:
                worker.sleep(0.1)
        assert body == b"not json"
    finally:
        worker.close()
    # the schedule is published through the default exchange; one run pending at most
    schedule = Schedule(broker.worker_url, 7, 7080)
    assert schedule.arm() is True
    assert schedule.arm() is False


def test_client_user_can_do_nothing_else(broker):
    connection = pika.BlockingConnection(pika.URLParameters(broker.client_url))
    try:
        for attempt in (
            lambda ch: ch.queue_declare("dataspace.mine"),
            lambda ch: ch.basic_get(topology().request_queue.name),
            lambda ch: ch.basic_publish("", topology().request_queue.name, b"{}"),
        ):
            channel = connection.channel()
            channel.confirm_delivery()
            with pytest.raises(ChannelClosedByBroker) as refused:
                attempt(channel)
            assert refused.value.reply_code == 403
    finally:
        connection.close()


def test_the_cluster_variant_gives_workers_every_node_and_joins_three_nodes(compose):
    """compose.cluster.yaml, laid over compose.yaml: three nodes on one cookie, found
    through classic_config, quorum queues grown onto the two later nodes, and the
    workers given the three addresses (docs/scaling.md)."""
    (cluster,) = _load_all(DEPLOY / "compose.cluster.yaml")
    services_ = cluster["services"]
    nodes = ["rabbitmq", "rabbitmq2", "rabbitmq3"]
    conf = (DEPLOY / "rabbitmq" / "cluster.conf").read_text()
    assert re.findall(r"classic_config\.nodes\.\d+ = rabbit@(\S+)", conf) == nodes
    for node in nodes:
        assert "RABBITMQ_ERLANG_COOKIE" in services_[node]["environment"], node
        mounts = {v.split(":")[1]: v.split(":")[0] for v in services_[node]["volumes"]}
        assert mounts["/etc/rabbitmq/conf.d/30-cluster.conf"] == "./rabbitmq/cluster.conf"
        for volume in services_[node]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{node}: {source} does not exist"
            else:
                declared = set(compose["volumes"]) | set(cluster["volumes"])
                assert source in declared, f"{node}: volume {source} undeclared"
    for later in nodes[1:]:
        assert services_[later]["hostname"] == later
        assert f"grow rabbit@{later} all" in services_["cluster-grow"]["command"][0]
    for name in ("worker", "reaper"):
        url = re.sub(r"\$\{[^}]*\}", "x", services_[name]["environment"]["DATASPACE_AMQP_URL"])
        hosts = [urlsplit(u.strip()).hostname for u in url.split(",")]
        assert hosts == nodes, name
        assert services_[name]["depends_on"]["cluster-grow"]["condition"] == (
            "service_completed_successfully"
        )
    assert "RABBITMQ_ERLANG_COOKIE=" in (DEPLOY / ".env.example").read_text()


def test_the_image_copies_every_package_folder():
    """Each folder pyproject.toml finds packages in is copied into the image, or
    ``pip install`` there builds a distribution without it (and the worker fails on
    its first import)."""
    import tomllib

    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())
    folders = project["tool"]["setuptools"]["packages"]["find"]["where"]
    copied = {args.split()[0] for args in _dockerfile()["COPY"]}
    assert set(folders) <= copied, f"not copied into the image: {set(folders) - copied}"
