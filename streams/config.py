"""The service's settings: one frozen object, from environment variables and command-line flags.

Why it exists: every knob of ``sensor-anomaly serve`` is read, validated and documented in one
place. A bad value stops start-up with a :class:`~streams.errors.ConfigError` that names the
setting (and the environment variable it came from). Credentials are :class:`Secret` so they never
reach logs or reprs. Units are in the names (``commit_interval_s``).

Precedence: command-line flag > environment variable ``SENSOR_ANOMALY_<NAME>`` > default. The
bootstrap servers also fall back to ``KAFKA_BOOTSTRAP_SERVERS``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

from streams.errors import ConfigError

__all__ = ["ENV_PREFIX", "Secret", "ServiceConfig"]

ENV_PREFIX = "SENSOR_ANOMALY_"

ProcessingGuarantee = Literal["at_least_once", "exactly_once"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class Secret:
    """A credential that prints as ``'**********'``; :meth:`get` returns the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class ServiceConfig:
    """Settings of the stream processor. See the README's "Configuration" table for each one."""

    bootstrap_servers: str
    model_dir: Path
    input_topic: str = "sensor.readings"
    events_topic: str = "sensor.anomalies"
    dlq_topic: str = "sensor.readings.dlq"
    group_id: str = "sensor-anomaly"
    input_partitions: int = 6
    """Partitions of topics created at start-up when missing (an existing input topic keeps its own)."""
    replication_factor: int = 1
    create_topics: bool = True
    processing_guarantee: ProcessingGuarantee = "at_least_once"
    commit_interval_s: float = 1.0
    """Offsets, and the changelog buckets of devices touched since the last commit, are written at
    most this often. Longer = fewer changelog bytes; shorter = less to replay after a crash and, in
    exactly-once mode, lower event latency."""
    changelog_buckets: int = 64
    """Changelog records per partition: a record holds the state of every device of its bucket, and a
    commit rewrites each bucket with a touched device. More buckets = less rewritten when few devices
    report per commit; fewer = fewer sends per commit. Aim for about 20-200 devices per bucket
    (devices per partition / 64 with the default). Changing it makes every device warm up once."""
    max_poll_records: int = 10_000
    poll_timeout_ms: int = 100
    max_message_bytes: int = 1_048_576
    idle_ttl_s: float = 7 * 24 * 3600.0
    """Devices silent for this long (event time) are forgotten; they warm up again when they return."""
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9400
    liveness_timeout_s: float = 60.0
    transactional_id: str = ""
    """Exactly-once only: the producer's transactional id (default ``<group_id>-<hostname>``); a restarted
    instance must reuse its id, so that the broker fences the instance it replaces."""
    client_id: str = "sensor-anomaly"
    reconnect_backoff_max_s: float = 30.0
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_password: Secret | None = None
    torch_threads: int = 1
    """torch intra-op threads for the detector. One leaves the second core of a small machine to
    kafka-python's IO thread and decoding; under contention, spinning OpenMP workers were measured
    several times slower than one thread. Raise it on machines with idle cores."""
    model_poll_interval_s: float = 5.0
    """How often the model registry's pointer is checked for a new live version."""
    shadow_model: str | None = None
    shadow_topic: str = "sensor.anomalies.shadow"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive = {"input_partitions": self.input_partitions, "replication_factor": self.replication_factor,
                    "torch_threads": self.torch_threads,
                    "max_poll_records": self.max_poll_records, "poll_timeout_ms": self.poll_timeout_ms,
                    "max_message_bytes": self.max_message_bytes, "changelog_buckets": self.changelog_buckets,
                    "commit_interval_s": self.commit_interval_s,
                    "idle_ttl_s": self.idle_ttl_s, "liveness_timeout_s": self.liveness_timeout_s,
                    "reconnect_backoff_max_s": self.reconnect_backoff_max_s,
                    "model_poll_interval_s": self.model_poll_interval_s}
        for name, value in positive.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"setting {name} must be a number > 0, got {value!r}")
        if not (isinstance(self.changelog_buckets, int) and self.changelog_buckets <= 65535):
            raise ConfigError(f"setting changelog_buckets must be a whole number in 1..65535, "
                              f"got {self.changelog_buckets!r}")
        if not self.bootstrap_servers.strip():
            raise ConfigError("setting bootstrap_servers is required (--bootstrap or "
                              f"{ENV_PREFIX}BOOTSTRAP_SERVERS or KAFKA_BOOTSTRAP_SERVERS)")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"setting metrics_port must be in 0..65535, got {self.metrics_port}")
        names = [self.input_topic, self.events_topic, self.dlq_topic, self.shadow_topic, self.group_id]
        if any(not n or len(n) > 200 or any(c.isspace() for c in n) for n in names):
            raise ConfigError(f"topic names and group_id must be non-empty without spaces, got {names}")
        if len({self.input_topic, self.events_topic, self.dlq_topic, self.changelog_topic}) != 4:
            raise ConfigError("settings input_topic, events_topic, dlq_topic and the changelog topic must differ")
        for name, choices in (("processing_guarantee", ProcessingGuarantee), ("security_protocol", SecurityProtocol),
                              ("log_level", Literal["DEBUG", "INFO", "WARNING", "ERROR"])):
            if getattr(self, name) not in get_args(choices):
                raise ConfigError(f"setting {name} must be one of {list(get_args(choices))}, "
                                  f"got {getattr(self, name)!r}")
        if self.sasl_mechanism is not None and self.sasl_mechanism not in get_args(SaslMechanism):
            raise ConfigError(f"setting sasl_mechanism must be one of {list(get_args(SaslMechanism))}, "
                              f"got {self.sasl_mechanism!r}")
        if self.security_protocol.startswith("SASL") and (
                self.sasl_mechanism is None or not self.sasl_username or self.sasl_password is None):
            raise ConfigError(f"security_protocol {self.security_protocol} needs sasl_mechanism, "
                                  "sasl_username and sasl_password")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"setting {name}: file {path} does not exist")

    @property
    def changelog_topic(self) -> str:
        return f"{self.group_id}-state-changelog"

    @property
    def exactly_once(self) -> bool:
        return self.processing_guarantee == "exactly_once"

    def kafka_security(self) -> dict[str, Any]:
        """kafka-python client keywords for TLS/SASL (shared by consumers, producers and the admin client)."""
        out: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL"):
            out |= {"sasl_mechanism": self.sasl_mechanism, "sasl_plain_username": self.sasl_username,
                    "sasl_plain_password": self.sasl_password.get() if self.sasl_password else None}
        if self.security_protocol.endswith("SSL"):
            out |= {k: str(v) for k, v in (("ssl_cafile", self.ssl_cafile), ("ssl_certfile", self.ssl_certfile),
                                           ("ssl_keyfile", self.ssl_keyfile)) if v is not None}
            if self.ssl_password is not None:
                out["ssl_password"] = self.ssl_password.get()
            out["ssl_check_hostname"] = True
        return out

    def redacted(self) -> dict[str, Any]:
        """Settings for logs (secrets print as stars)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}

    @classmethod
    def from_sources(cls, overrides: Mapping[str, Any] | None = None,
                     env: Mapping[str, str] | None = None) -> ServiceConfig:
        """Build from environment variables, then ``overrides`` (e.g. CLI flags; ``None`` values ignored).

        Raises :class:`ConfigError` naming the setting and its source when a value does not parse.
        """
        environ = os.environ if env is None else env
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "extra":
                continue
            source = f"{ENV_PREFIX}{f.name.upper()}"
            raw = environ.get(source)
            if raw is None and f.name == "bootstrap_servers":
                raw, source = environ.get("KAFKA_BOOTSTRAP_SERVERS"), "KAFKA_BOOTSTRAP_SERVERS"
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, raw, hints[f.name], source)
        for name, value in (overrides or {}).items():
            if value is None:
                continue
            if name not in hints:
                raise ConfigError(f"unknown setting {name!r}")
            values[name] = _parse(name, value, hints[name], f"--{name.replace('_', '-')}") \
                if isinstance(value, str) else value
        for required in ("bootstrap_servers", "model_dir"):
            if required not in values:
                flag = "--bootstrap" if required == "bootstrap_servers" else "--model"
                raise ConfigError(f"setting {required} is required ({flag} or {ENV_PREFIX}{required.upper()})")
        for name in ("sasl_password", "ssl_password"):
            if isinstance(values.get(name), str):
                values[name] = Secret(values[name])
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(str(exc)) from exc


def _parse(name: str, raw: str, hint: Any, source: str) -> Any:
    """Parse one string setting according to its type hint."""
    args = [a for a in get_args(hint) if a is not type(None)]
    target = args[0] if args and getattr(hint, "__origin__", None) is not Literal else hint
    try:
        if target is bool:
            lowered = raw.strip().lower()
            if lowered not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError("expected true/false")
            return lowered in ("1", "true", "yes", "on")
        if target is int:
            return int(raw)
        if target is float:
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError("must be finite")
            return value
        if target is Path:
            return Path(raw)
        if target is Secret:
            return Secret(raw)
        if getattr(target, "__origin__", None) is Literal or getattr(hint, "__origin__", None) is Literal:
            choices = get_args(target) or get_args(hint)
            if raw not in choices:
                raise ValueError(f"expected one of {list(choices)}")
            return raw
        return raw
    except ValueError as exc:
        raise ConfigError(f"setting {name} from {source}: cannot use {raw!r} ({exc})") from None

