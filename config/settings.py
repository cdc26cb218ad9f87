"""The one place that turns LEADPIPE_* environment variables into a typed Settings object."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from config.inputs import BIGINT_MAX

PREFIX = "LEADPIPE_"


class ConfigError(ValueError):
    """A LEADPIPE_* variable holds a value Leadpipe refuses to guess about."""


def as_str(raw: str) -> str:
    return raw.strip()


def as_namespace(raw: str) -> str:
    """A name for keys and queues: letters, digits, `_`, `-` and `.` (a comma or a space would
    split the worker's queue list, leaving the ingest queue unconsumed)."""
    import re

    value = raw.strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value):
        raise ConfigError("expected 1 to 64 letters, digits, '_', '-' or '.', starting with a "
                          f"letter or digit, got {value!r}")
    return value


ADMIN_TOKEN_MIN = 16


def as_admin_tokens(raw: str) -> tuple[str, ...]:
    """Comma-separated operator tokens, each long enough not to be guessed: sign-in and the
    operator API compare in constant time but do not limit attempts (never shown)."""
    tokens = as_list(raw)
    short = sum(1 for token in tokens if len(token) < ADMIN_TOKEN_MIN)
    if short:
        raise ConfigError(f"{short} of the tokens is shorter than {ADMIN_TOKEN_MIN} characters "
                          "(make one: python3 -c 'import secrets; "
                          "print(secrets.token_urlsafe(32))')")
    return tokens


def as_optional_str(raw: str) -> str | None:
    return raw.strip() or None


def as_int(raw: str) -> int:
    try:
        return int(raw.strip().replace("_", ""))
    except ValueError:
        raise ConfigError(f"expected a whole number, got {raw!r}") from None


MAX_WHOLE = 1_000_000_000  # past it a size, count or number of seconds only overflows somewhere


def as_positive_int(raw: str) -> int:
    value = as_int(raw)
    if not 0 < value <= MAX_WHOLE:
        raise ConfigError(f"expected a number from 1 to {MAX_WHOLE:_}, got {raw!r}")
    return value


def as_seconds(raw: str) -> int:
    value = as_int(raw)
    if not 0 <= value <= MAX_WHOLE:
        raise ConfigError(f"expected a number of seconds from 0 to {MAX_WHOLE:_}, got {raw!r}")
    return value


def as_account_id(raw: str) -> int:
    """RD's account id: a whole number a JSON encoder and Postgres' bigint both hold."""
    value = as_int(raw)
    if not 0 <= value <= BIGINT_MAX:
        raise ConfigError(f"expected a number from 0 to {BIGINT_MAX}, got {raw!r}")
    return value


MAX_HOURS = 87_600  # ten years: a cookie's expiry must stay within the calendar


def as_hours(raw: str) -> int:
    value = as_int(raw)
    if not 0 < value <= MAX_HOURS:
        raise ConfigError(f"expected a number of hours from 1 to {MAX_HOURS}, got {raw!r}")
    return value


MAX_DAYS = 36_500  # a hundred years: past it, "now - N days" leaves Postgres' calendar


def as_days(raw: str) -> int:
    value = as_int(raw)
    if not 0 <= value <= MAX_DAYS:
        raise ConfigError(f"expected a number of days from 0 to {MAX_DAYS}, got {raw!r}")
    return value


MAX_TIMEOUT = 86_400.0  # a day: socket timeouts past it overflow the kernel's


def as_float(raw: str) -> float:
    """A number of seconds: above 0 and at most a day (nan, inf and 0 would never time out or
    always)."""
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"expected a number, got {raw!r}") from None
    if not 0 < value <= MAX_TIMEOUT:  # nan fails this too
        raise ConfigError(f"expected a number of seconds above 0 and at most {MAX_TIMEOUT:g}, "
                          f"got {raw!r}")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def as_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"expected one of {sorted(_TRUE | _FALSE)}, got {raw!r}")


def as_list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def as_port(raw: str) -> int:
    value = as_int(raw)
    if not 0 < value < 65536:
        raise ConfigError(f"expected a TCP port (1-65535), got {raw!r}")
    return value


def as_credentials(raw: str) -> tuple[str, ...]:
    """Comma-separated user:password pairs; the error never repeats the value (a secret)."""
    pairs = as_list(raw)
    for pair in pairs:
        user, _, password = pair.partition(":")
        if not user or not password:
            raise ConfigError("expected user:password pairs separated by commas "
                              "(the value is not shown: it holds passwords)")
    return pairs


def as_networks(raw: str) -> tuple[str, ...]:
    """Comma-separated addresses or CIDRs (10.0.0.0/8, ::1)."""
    import ipaddress

    networks = as_list(raw)
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"expected addresses or CIDRs, got {network!r}") from None
    return networks


def _url(raw: str, schemes: tuple[str, ...], example: str) -> str | None:
    """A URL of one of `schemes`; the error names what is wrong, never the value (a password)."""
    from urllib.parse import urlsplit

    value = raw.strip()
    if not value:
        return None
    try:
        parts = urlsplit(value)
        if "," not in parts.netloc:  # libpq's host1:port1,host2:port2 has no single port
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:  # its message may quote a piece of the password: not shown either
        raise ConfigError("not a valid URL: its host or port cannot be read (the value is not "
                          "shown: it may hold a password; URL-encode @ / ? # % in one)") from None
    if parts.netloc.count("@") > 1:  # libpq would end the password at the first one
        raise ConfigError("not a valid URL: more than one '@' before its host (the value is not "
                          "shown: it may hold a password; URL-encode @ as %40 in one)")
    if parts.scheme.lower() not in schemes:
        given = f"not one starting {parts.scheme}://" if parts.scheme else "got no scheme"
        hint = " (drop SQLAlchemy's driver suffix)" if "+" in parts.scheme else ""
        raise ConfigError(f"expected a URL like {example}, {given}{hint}")
    return value


def as_redis_url(raw: str) -> str | None:
    return _url(raw, ("redis", "rediss", "unix"), "redis://host:6379/0")


def as_database_url(raw: str) -> str | None:
    return _url(raw, ("postgresql", "postgres"), "postgresql://user:password@host:5432/db")


def as_log_level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"expected DEBUG, INFO, WARNING or ERROR, got {raw!r}")
    return value


def setting(env: str, convert: Callable[[str], Any], default: Any, doc: str,
            shown: str | None = None) -> Any:
    """Declare one setting: the variable it comes from, its converter, default and meaning;
    `shown`: how the docs give a default that depends on the machine, in brackets."""
    return field(default=default, metadata={"env": env, "convert": convert, "doc": doc,
                                            "shown": shown})


@dataclass(frozen=True)
class Settings:
    """Everything Leadpipe can be told; build it with `Settings.from_env()`."""

    redis_url: str | None = setting(
        "REDIS_URL", as_redis_url, None,
        "Redis for the ingest stream and the Celery broker. Unset: `leadpipe run` starts one. "
        "TLS: `rediss://host:port/0?ssl_ca_certs=/path/ca.pem`; the server's certificate is "
        "checked (against the system's CAs without `ssl_ca_certs`) unless the URL says "
        "`ssl_cert_reqs=none`.",
    )
    database_url: str | None = setting(
        "DATABASE_URL", as_database_url, None,
        "Postgres (libpq URL). Unset: `leadpipe run` starts one.",
    )
    ingest_tokens: tuple[str, ...] = setting(
        "INGEST_TOKENS", as_list, (),
        "Comma-separated secrets for POST /webhooks/rdstation (several at once, for rotation).",
    )
    ingest_token_header: str = setting(
        "INGEST_TOKEN_HEADER", as_str, "X-Leadpipe-Token",
        "Header that may carry the ingest secret instead of ?token= (RD CRM auth_header style).",
    )
    max_body_bytes: int = setting(
        "MAX_BODY_BYTES", as_positive_int, 1024 * 1024,
        "Largest webhook body accepted; larger gets 413.",
    )
    namespace: str = setting(
        "NAMESPACE", as_namespace, "leadpipe",
        "Prefix of every Redis key and Celery queue, so several pipelines can share one Redis "
        "(1 to 64 letters, digits, `_`, `-` or `.`).",
    )
    retry_after_seconds: int = setting(
        "RETRY_AFTER_SECONDS", as_positive_int, 5,
        "Retry-After sent with 503 when Redis cannot take the event.",
    )
    redis_timeout_seconds: float = setting(
        "REDIS_TIMEOUT_SECONDS", as_float, 2.0,
        "Socket timeout of the ingest path's Redis calls (RD gives up after 5 s).",
    )
    group_commit: bool = setting(
        "GROUP_COMMIT", as_bool, True,
        "Concurrent requests of one API process share one pipelined Redis write (and fsync); "
        "false: each request thread writes on a connection of its own.",
    )
    ingest_fast_path: bool = setting(
        "INGEST_FAST_PATH", as_bool, True,
        "Answer the common 202 case of the webhook in plain WSGI, skipping Flask (False: Flask "
        "answers every request; the answers are the same).",
    )
    batch_size: int = setting(
        "BATCH_SIZE", as_positive_int, 500,
        "Most events one batch task handles.",
    )
    batch_max_bytes: int = setting(
        "BATCH_MAX_BYTES", as_positive_int, 8 * 1024 * 1024,
        "Most bytes of raw bodies one batch task handles: a batch is cut there before "
        "BATCH_SIZE events (a body parsed takes some 25 times its size in a worker's memory). "
        "A body larger than this is a batch of its own.",
    )
    batch_window_ms: int = setting(
        "BATCH_WINDOW_MS", as_positive_int, 200,
        "Longest a partial batch waits for more events before it is dispatched. Each batch "
        "costs a storing task and a delivery task per sink: a shorter window stores sooner at "
        "low rates and spends more worker CPU per event under steady traffic.",
    )
    max_inflight_batches: int = setting(
        "MAX_INFLIGHT_BATCHES", as_positive_int, 4,
        "Back-pressure: one worker node holds at most this many times LEADPIPE_BATCH_SIZE "
        "entries read and not yet stored (at full batches, this many batches in flight).",
    )
    oversized_retries: int = setting(
        "OVERSIZED_RETRIES", as_positive_int, 10,
        "Tries in a row of a batch in which one event alone exceeds a Postgres limit that "
        "can also be load (the lock table, `statement_timeout`) before that event is "
        "quarantined with the error; the rest of its batch is stored one by one meanwhile.",
    )
    claim_idle_seconds: int = setting(
        "CLAIM_IDLE_SECONDS", as_positive_int, 60,
        "Events a dead worker held are re-dispatched by another after this long.",
    )
    worker_concurrency: int = setting(
        "WORKER_CONCURRENCY", as_positive_int, os.cpu_count() or 1,
        "Celery worker processes per `leadpipe worker`.", shown="(the number of CPUs)",
    )
    visibility_timeout_seconds: int = setting(
        "VISIBILITY_TIMEOUT_SECONDS", as_positive_int, 12 * 3600,
        "Celery's Redis visibility timeout: a task unacknowledged this long may be handed out "
        "again. Waits between delivery rounds longer than half of it are made in hops.",
    )
    routes_file: str | None = setting(
        "ROUTES_FILE", as_optional_str, None,
        "Routing file (YAML or TOML): sink instances and which events reach them. Unset: "
        "Postgres only.",
    )
    admin_tokens: tuple[str, ...] = setting(
        "ADMIN_TOKENS", as_admin_tokens, (),
        "Bearer tokens for the operator API (/api/...: dead letters, sinks) and the /ops page; "
        "each at least 16 characters.",
    )
    metrics_tokens: tuple[str, ...] = setting(
        "METRICS_TOKENS", as_list, (),
        "Bearer tokens for GET /metrics (the admin tokens are accepted too).",
    )
    metrics_allow: tuple[str, ...] = setting(
        "METRICS_ALLOW", as_networks, (),
        "Client addresses/CIDRs that may read /metrics without a token (the direct peer's "
        "address; X-Forwarded-For is not trusted).",
    )
    platform_account_id: int = setting(
        "PLATFORM_ACCOUNT_ID", as_account_id, 0,
        "RD account id shown as platform_account_id by /integrations/webhooks (exact past 2^53).",
    )
    subscription_probe: bool = setting(
        "SUBSCRIPTION_PROBE", as_bool, True,
        "Like RD, POST {} to a subscriber URL on create (or a new URL) and refuse it without a "
        "2xx within 5 s.",
    )
    ssrf_allow: tuple[str, ...] = setting(
        "SSRF_ALLOW", as_list, (),
        "CIDRs and host names subscriber URLs may reach although not public (comma-separated).",
    )
    subscription_suspend_after: int = setting(
        "SUBSCRIPTION_SUSPEND_AFTER", as_positive_int, 20,
        "Consecutive failed deliveries (one try per round) that suspend a subscription, "
        "once it has also been failing for LEADPIPE_SUBSCRIPTION_SUSPEND_AFTER_SECONDS; its "
        "missed events wait in dead letters until a PUT re-activates it.",
    )
    subscription_suspend_after_seconds: int = setting(
        "SUBSCRIPTION_SUSPEND_AFTER_SECONDS", as_seconds, 9 * 3600,
        "How long a subscription must have been failing (every delivery since the first "
        "failure failed) before it is suspended: by default past the 8.6 hours of one "
        "delivery's tries, so a receiver's outage shorter than that needs no PUT. 0: the "
        "count alone.",
    )
    subscription_secret_grace_seconds: int = setting(
        "SUBSCRIPTION_SECRET_GRACE_SECONDS", as_positive_int, 24 * 3600,
        "After a subscription's signing secret is rotated, the old one also signs for this long.",
    )
    spool_dir: str | None = setting(
        "SPOOL_DIR", as_optional_str, None,
        "A local folder where the API appends (and fsyncs) bodies while Redis is down, and "
        "answers 202; they move to Redis, in order, when it returns. Unset: 503 instead.",
    )
    relay_after_seconds: int = setting(
        "RELAY_AFTER_SECONDS", as_positive_int, 300,
        "A pending delivery with no task seen for this long is dispatched again.",
    )
    retain_payload_days: int = setting(
        "RETAIN_PAYLOAD_DAYS", as_days, 0,
        "Raw bodies (events.payload) older than this are emptied by `leadpipe purge` once "
        "nothing waits to deliver them; leads and deals keep their state. 0: keep.",
    )
    retain_quarantine_days: int = setting(
        "RETAIN_QUARANTINE_DAYS", as_days, 0,
        "Quarantined bodies older than this are deleted by `leadpipe purge`. 0: keep.",
    )
    retain_dead_letters_days: int = setting(
        "RETAIN_DEAD_LETTERS_DAYS", as_days, 0,
        "Dead letters older than this are deleted by `leadpipe purge`. 0: keep.",
    )
    retain_attempts_days: int = setting(
        "RETAIN_ATTEMPTS_DAYS", as_days, 0,
        "Delivery attempts older than this are deleted by `leadpipe purge`. 0: keep.",
    )
    purge_interval_seconds: int = setting(
        "PURGE_INTERVAL_SECONDS", as_positive_int, 3600,
        "How often one worker runs the purge task (when any retention is set).",
    )
    flower_basic_auth: tuple[str, ...] = setting(
        "FLOWER_BASIC_AUTH", as_credentials, (),
        "user:password pairs (comma-separated) for `leadpipe flower`; unset, it refuses to start "
        "unless told --no-auth.",
    )
    flower_port: int = setting(
        "FLOWER_PORT", as_port, 5555, "Port of `leadpipe flower` (its --port wins).",
    )
    flower_url: str | None = setting(
        "FLOWER_URL", as_optional_str, None,
        "Where operators open Flower (e.g. https://ops.example.com/flower/); /ops links to it.",
    )
    ops_session_key: str | None = setting(
        "OPS_SESSION_KEY", as_optional_str, None,
        "Key that signs the /ops session cookie and keys the operator names audit lines "
        "carry (token:<12 hex digits>). Unset: derived from LEADPIPE_ADMIN_TOKENS, so "
        "changing those signs every operator out, and a log line can be checked against a "
        "guess of every admin token at once: set a long random key.",
    )
    ops_session_hours: int = setting(
        "OPS_SESSION_HOURS", as_hours, 12,
        "How long an /ops sign-in lasts.",
    )
    ops_secure_cookie: bool = setting(
        "OPS_SECURE_COOKIE", as_bool, False,
        "Mark the /ops session cookie Secure even when the request came over plain HTTP (behind "
        "a proxy that terminates TLS); it is Secure anyway on HTTPS requests.",
    )
    data_dir: str = setting(
        "DATA_DIR", as_str, ".leadpipe",
        "Where `leadpipe run` keeps the Redis and Postgres it starts.",
    )
    log_level: str = setting("LOG_LEVEL", as_log_level, "INFO", "DEBUG, INFO, WARNING or ERROR.")
    log_pii: bool = setting(
        "LOG_PII", as_bool, False, "Log e-mails, phones and names unmasked (off by default).",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every LEADPIPE_* variable; a bad value raises ConfigError naming it."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = PREFIX + f.metadata["env"]
            if name in env:
                try:
                    values[f.name] = f.metadata["convert"](env[name])
                except ConfigError as exc:
                    raise ConfigError(f"{name}: {exc}") from None
        values.update(overrides)
        return cls(**values)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """The LEADPIPE_* variables that reproduce these settings in a child process."""
        env = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, tuple):
                value = ",".join(value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            env[PREFIX + f.metadata["env"]] = str(value)
        return env

    @property
    def stream_key(self) -> str:
        return f"{self.namespace}:ingest"

    @property
    def store_down_key(self) -> str:
        """Set (with an expiry) by a batch task that found Postgres unreachable: the pumps
        read no new entries meanwhile."""
        return f"{self.namespace}:store-down"

    @property
    def ingest_queue(self) -> str:
        return f"{self.namespace}.ingest"

    @property
    def default_queue(self) -> str:
        """Celery's default queue of this namespace (the purge, anything not routed)."""
        return f"{self.namespace}.default"


def documented() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) of every setting, for the README and `leadpipe config`."""
    rows = []
    for f in fields(Settings):
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(default)
        if f.metadata.get("shown"):
            default = f.metadata["shown"]
        rows.append((PREFIX + f.metadata["env"], "" if default is None else str(default),
                     f.metadata["doc"]))
    return rows
