"""Start and stop a real single-node Apache Kafka broker (KRaft) from jars that Maven resolves.

Why this module exists: development, demos and the integration/e2e tests need a real broker, with
real transactions and a real restart, on machines without a Docker engine. ``deploy/kafka/pom.xml``
resolves the broker's jars (``deploy/kafka/fetch-jars.sh`` puts them in a cache folder outside the
repository); :class:`LocalKafka` renders ``deploy/kafka/server.properties`` into a data directory,
formats the KRaft storage once, runs ``java -cp 'libs/*' kafka.Kafka`` in its own process group and
waits until the broker both logs that it started and answers an admin request.

Data directory layout (kept after failures, so the logs can be read)::

    <data dir>/server.properties    rendered config
    <data dir>/log4j2.xml           copy of deploy/kafka/log4j2.xml
    <data dir>/localkafka.json      ports and cluster id, reused by restart() and a later start()
    <data dir>/localkafka.pid       pid of the running broker (its process group id too)
    <data dir>/kraft/               partitions and the __cluster_metadata log
    <data dir>/logs/                server.log, controller.log, state-change.log, stdout.log

Security, for tests of the clients' TLS/SASL settings: ``sasl_users={"alice": "..."}`` adds a
``SASL_PLAINTEXT`` listener on a port of its own (:meth:`LocalKafka.listener_bootstrap`) that accepts
PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512; the SCRAM credentials are written into the metadata log when
the storage is formatted (``kafka-storage format --add-scram``), the PLAIN ones into the listener's
JAAS config. ``tls_keystore=PEM`` adds a ``SASL_SSL`` listener too, serving the private key and
certificate chain in that PEM file. The ``PLAINTEXT`` listener (:attr:`LocalKafka.bootstrap`) stays
for readiness checks and admin work, and the inter-broker and controller listeners stay plaintext.

What it must not do: run in production (one replica, test credentials in a plain file, 127.0.0.1
only), be imported by the service's processing path, or kill anything it did not start (``stop``
checks that the pid is a ``kafka.Kafka`` JVM on this data directory before signalling). POSIX only
(process groups).

Command line::

    python -m streams.dev.localkafka up [--port N] [--data-dir D]   # prints the bootstrap address
    python -m streams.dev.localkafka status [--data-dir D]
    python -m streams.dev.localkafka down [--data-dir D]
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from string import Template
from types import TracebackType
from typing import Any, Self

from streams.errors import StreamsError
from streams.kafka.admin import broker_ready

__all__ = [
    "DEFAULT_HEAP",
    "KAFKA_VERSION",
    "BrokerStartError",
    "KafkaJarsMissingError",
    "LocalKafka",
    "LocalKafkaError",
    "MissingPrerequisiteError",
    "cache_dir",
    "default_libs_dir",
    "ensure_jars",
    "main",
    "new_cluster_id",
    "pick_free_ports",
    "render_server_properties",
    "security_properties",
]

logger = logging.getLogger(__name__)

#: Kafka release resolved by deploy/kafka/pom.xml (a unit test keeps the two in step).
KAFKA_VERSION = "4.4.0"
#: Broker heap. 512 MiB holds a dev/test broker with small internal topics comfortably.
DEFAULT_HEAP = "512m"
#: Kafka 4.x brokers are compiled for Java 17 (class file version 61).
MIN_JAVA_MAJOR = 17
#: Logged by KafkaRaftServer once the broker and controller are up.
STARTED_MARKER = "Kafka Server started"
#: Env var naming a folder of broker jars to use instead of the cache (e.g. a Kafka tarball's libs/).
LIBS_ENV = "SENSOR_ANOMALY_KAFKA_LIBS"

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy" / "kafka"
FETCH_SCRIPT = DEPLOY_DIR / "fetch-jars.sh"

_STATE_FILE = "localkafka.json"
_PID_FILE = "localkafka.pid"
_LOG_DIR = "logs"
_KRAFT_DIR = "kraft"
_HOST = "127.0.0.1"
_STOP_TIMEOUT_S = 30.0
_PROPERTY_KEY = re.compile(r"^[A-Za-z0-9_.\-]+$")
#: User names and passwords of ``sasl_users`` go into a JAAS line and a ``--add-scram`` argument
#: unquoted by anything else: keep them to characters that neither syntax treats specially.
_CREDENTIAL = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
#: Mechanisms the SASL listeners accept (kafka-python supports all three).
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_SCRAM_ITERATIONS = 4096  # Kafka's default and minimum for SCRAM credentials


class LocalKafkaError(StreamsError, RuntimeError):
    """The local dev/test broker cannot be prepared, started or stopped; the message says why."""


class MissingPrerequisiteError(LocalKafkaError):
    """Something the broker needs is not installed (Java 17+, the jars, Maven to fetch them).

    The message says what to install or run. Test fixtures treat it as "no broker available"
    (skip locally, fail in CI), unlike :class:`BrokerStartError`, which is a bug to look at.
    """


class KafkaJarsMissingError(MissingPrerequisiteError):
    """The broker jars are not there. Run ``deploy/kafka/fetch-jars.sh`` (needs Maven and Java 17+)."""


class BrokerStartError(LocalKafkaError):
    """The broker process exited or did not become ready in time.

    The message ends with the tail of the broker's logs; the full logs stay in ``<data dir>/logs``.
    """


# --------------------------------------------------------------------------------------------------
# Paths and jars
# --------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Cache root: ``$SENSOR_ANOMALY_CACHE`` or ``~/.cache/sensor-anomaly``.

    Examples
    --------
    >>> isinstance(cache_dir(), Path)
    True
    """
    env = os.environ.get("SENSOR_ANOMALY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sensor-anomaly"


def default_libs_dir(version: str = KAFKA_VERSION) -> Path:
    """Where ``fetch-jars.sh`` puts the jars of Kafka ``version``.

    Examples
    --------
    >>> default_libs_dir("4.4.0").parts[-2:]
    ('kafka-4.4.0', 'libs')
    """
    return cache_dir() / f"kafka-{version}" / "libs"


def _pom_digest() -> str | None:
    pom = DEPLOY_DIR / "pom.xml"
    return hashlib.sha256(pom.read_bytes()).hexdigest() if pom.is_file() else None


def _has_broker_jars(libs: Path) -> bool:
    return any(libs.glob("kafka_2.13-*.jar")) and any(libs.glob("log4j-core-*.jar"))


def _fetch_command() -> str:
    return f"{FETCH_SCRIPT}" if FETCH_SCRIPT.is_file() else "deploy/kafka/fetch-jars.sh (from the repository)"


def ensure_jars(libs_dir: Path | str | None = None, *, fetch: bool = True) -> Path:
    """Return a folder holding the broker jars, resolving them with Maven first if needed and allowed.

    Order: an explicit ``libs_dir``; else ``$SENSOR_ANOMALY_KAFKA_LIBS``; else the cache folder
    :func:`default_libs_dir`, which counts as complete when ``fetch-jars.sh`` left its marker for
    the current ``pom.xml``. Only the cache folder is ever fetched into.

    Parameters
    ----------
    libs_dir
        A folder of jars to use as is (no fetching).
    fetch
        Run ``deploy/kafka/fetch-jars.sh`` when the cache folder is incomplete (needs ``mvn``).

    Raises
    ------
    KafkaJarsMissingError
        With the exact command to run, or what to install.

    Examples
    --------
    >>> ensure_jars("/nonexistent/libs")
    Traceback (most recent call last):
    ...
    streams.dev.localkafka.KafkaJarsMissingError: no Kafka broker jars (kafka_2.13-*.jar, log4j-core-*.jar) in ...
    """
    explicit = libs_dir if libs_dir is not None else os.environ.get(LIBS_ENV) or None
    if explicit is not None:
        libs = Path(explicit).expanduser()
        if _has_broker_jars(libs):
            return libs
        raise KafkaJarsMissingError(
            f"no Kafka broker jars (kafka_2.13-*.jar, log4j-core-*.jar) in {libs}; point libs_dir/"
            f"${LIBS_ENV} at a Kafka libs folder, or leave both unset to use {default_libs_dir()} "
            f"filled by: {_fetch_command()}"
        )

    libs = default_libs_dir()
    marker = libs / ".complete"
    digest = _pom_digest()
    if marker.is_file() and _has_broker_jars(libs):
        if digest is None or marker.read_text().strip() == digest:
            return libs
        if not fetch:
            logger.warning("jars in %s were resolved from an older deploy/kafka/pom.xml; using them", libs)
            return libs
    if not fetch:
        raise KafkaJarsMissingError(
            f"Kafka {KAFKA_VERSION} broker jars are missing from {libs}; run: {_fetch_command()} "
            "(needs Maven and Java 17+)"
        )
    if not FETCH_SCRIPT.is_file():
        raise KafkaJarsMissingError(
            f"Kafka broker jars are missing from {libs} and {FETCH_SCRIPT} is not there to fetch them "
            f"(is this a repository checkout?); set ${LIBS_ENV} to a Kafka {KAFKA_VERSION} libs folder"
        )
    if shutil.which("mvn") is None:
        raise KafkaJarsMissingError(
            f"Kafka broker jars are missing from {libs} and Maven (mvn) is not on PATH to fetch them; "
            f"install Maven (e.g. apt-get install maven), then run: {FETCH_SCRIPT}"
        )
    logger.info("fetching Kafka %s jars with Maven into %s (one-off)", KAFKA_VERSION, libs)
    started = time.monotonic()
    proc = subprocess.run(["bash", str(FETCH_SCRIPT)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise KafkaJarsMissingError(
            f"{FETCH_SCRIPT} failed with exit code {proc.returncode}:\n{_tail_text(proc.stderr, 30)}"
        )
    fetched = Path(proc.stdout.strip().splitlines()[-1])
    logger.info("Kafka jars ready in %s (%.1f s)", fetched, time.monotonic() - started)
    return fetched


def _java_major_version(java: str) -> int:
    """Major version of ``java`` (8 for 1.8.x); raises MissingPrerequisiteError if it cannot run."""
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MissingPrerequisiteError(
            f"cannot run Java ({java!r}): {exc}; Kafka {KAFKA_VERSION} needs Java {MIN_JAVA_MAJOR}+ on PATH"
        ) from exc
    match = re.search(r'version "(\d+)(?:\.(\d+))?', proc.stderr + proc.stdout)
    if match is None:
        raise MissingPrerequisiteError(f"cannot read the Java version from `{java} -version`: {proc.stderr.strip()!r}")
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


# --------------------------------------------------------------------------------------------------
# Config rendering
# --------------------------------------------------------------------------------------------------


def pick_free_ports(count: int, host: str = _HOST) -> tuple[int, ...]:
    """``count`` distinct TCP ports that were free on ``host`` a moment ago.

    All sockets are held open together, so the ports are distinct; another process may still take
    one before the broker binds it (rare; the broker then fails with "Address already in use").

    Examples
    --------
    >>> a, b = pick_free_ports(2)
    >>> a != b and 1024 <= min(a, b)
    True
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return tuple(ports)


def _port_free(port: int, host: str = _HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the broker's own server sockets, so a port in TIME_WAIT after a stop counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def new_cluster_id() -> str:
    """A random KRaft cluster id: 16 random bytes, URL-safe base64 without padding (22 characters).

    Examples
    --------
    >>> cid = new_cluster_id()
    >>> len(cid), cid[0] != "-"
    (22, True)
    """
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")
        if not cid.startswith("-"):  # Kafka's Uuid.randomUuid avoids these too (CLI argument parsing)
            return cid


def _check_property(key: str, value: str) -> None:
    if not _PROPERTY_KEY.match(key):
        raise ValueError(f"extra_properties key {key!r} is not a Kafka property name")
    if "\n" in value or "\r" in value:
        raise ValueError(f"extra_properties[{key!r}] must be one line, got {value!r}")


def render_server_properties(
    *,
    broker_port: int,
    controller_port: int,
    log_dirs: Path | str,
    extra_properties: Mapping[str, str] | None = None,
    template: str | None = None,
) -> str:
    """Fill the ``server.properties`` template and apply ``extra_properties``.

    A key in ``extra_properties`` that the template already sets replaces that line (e.g.
    ``listeners`` when a SASL listener is added); other keys are appended at the end.

    Parameters
    ----------
    broker_port, controller_port
        Client and controller listener ports on 127.0.0.1.
    log_dirs
        Folder for partitions and the metadata log.
    extra_properties
        Properties to override or add, string to string.
    template
        Template text; defaults to ``deploy/kafka/server.properties``.

    Raises
    ------
    ValueError
        For a port outside 1..65535, equal ports, a placeholder without a value or a bad extra
        property; the message names it.

    Examples
    --------
    >>> text = render_server_properties(broker_port=9092, controller_port=9093, log_dirs="/tmp/k",
    ...                                 extra_properties={"num.partitions": "3", "x.y": "z"})
    >>> [l for l in text.splitlines() if l.startswith(("listeners=", "num.partitions=", "x.y="))]
    ['listeners=PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093', 'num.partitions=3', 'x.y=z']
    """
    for name, port in (("broker_port", broker_port), ("controller_port", controller_port)):
        if not 1 <= int(port) <= 65535:
            raise ValueError(f"{name} must be in 1..65535, got {port}")
    if broker_port == controller_port:
        raise ValueError(f"broker_port and controller_port must differ, both are {broker_port}")
    if template is None:
        template = (DEPLOY_DIR / "server.properties").read_text()
    try:
        text = Template(template).substitute(
            broker_port=int(broker_port), controller_port=int(controller_port), log_dirs=str(log_dirs)
        )
    except (KeyError, ValueError) as exc:
        raise ValueError(f"server.properties template has a placeholder without a value: {exc}") from exc

    extra = dict(extra_properties or {})
    for key, value in extra.items():
        _check_property(key, value)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        key = line.split("=", 1)[0].strip()
        if "=" in line and not line.lstrip().startswith("#") and key in extra:
            lines[i] = f"{key}={extra.pop(key)}"
    if extra:
        lines += ["", "############################# extra_properties #############################"]
        lines += [f"{key}={value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def _check_credentials(users: Mapping[str, str]) -> None:
    if not users:
        raise ValueError("sasl_users must name at least one user")
    for name, password in users.items():
        for what, value in (("user name", name), (f"password of {name!r}", password)):
            if not isinstance(value, str) or not _CREDENTIAL.match(value):
                raise ValueError(f"sasl_users: {what} must be 1-128 characters of A-Z a-z 0-9 _ . -, got {value!r}")


def security_properties(
    *,
    broker_port: int,
    controller_port: int,
    sasl_users: Mapping[str, str],
    sasl_plaintext_port: int,
    sasl_ssl_port: int | None = None,
    tls_keystore: Path | str | None = None,
) -> dict[str, str]:
    """Broker properties for SASL listeners beside the template's PLAINTEXT and CONTROLLER ones.

    The client-facing ``SASL_PLAINTEXT`` listener (and ``SASL_SSL`` when ``tls_keystore`` is given)
    accepts :data:`SASL_MECHANISMS`. PLAIN users are listed in the listener's JAAS config; SCRAM
    users are not (their salted credentials live in the metadata log, see :meth:`LocalKafka.start`).
    Inter-broker and controller traffic stays on the plaintext listeners.

    Parameters
    ----------
    broker_port, controller_port
        The template's PLAINTEXT and CONTROLLER ports (``listeners`` is rewritten with them).
    sasl_users
        User name -> password (characters ``A-Z a-z 0-9 _ . -``).
    sasl_plaintext_port
        Port of the ``SASL_PLAINTEXT`` listener.
    sasl_ssl_port, tls_keystore
        Port of a ``SASL_SSL`` listener and a PEM file with its unencrypted PKCS#8 private key
        followed by its certificate chain; both or neither.

    Raises
    ------
    ValueError
        For a bad user name or password, or only one of ``sasl_ssl_port``/``tls_keystore``.

    Examples
    --------
    >>> props = security_properties(broker_port=9092, controller_port=9093, sasl_users={"alice": "pw"},
    ...                             sasl_plaintext_port=9094)
    >>> props["listeners"]
    'PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093,SASL_PLAINTEXT://127.0.0.1:9094'
    >>> props["listener.name.sasl_plaintext.plain.sasl.jaas.config"]
    'org.apache.kafka.common.security.plain.PlainLoginModule required user_alice="pw";'
    """
    _check_credentials(sasl_users)
    if (sasl_ssl_port is None) != (tls_keystore is None):
        raise ValueError("sasl_ssl_port and tls_keystore go together: give both or neither")
    listeners = {"SASL_PLAINTEXT": int(sasl_plaintext_port)}
    if sasl_ssl_port is not None:
        listeners["SASL_SSL"] = int(sasl_ssl_port)
    extra = "".join(f",{name}://{_HOST}:{port}" for name, port in listeners.items())
    props = {
        "listeners": f"PLAINTEXT://{_HOST}:{broker_port},CONTROLLER://{_HOST}:{controller_port}{extra}",
        "advertised.listeners": f"PLAINTEXT://{_HOST}:{broker_port}{extra}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        + "".join(f",{name}:{name}" for name in listeners),
        "sasl.enabled.mechanisms": ",".join(SASL_MECHANISMS),
    }
    plain_users = " ".join(f'user_{name}="{password}"' for name, password in sasl_users.items())
    for name in listeners:
        prefix = f"listener.name.{name.lower()}"
        props[f"{prefix}.sasl.enabled.mechanisms"] = ",".join(SASL_MECHANISMS)
        props[f"{prefix}.plain.sasl.jaas.config"] = (
            f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain_users};"
        )
        for mechanism in ("scram-sha-256", "scram-sha-512"):
            props[f"{prefix}.{mechanism}.sasl.jaas.config"] = (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            )
    if tls_keystore is not None:
        props["listener.name.sasl_ssl.ssl.keystore.type"] = "PEM"
        props["listener.name.sasl_ssl.ssl.keystore.location"] = str(tls_keystore)
        props["listener.name.sasl_ssl.ssl.client.auth"] = "none"
    return props


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------


def _tail_text(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _tail_file(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return f"({path} does not exist)"
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - 64 * 1024))
        return _tail_text(fh.read().decode("utf-8", "replace"), lines)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_our_broker(pid: int, data_dir: Path) -> bool:
    """Whether ``pid`` is a live ``kafka.Kafka`` JVM started on ``data_dir`` (guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return _pid_alive(pid)  # no /proc (macOS): trust the pid file
    args = [a.decode("utf-8", "replace") for a in cmdline]
    return "kafka.Kafka" in args and str(data_dir / "server.properties") in args


class LocalKafka:
    """A single-node KRaft broker run from Maven-resolved jars; a context manager.

    Parameters
    ----------
    data_dir
        Folder for config, data and logs. ``None``: a fresh temporary folder, deleted by
        ``close()``/``__exit__`` unless the broker failed (logs are kept for reading then).
    port, controller_port
        Listener ports on 127.0.0.1. ``None``: the ports a previous run on ``data_dir`` used,
        else free ones.
    libs_dir
        Folder of broker jars; ``None``: see :func:`ensure_jars`.
    heap
        JVM ``-Xmx`` value.
    extra_properties
        Broker properties to override or add (see :func:`render_server_properties`).
    start_timeout_s
        How long ``start`` waits for the broker to be ready.
    fetch_jars
        Resolve missing jars with Maven (``deploy/kafka/fetch-jars.sh``) instead of failing.
    java
        The ``java`` executable (17+).
    jvm_options
        Extra JVM flags, after the defaults (so they win), e.g. ``["-XX:TieredStopAtLevel=1"]``.
    sasl_users
        User name -> password: adds a ``SASL_PLAINTEXT`` listener (PLAIN, SCRAM-SHA-256,
        SCRAM-SHA-512; see :func:`security_properties`). SCRAM credentials are created when the
        storage is first formatted, so a later start on the same data directory keeps the users
        of the first one.
    tls_keystore
        PEM file (unencrypted PKCS#8 key, then the certificate chain): adds a ``SASL_SSL`` listener
        too. Needs ``sasl_users``.

    Examples
    --------
    Not run as a doctest (it starts a JVM)::

        with LocalKafka() as kafka:
            producer = KafkaProducer(bootstrap_servers=kafka.bootstrap)
    """

    def __init__(
        self,
        data_dir: Path | str | None = None,
        *,
        port: int | None = None,
        controller_port: int | None = None,
        libs_dir: Path | str | None = None,
        heap: str = DEFAULT_HEAP,
        extra_properties: Mapping[str, str] | None = None,
        start_timeout_s: float = 90.0,
        fetch_jars: bool = True,
        java: str = "java",
        jvm_options: Sequence[str] = (),
        sasl_users: Mapping[str, str] | None = None,
        tls_keystore: Path | str | None = None,
    ) -> None:
        if not re.fullmatch(r"\d+[kKmMgG]?", heap):
            raise ValueError(f"heap must look like '512m' or '1g' (a java -Xmx value), got {heap!r}")
        if start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s must be > 0, got {start_timeout_s}")
        self._owns_data_dir = data_dir is None
        self.data_dir = (
            Path(tempfile.mkdtemp(prefix="sensor-anomaly-kafka-"))
            if data_dir is None
            else Path(data_dir).expanduser().resolve()
        )
        self._requested_port = port
        self._requested_controller_port = controller_port
        self._libs_dir = libs_dir
        self.heap = heap
        self.extra_properties = dict(extra_properties or {})
        for key, value in self.extra_properties.items():
            _check_property(key, value)
        self.start_timeout_s = start_timeout_s
        self.fetch_jars = fetch_jars
        self.java = java
        self.jvm_options = tuple(jvm_options)
        self.sasl_users = dict(sasl_users or {})
        if self.sasl_users:
            _check_credentials(self.sasl_users)
        if tls_keystore is not None and not self.sasl_users:
            raise ValueError("tls_keystore adds a SASL_SSL listener and needs sasl_users")
        self.tls_keystore = None if tls_keystore is None else Path(tls_keystore).expanduser().resolve()
        self.listener_ports: dict[str, int] = {}
        self.port: int | None = None
        self.controller_port: int | None = None
        self.cluster_id: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._failed = False

    # ---------------------------------------------------------------- properties
    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:<port>``, the address clients connect to (known once started)."""
        if self.port is None:
            state = self._read_state()
            if "broker_port" not in state:
                raise LocalKafkaError(f"no broker has been started on {self.data_dir} yet")
            return f"{_HOST}:{state['broker_port']}"
        return f"{_HOST}:{self.port}"

    def listener_bootstrap(self, listener: str) -> str:
        """``127.0.0.1:<port>`` of the ``SASL_PLAINTEXT`` or ``SASL_SSL`` listener (known once started)."""
        ports = self.listener_ports or self._read_state().get("listener_ports", {})
        if listener not in ports:
            have = ", ".join(sorted(ports)) or "none (pass sasl_users / tls_keystore)"
            raise LocalKafkaError(f"no {listener} listener on {self.data_dir}; listeners with security: {have}")
        return f"{_HOST}:{ports[listener]}"

    @property
    def logs_dir(self) -> Path:
        """``<data dir>/logs``: server.log, controller.log, state-change.log, stdout.log."""
        return self.data_dir / _LOG_DIR

    @property
    def pid(self) -> int | None:
        """Pid of the running broker (also its process group id), or ``None``."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        pid = self._read_pid()
        return pid if pid is not None and _is_our_broker(pid, self.data_dir) else None

    def is_running(self) -> bool:
        """Whether the broker process of this data directory is alive (not whether it is ready)."""
        return self.pid is not None

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of ``server.log`` and of the JVM's console output, for error messages."""
        return (
            f"--- {self.logs_dir / 'server.log'} (last {lines} lines) ---\n"
            f"{_tail_file(self.logs_dir / 'server.log', lines)}\n"
            f"--- {self.logs_dir / 'stdout.log'} (last {lines} lines) ---\n"
            f"{_tail_file(self.logs_dir / 'stdout.log', lines)}"
        )

    # ---------------------------------------------------------------- lifecycle
    def start(self, *, detach: bool = False) -> Self:
        """Prepare the data directory, format storage on first use, launch the broker, wait until ready.

        Parameters
        ----------
        detach
            Leave the broker running when this Python process exits (the CLI's ``up``). Otherwise
            an ``atexit`` hook stops it.

        Raises
        ------
        MissingPrerequisiteError
            No Java 17+, no jars (:class:`KafkaJarsMissingError`).
        LocalKafkaError
            A port is taken, the data directory is in use, formatting failed.
        BrokerStartError
            The broker exited or was not ready within ``start_timeout_s`` (log tail included).
        """
        if self._proc is not None and self._proc.poll() is None:
            return self
        running = self.pid
        if running is not None:
            raise LocalKafkaError(
                f"a broker is already running on {self.data_dir} (pid {running}); stop it first: "
                f"python -m streams.dev.localkafka down --data-dir {self.data_dir}"
            )
        libs = ensure_jars(self._libs_dir, fetch=self.fetch_jars)
        major = _java_major_version(self.java)
        if major < MIN_JAVA_MAJOR:
            raise MissingPrerequisiteError(
                f"Kafka {KAFKA_VERSION} needs Java {MIN_JAVA_MAJOR}+, but {self.java!r} is Java {major}"
            )
        props = self._prepare_data_dir()
        self._format_storage(libs, props)
        self._launch(libs, props, detach=detach)
        return self

    def stop(self, timeout_s: float = _STOP_TIMEOUT_S) -> None:
        """SIGTERM the broker's process group (a controlled shutdown), then SIGKILL after ``timeout_s``.

        Works for a broker started by another process on the same data directory (pid file).
        Does nothing if none is running.
        """
        proc, self._proc = self._proc, None
        atexit.unregister(self._stop_at_exit)
        pid = proc.pid if proc is not None and proc.poll() is None else self.pid
        if pid is None:
            self._remove_pid_file()
            return
        logger.info("stopping Kafka broker pid %d on %s", pid, self.data_dir)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        if not self._wait_exit(proc, pid, timeout_s):
            logger.warning("broker pid %d did not stop within %.0f s; killing it", pid, timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            self._wait_exit(proc, pid, 10.0)
        self._remove_pid_file()

    def restart(self, timeout_s: float = _STOP_TIMEOUT_S) -> Self:
        """Stop, then start again on the same data directory, ports and cluster id (data is kept)."""
        self.stop(timeout_s)
        return self.start()

    def close(self) -> None:
        """Stop the broker; delete a temporary data directory unless the broker failed."""
        self.stop()
        if self._owns_data_dir and not self._failed:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._failed = True
        self.close()

    def __repr__(self) -> str:
        return f"LocalKafka(data_dir={str(self.data_dir)!r}, port={self.port}, running={self.is_running()})"

    # ---------------------------------------------------------------- internals
    def _read_state(self) -> dict[str, Any]:
        path = self.data_dir / _STATE_FILE
        if not path.is_file():
            return {}
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise LocalKafkaError(f"{path} is not valid JSON ({exc}); delete it to pick new ports") from exc
        return state if isinstance(state, dict) else {}

    def _read_pid(self) -> int | None:
        try:
            return int((self.data_dir / _PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return None

    def _remove_pid_file(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / _PID_FILE).unlink()

    def _prepare_data_dir(self) -> Path:
        """Choose ports, write server.properties, log4j2.xml and localkafka.json; return the config path."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        state = self._read_state()
        broker_port = self._requested_port or state.get("broker_port")
        controller_port = self._requested_controller_port or state.get("controller_port")
        wanted = ["SASL_PLAINTEXT"] if self.sasl_users else []
        wanted += ["SASL_SSL"] if self.tls_keystore is not None else []
        listener_ports = {k: int(v) for k, v in state.get("listener_ports", {}).items() if k in wanted}
        if broker_port is None or controller_port is None or len(listener_ports) < len(wanted):
            taken = (broker_port, controller_port, *listener_ports.values())
            free = iter(p for p in pick_free_ports(3 + len(wanted)) if p not in taken)
            broker_port = broker_port or next(free)
            controller_port = controller_port or next(free)
            listener_ports |= {name: next(free) for name in wanted if name not in listener_ports}
        if broker_port == controller_port:
            raise LocalKafkaError(f"broker and controller ports must differ, both are {broker_port}")
        named = [("broker port", broker_port), ("controller port", controller_port)]
        named += [(f"{name} port", port) for name, port in listener_ports.items()]
        for name, port in named:
            if not _port_free(int(port)):
                raise LocalKafkaError(f"{name} {port} on {_HOST} is already in use; pass another port or free it")
        self.port, self.controller_port = int(broker_port), int(controller_port)
        self.listener_ports = listener_ports
        self.cluster_id = state.get("cluster_id") or new_cluster_id()
        extra_properties = dict(self.extra_properties)
        if self.sasl_users:
            security = security_properties(
                broker_port=self.port,
                controller_port=self.controller_port,
                sasl_users=self.sasl_users,
                sasl_plaintext_port=listener_ports["SASL_PLAINTEXT"],
                sasl_ssl_port=listener_ports.get("SASL_SSL"),
                tls_keystore=self.tls_keystore,
            )
            extra_properties = security | extra_properties  # explicit extra_properties win

        props = self.data_dir / "server.properties"
        props.write_text(
            render_server_properties(
                broker_port=self.port,
                controller_port=self.controller_port,
                log_dirs=self.data_dir / _KRAFT_DIR,
                extra_properties=extra_properties,
            )
        )
        shutil.copyfile(DEPLOY_DIR / "log4j2.xml", self.data_dir / "log4j2.xml")
        state.update(
            broker_port=self.port,
            controller_port=self.controller_port,
            cluster_id=self.cluster_id,
            kafka_version=KAFKA_VERSION,
            listener_ports=listener_ports,
        )
        (self.data_dir / _STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        return props

    def _java_command(self, libs: Path, main_class: str, *args: str) -> list[str]:
        # Kafka's own scripts use G1 with short pauses; a GC chosen in jvm_options replaces it
        # (the JVM refuses two).
        picks_gc = any(re.fullmatch(r"-XX:\+Use\w+GC", opt) for opt in self.jvm_options)
        gc = [] if picks_gc else ["-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20"]
        return [
            self.java,
            f"-Xmx{self.heap}",
            *gc,
            # C1 only: on a busy 2-core machine the broker is ready about twice as fast (measured:
            # 7-10 s instead of 15-20 s at load 9); a dev broker never needs C2's peak throughput.
            # Append "-XX:TieredStopAtLevel=4" to jvm_options for full JIT (the last flag wins).
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.xml'}",
            f"-Dkafka.logs.dir={self.logs_dir}",
            *self.jvm_options,
            "-cp",
            f"{libs}/*",
            main_class,
            *args,
        ]

    def _format_storage(self, libs: Path, props: Path) -> None:
        if (self.data_dir / _KRAFT_DIR / "meta.properties").is_file():
            return
        # Static quorum (controller.quorum.voters): no --standalone / --initial-controllers.
        cmd = self._java_command(
            libs,
            "kafka.tools.StorageTool",
            "format",
            "--config",
            str(props),
            "--cluster-id",
            str(self.cluster_id),
            *self._scram_arguments(),
        )
        # The storage tool needs no big heap; the broker's -Xmx is harmless here.
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=self.data_dir)
        if proc.returncode != 0:
            self._failed = True
            raise LocalKafkaError(
                f"formatting KRaft storage in {self.data_dir / _KRAFT_DIR} failed (exit {proc.returncode}):\n"
                f"{_tail_text(proc.stdout + proc.stderr, 30)}"
            )
        logger.info("formatted KRaft storage in %s (cluster id %s)", self.data_dir / _KRAFT_DIR, self.cluster_id)

    def _scram_arguments(self) -> list[str]:
        """``--add-scram`` arguments creating every SASL user for both SCRAM mechanisms."""
        args: list[str] = []
        for name, password in self.sasl_users.items():
            for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                args += ["--add-scram", f"{mechanism}=[name={name},password={password},iterations={_SCRAM_ITERATIONS}]"]
        return args

    def _launch(self, libs: Path, props: Path, *, detach: bool) -> None:
        server_log = self.logs_dir / "server.log"
        log_offset = server_log.stat().st_size if server_log.is_file() else 0
        cmd = self._java_command(libs, "kafka.Kafka", str(props))
        started = time.monotonic()
        with (self.logs_dir / "stdout.log").open("ab") as console:
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() signals the JVM and nothing else
            )
        (self.data_dir / _PID_FILE).write_text(f"{self._proc.pid}\n")
        if not detach:
            atexit.register(self._stop_at_exit)
        logger.info("starting Kafka %s broker pid %d at %s", KAFKA_VERSION, self._proc.pid, self.bootstrap)
        try:
            self._wait_ready(server_log, log_offset, started)
        except BaseException:
            self._failed = True
            self.stop(timeout_s=5.0)
            raise
        logger.info("Kafka broker ready at %s in %.1f s", self.bootstrap, time.monotonic() - started)

    def _wait_ready(self, server_log: Path, log_offset: int, started: float) -> None:
        deadline = started + self.start_timeout_s
        logged = False
        while time.monotonic() < deadline:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise BrokerStartError(
                    f"Kafka broker on {self.data_dir} exited with code {code} during startup\n{self.log_tail()}"
                )
            if not logged and server_log.is_file():
                with server_log.open("rb") as fh:
                    fh.seek(log_offset)
                    logged = STARTED_MARKER.encode() in fh.read()
            if logged and broker_ready(self.bootstrap, timeout_s=2.0):
                return
            time.sleep(0.25)
        raise BrokerStartError(
            f"Kafka broker on {self.data_dir} not ready at {self.bootstrap} after "
            f"{self.start_timeout_s:.0f} s (started message logged: {logged})\n{self.log_tail()}"
        )

    def _wait_exit(self, proc: subprocess.Popen[bytes] | None, pid: int, timeout_s: float) -> bool:
        if proc is not None:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                return True
            time.sleep(0.2)
        return not _pid_alive(pid)

    def _stop_at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(timeout_s=10.0)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _default_cli_data_dir() -> Path:
    return cache_dir() / "localkafka"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m streams.dev.localkafka up|down|status``; returns the exit code.

    ``up`` starts a detached broker (or finds the one already running) and prints its bootstrap
    address alone on stdout, so ``export KAFKA_BOOTSTRAP_SERVERS=$(python -m streams.dev.localkafka up)``
    works. ``status`` exits 0 when the broker answers, 1 when it is stopped, 2 when the process runs
    but does not answer. ``down`` stops it.
    """
    parser = argparse.ArgumentParser(prog="python -m streams.dev.localkafka", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--data-dir", type=Path, default=_default_cli_data_dir(), help="default: %(default)s")
    parser.add_argument("--port", type=int, default=None, help="client port (default: as last time, else free)")
    parser.add_argument("--controller-port", type=int, default=None)
    parser.add_argument("--heap", default=DEFAULT_HEAP, help="JVM -Xmx (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    parser.add_argument(
        "--jvm-option",
        action="append",
        default=[],
        help="extra JVM flag, repeatable; write --jvm-option=-XX:TieredStopAtLevel=4",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)

    kafka = LocalKafka(
        args.data_dir,
        port=args.port,
        controller_port=args.controller_port,
        heap=args.heap,
        start_timeout_s=args.timeout,
        jvm_options=args.jvm_option,
    )
    try:
        if args.command == "up":
            if kafka.is_running():
                print(f"already running (pid {kafka.pid})", file=sys.stderr)
            else:
                kafka.start(detach=True)
                print(f"Kafka {KAFKA_VERSION} up, pid {kafka.pid}, logs in {kafka.logs_dir}", file=sys.stderr)
            print(kafka.bootstrap)
            return 0
        if args.command == "down":
            was_running = kafka.is_running()
            kafka.stop()
            print("stopped" if was_running else "not running", file=sys.stderr)
            return 0
        if not kafka.is_running():
            print(f"stopped (data dir {kafka.data_dir})")
            return 1
        if broker_ready(kafka.bootstrap):
            print(f"running pid {kafka.pid} at {kafka.bootstrap} (data dir {kafka.data_dir})")
            return 0
        print(f"process pid {kafka.pid} is alive but {kafka.bootstrap} does not answer; see {kafka.logs_dir}")
        return 2
    except LocalKafkaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
