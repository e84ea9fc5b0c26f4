"""docker-compose.yml describes the stack deploy/local/infra.sh runs: these checks keep the
two in step without Docker. A setting changed in deploy/local/kafka/server.properties or
infra.sh, and not in the compose file (or the other way round), fails here."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.cli import build_parser
from tests.infra import DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
SERVER_PROPERTIES = ROOT / "deploy" / "local" / "kafka" / "server.properties"
INFRA_SH = (ROOT / "deploy" / "local" / "infra.sh").read_text()
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"

LISTENER_KEYS = {
    "listeners",
    "advertised.listeners",
    "listener.security.protocol.map",
    "controller.quorum.bootstrap.servers",
}
"""Networking differs by nature (a container listens for the host and for the compose
network); these keys are compared by listener name and port below."""
COMPOSE_ONLY = {"controller.quorum.voters"}
"""The image formats its storage without --standalone, so it needs a static quorum."""
PENDING_COMMANDS: set[str] = set()
"""Subcommands the compose file already runs that the command line does not have yet."""


def read_properties(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def property_name(env: str) -> str:
    """The apache/kafka image's rule: KAFKA_ dropped, ``_`` -> ``.``, ``__`` -> ``_``,
    ``___`` -> ``-``, lower case."""
    name = env.removeprefix("KAFKA_")
    name = re.sub(r"(?<!_)_(?!_)", ".", name)
    return name.replace("___", "-").replace("__", "_").lower()


def text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def kafka_env() -> dict[str, str]:
    env = SERVICES["kafka"]["environment"]
    return {property_name(k): text(v) for k, v in env.items() if k.startswith("KAFKA_")}


def listeners(value: str) -> dict[str, str]:
    """``NAME://host:port,...`` as {NAME: port}."""
    out = {}
    for item in value.split(","):
        name, _, address = item.partition("://")
        out[name] = address.rpartition(":")[2]
    return out


def infra_setting(name: str) -> str:
    """The value infra.sh gives ``name``; ``${OVERRIDE:-default}`` counts as its default."""
    match = re.search(rf"^{name}=(\S+)$", INFRA_SH, re.MULTILINE)
    assert match is not None, f"infra.sh no longer sets {name}"
    value = match.group(1).strip("'\"")
    default = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
    return default.group(1) if default else value


def test_every_service_is_there() -> None:
    assert {"kafka", "postgres", "topics", "engine", "worker", "projector"} <= set(SERVICES)


def test_kafka_runs_the_version_the_local_broker_runs() -> None:
    pom = (ROOT / "deploy" / "local" / "kafka" / "pom.xml").read_text()
    match = re.search(r"<kafka.version>(.+?)</kafka.version>", pom)
    assert match is not None
    assert SERVICES["kafka"]["image"] == f"apache/kafka:{match.group(1)}"


def test_kafka_settings_match_server_properties() -> None:
    local = read_properties(SERVER_PROPERTIES)
    compose = kafka_env()
    differ = {
        k: (v, compose.get(k))
        for k, v in local.items()
        if k not in LISTENER_KEYS and compose.get(k) != v
    }
    assert not differ, f"server.properties vs docker-compose.yml (key: (local, compose)): {differ}"
    extra = set(compose) - set(local) - COMPOSE_ONLY
    assert not extra, f"docker-compose.yml sets {sorted(extra)}, server.properties does not"


def test_kafka_listens_where_the_local_broker_does() -> None:
    local = read_properties(SERVER_PROPERTIES)
    compose = kafka_env()
    local_ports, compose_ports = listeners(local["listeners"]), listeners(compose["listeners"])
    for name, port in local_ports.items():
        assert compose_ports.get(name) == port, f"listener {name}"
    local_advertised = dict(item.split("://") for item in local["advertised.listeners"].split(","))
    compose_advertised = dict(
        item.split("://") for item in compose["advertised.listeners"].split(",")
    )
    for name, address in local_advertised.items():
        assert compose_advertised.get(name) == address, f"advertised listener {name}"
    local_map = set(local["listener.security.protocol.map"].split(","))
    assert local_map <= set(compose["listener.security.protocol.map"].split(","))
    controller_port = local["controller.quorum.bootstrap.servers"].rpartition(":")[2]
    node, _, voter = compose["controller.quorum.voters"].partition("@")
    assert node == local["node.id"] and voter.rpartition(":")[2] == controller_port
    client_port = local_ports["PLAINTEXT"]
    assert f"127.0.0.1:{client_port}:{client_port}" in SERVICES["kafka"]["ports"]


def test_postgres_matches_infra_sh() -> None:
    user, password = infra_setting("PG_USER"), infra_setting("PG_PASSWORD")
    db, port = infra_setting("PG_DB"), infra_setting("PG_PORT")
    service = SERVICES["postgres"]
    assert service["image"] == "postgres:15"
    assert service["environment"] == {
        "POSTGRES_USER": user,
        "POSTGRES_PASSWORD": password,
        "POSTGRES_DB": db,
    }
    assert f"127.0.0.1:{port}:5432" in service["ports"]
    assert DEFAULTS["TERRANOHA_POSTGRES"] == f"postgresql://{user}:{password}@127.0.0.1:{port}/{db}"
    dsns = [
        c[c.index("--postgres") + 1] for c in _terranoha_commands().values() if "--postgres" in c
    ]
    assert dsns, "no service passes --postgres"
    assert set(dsns) == {f"postgresql://{user}:{password}@postgres:5432/{db}"}


def _terranoha_commands() -> dict[str, list[str]]:
    return {
        name: service["command"]
        for name, service in SERVICES.items()
        if isinstance(service.get("command"), list) and service["command"][:1] == ["terranoha"]
    }


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(actions[0].choices)


def test_every_terranoha_command_line_parses() -> None:
    commands = _terranoha_commands()
    assert {"topics", "engine", "worker", "projector"} <= set(commands)
    parser = build_parser()
    known = _subcommands(parser)
    for service, command in commands.items():
        sub = command[1]
        if sub not in known:
            assert sub in PENDING_COMMANDS, (
                f"service {service} runs `terranoha {sub}`, which the command line lacks"
            )
            continue
        try:
            args = parser.parse_args(command[1:])
        except SystemExit:
            pytest.fail(f"service {service}: `{' '.join(command)}` does not parse")
        if hasattr(args, "kafka"):
            assert args.kafka == "kafka:9092", service


def test_the_engine_image_is_built_from_the_repository() -> None:
    for name in ("topics", "engine", "worker", "projector"):
        build = SERVICES[name]["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    dockerfile = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.MULTILINE)
    assert "pip install ." in dockerfile
    assert "TERRANOHA_SCHEMAS=" in dockerfile


def test_long_running_services_are_healthy_when_ready() -> None:
    """serve and project serve the health endpoints; their healthcheck asks /readyz on
    that port, inside the container."""
    parser = build_parser()
    long_running = {
        name: command
        for name, command in _terranoha_commands().items()
        if command[1] in ("serve", "project")
    }
    assert {"engine", "worker", "projector"} <= set(long_running)
    for name, command in long_running.items():
        args = parser.parse_args(command[1:])
        assert args.health_port is not None and args.health_host == "0.0.0.0", name
        probe = SERVICES[name]["healthcheck"]["test"]
        assert f"http://127.0.0.1:{args.health_port}/readyz" in " ".join(probe), name
    assert SERVICES["topics"]["healthcheck"] == {"disable": True}
