"""docker-compose.yml and the Dockerfile, checked without a Docker engine (none runs in CI)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from config.cli import parser
from config.settings import documented

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

SERVICES = {"redis", "postgres", "migrate", "api", "worker", "flower"}
APP_SERVICES = ("migrate", "api", "worker", "flower")
LEADPIPE_COMMANDS = ("migrate", "api", "worker", "flower")
SCALED = ("worker",)
# Read by `docker compose` for interpolation only, never a key of an environment block, so no
# Leadpipe process ever sees them (secrets keep their setting's name).
INTERPOLATION_ONLY: set[str] = {"LEADPIPE_API_PORTS", "LEADPIPE_FLOWER_BIND"}  # host side only
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")
LEADPIPE_NAME = re.compile(r"\bLEADPIPE_[A-Z0-9_]+")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def settings_names() -> set[str]:
    return {name for name, _, _ in documented()}


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment block as a dict, whichever of the two compose forms it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def command(service: dict[str, Any]) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """{service: condition}; the short list form means service_started."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def volume_targets(service: dict[str, Any], compose: dict[str, Any]) -> dict[str, str]:
    """{container path: named volume} for the service's named-volume mounts."""
    named = set(compose.get("volumes") or {})
    mounts = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.split(":", 1)[0]
        else:
            source, target = volume.get("source", ""), volume.get("target", "")
        if source in named:
            mounts[target] = source
    return mounts


def healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(str(part) for part in test)


def test_the_six_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= SERVICES


def test_redis_is_durable_aof_fsync_always_on_a_volume(
    services: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    redis = services["redis"]
    assert redis["image"].split(":")[0] == "redis"
    assert redis["image"].split(":")[1].split(".")[0] == "7"
    cmd = command(redis)
    assert cmd[0] == "redis-server"
    args = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert args.get("--appendonly") == "yes"
    # the durability guarantee: a 2xx means the event is fsynced to the AOF
    assert args.get("--appendfsync") == "always"
    assert "/data" in volume_targets(redis, compose)
    assert "redis-cli" in healthcheck_text(redis) and "ping" in healthcheck_text(redis)


def test_postgres_has_a_volume_and_a_healthcheck(
    services: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    postgres = services["postgres"]
    assert postgres["image"].split(":")[0] == "postgres"
    assert postgres["image"].split(":")[1].split(".")[0] == "16"
    assert "/var/lib/postgresql/data" in volume_targets(postgres, compose)
    assert "pg_isready" in healthcheck_text(postgres)
    env = environment(postgres)
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"} <= set(env)
    # the password comes from the environment; the literal default is only for local use
    assert env["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD")
    # room in the lock table for the advisory locks of several batches stored at once
    cmd = command(postgres)
    assert cmd[0] == "postgres" and "max_locks_per_transaction=256" in cmd


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_use_the_image_built_from_the_dockerfile(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    build = services[name]["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    assert context in {".", "./"}
    if isinstance(build, dict):
        assert build.get("dockerfile", "Dockerfile") == "Dockerfile"


def test_every_leadpipe_variable_is_a_real_setting(services: dict[str, dict[str, Any]]) -> None:
    real = settings_names()
    for name, service in services.items():
        keys = {key for key in environment(service) if key.startswith("LEADPIPE_")}
        assert keys <= real, f"{name}: not settings: {sorted(keys - real)}"
        assert not keys & INTERPOLATION_ONLY, f"{name}: {sorted(keys & INTERPOLATION_ONLY)}"


def test_every_leadpipe_name_in_the_file_is_a_setting_or_interpolation_only() -> None:
    text = COMPOSE.read_text()
    named = set(LEADPIPE_NAME.findall(text))
    assert named - settings_names() <= INTERPOLATION_ONLY, sorted(named - settings_names())
    interpolated = set(INTERPOLATION.findall(text))
    assert INTERPOLATION_ONLY <= interpolated


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_share_one_environment(
    services: dict[str, dict[str, Any]], compose: dict[str, Any], name: str
) -> None:
    shared = {str(k): str(v) for k, v in compose["x-leadpipe-env"].items()}
    env = environment(services[name])
    assert {key: env.get(key) for key in shared} == shared


def test_urls_point_at_the_redis_and_postgres_services(compose: dict[str, Any]) -> None:
    env = compose["x-leadpipe-env"]
    redis_url = urlsplit(env["LEADPIPE_REDIS_URL"])
    assert redis_url.scheme == "redis"
    assert (redis_url.hostname, redis_url.port) == ("redis", 6379)
    database_url = urlsplit(env["LEADPIPE_DATABASE_URL"])
    assert database_url.scheme in {"postgresql", "postgres"}
    assert (database_url.hostname, database_url.port) == ("postgres", 5432)
    assert env["LEADPIPE_INGEST_TOKENS"].startswith("${LEADPIPE_INGEST_TOKENS:?")


@pytest.mark.parametrize("name", ("api", "worker"))
def test_api_and_worker_wait_for_redis_and_migrations(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    deps = depends_on(services[name])
    assert deps.get("redis") == "service_healthy"
    assert deps.get("migrate") == "service_completed_successfully"


def test_migrate_is_a_one_shot_after_postgres(services: dict[str, dict[str, Any]]) -> None:
    migrate = services["migrate"]
    assert depends_on(migrate).get("postgres") == "service_healthy"
    assert str(migrate.get("restart", "no")) == "no"


def test_api_has_a_healthcheck_on_healthz(services: dict[str, dict[str, Any]]) -> None:
    api = services["api"]
    assert "/healthz" in healthcheck_text(api)
    assert any(str(port).split(":")[-1] == "8000" for port in api["ports"])


@pytest.mark.parametrize("name", SCALED)
def test_scaled_services_have_no_container_name_or_host_ports(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    service = services[name]
    assert "container_name" not in service
    assert not service.get("ports")


def test_api_has_one_fixed_host_port_unless_a_range_is_asked_for(
        services: dict[str, dict[str, Any]]) -> None:
    """The URL registered in RD must not move: Docker hands a replica the next port of a
    range after each restart, so the default is one fixed port; `--scale api=N` takes a range
    set in LEADPIPE_API_PORTS (with a balancer in front)."""
    api = services["api"]
    assert "container_name" not in api
    (port,) = api["ports"]
    host, container = str(port).rsplit(":", 1)
    assert container == "8000"
    assert host == "${LEADPIPE_API_PORTS:-8000}"


def test_postgres_is_healthy_only_once_it_listens_over_tcp(
        services: dict[str, dict[str, Any]]) -> None:
    # the image's first-boot server listens on the Unix socket only: pg_isready without -h
    # passed then, and `migrate` (over TCP) failed once and for all
    assert "pg_isready -h 127.0.0.1" in healthcheck_text(services["postgres"])


def test_flower_is_published_on_the_hosts_loopback_by_default(
        services: dict[str, dict[str, Any]]) -> None:
    (port,) = services["flower"]["ports"]
    assert str(port) == "${LEADPIPE_FLOWER_BIND:-127.0.0.1}:5555:5555"


@pytest.mark.parametrize("name", LEADPIPE_COMMANDS)
def test_commands_are_valid_leadpipe_subcommands(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    cmd = command(services[name])
    assert cmd[0] == "leadpipe"
    args = parser().parse_args(cmd[1:])  # argparse raises SystemExit on an invalid command line
    assert args.command == name
    if name == "api":
        assert (args.host, args.port) == ("0.0.0.0", 8000)


def test_flower_is_leadpipe_flower_with_required_basic_auth(
    services: dict[str, dict[str, Any]],
) -> None:
    flower = services["flower"]
    args = parser().parse_args(command(flower)[1:])
    assert (args.host, args.port, args.no_auth) == ("0.0.0.0", 5555, False)
    assert any(str(port).split(":")[-1] == "5555" for port in flower["ports"])
    # compose refuses to start without credentials (`:?`), and so would `leadpipe flower`
    auth = environment(flower)["LEADPIPE_FLOWER_BASIC_AUTH"]
    assert auth.startswith("${LEADPIPE_FLOWER_BASIC_AUTH:?")
    assert depends_on(flower).get("redis") == "service_healthy"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


KNOWN_INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}


def test_dockerfile_parses_into_known_instructions() -> None:
    assert DOCKERFILE.exists()
    instructions = dockerfile_instructions()
    assert {name for name, _ in instructions} <= KNOWN_INSTRUCTIONS
    assert instructions[0][0] in {"FROM", "ARG"}
    assert all(args.split()[0].startswith("python:3.11-slim")
               for name, args in instructions if name == "FROM")


def test_dockerfile_copies_the_project() -> None:
    sources = set()
    for name, args in dockerfile_instructions():
        if name == "COPY" and not args.startswith("--from"):
            sources.update(part.rstrip("/") for part in args.split()[:-1])
    assert {"pyproject.toml", "ingest", "workers", "sinks", "config", "migrations"} <= sources


def test_dockerfile_installs_the_project_without_dev_deps() -> None:
    runs = " ".join(args for name, args in dockerfile_instructions() if name == "RUN")
    assert re.search(r"pip install [\"']?\.[\"']?(\s|$)", runs)  # Flower is a main dependency
    assert "[test" not in runs and "-e " not in runs


def test_dockerfile_does_not_run_as_root() -> None:
    users = [args.split(":")[0] for name, args in dockerfile_instructions() if name == "USER"]
    assert users, "no USER line: the container would run as root"
    assert users[-1] not in {"root", "0"}


def test_dockerfile_starts_leadpipe() -> None:
    starts = [args for name, args in dockerfile_instructions() if name in {"CMD", "ENTRYPOINT"}]
    assert starts
    last = starts[-1]  # the final stage's, which is what the image runs
    words = json.loads(last) if last.startswith("[") else shlex.split(last)
    assert words[0] == "leadpipe"
    assert parser().parse_args(words[1:]).command == "api"


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = {line.strip().rstrip("/") for line in lines if line.strip() and line[0] != "#"}
    assert {".git", ".venv", ".leadpipe", ".pytest_cache"} <= ignored
