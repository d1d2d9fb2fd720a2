"""Broker reachability checks and idempotent topic creation through kafka-python's admin client.

Why this module exists: the local broker (:mod:`streams.dev.localkafka`), the test fixtures and the
service all need the same two things before they produce a single record: "is a broker answering
at this address?" and "make sure these topics exist with these partition counts". Doing it in one
place keeps the kafka-python admin API details (dict-based ``create_topics``, error codes in the
response, waiting for partition leaders) out of every caller.

What it must not do: choose topic names, partition counts or configs (the caller's settings do),
delete topics, or change existing topics. A topic that already exists is left as it is; callers
that need co-partitioning (the state changelog) compare :func:`partition_counts` themselves.
Security settings (SASL/SSL) are passed through as kafka-python client keywords, untouched.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from streams.errors import AuthenticationError, BrokerUnavailableError

__all__ = [
    "TopicSpec",
    "admin_client",
    "broker_ready",
    "check_authentication",
    "ensure_topics",
    "partition_counts",
    "wait_for_broker",
]

logger = logging.getLogger(__name__)

# kafka-python's default bootstrap timeout is 30 s; a readiness probe must answer faster than that.
_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class TopicSpec:
    """How a topic should be created if it is missing.

    Parameters
    ----------
    partitions
        Number of partitions (>= 1).
    replication_factor
        Replicas per partition (>= 1); 1 on the single-node dev broker.
    configs
        Topic-level configs, e.g. ``{"cleanup.policy": "compact"}`` for a changelog.

    Examples
    --------
    >>> TopicSpec(partitions=4, configs={"cleanup.policy": "compact"}).partitions
    4
    >>> TopicSpec(partitions=0)
    Traceback (most recent call last):
    ...
    ValueError: TopicSpec.partitions must be >= 1, got 0
    """

    partitions: int = 1
    replication_factor: int = 1
    configs: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ValueError(f"TopicSpec.partitions must be >= 1, got {self.partitions}")
        if self.replication_factor < 1:
            raise ValueError(f"TopicSpec.replication_factor must be >= 1, got {self.replication_factor}")


def admin_client(
    bootstrap: str,
    *,
    client_id: str = "sensor-anomaly-admin",
    timeout_s: float = 10.0,
    **client_config: Any,
) -> KafkaAdminClient:
    """Connect a kafka-python admin client; raises if no broker answers within ``timeout_s``.

    Parameters
    ----------
    bootstrap
        ``host:port[,host:port...]``.
    client_id
        Shown in broker logs and quotas.
    timeout_s
        Bound on bootstrapping (finding a broker) and on each request.
    **client_config
        Extra ``KafkaAdminClient`` keywords, e.g. ``security_protocol``, ``sasl_mechanism``.

    Returns
    -------
    KafkaAdminClient
        Close it when done (``client.close()``).
    """
    timeout_ms = int(timeout_s * 1000)
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "client_id": client_id,
        "bootstrap_timeout_ms": timeout_ms,
        "request_timeout_ms": max(timeout_ms, 1000),
    }
    config.update(client_config)
    return KafkaAdminClient(**config)


def broker_ready(bootstrap: str, *, timeout_s: float = _PROBE_TIMEOUT_S, **client_config: Any) -> bool:
    """Whether a broker at ``bootstrap`` answers a metadata request within about ``timeout_s``.

    Never raises for an unreachable or misbehaving broker; it returns ``False`` and logs why at
    DEBUG level.

    Examples
    --------
    >>> broker_ready("127.0.0.1:1", timeout_s=0.5)   # nothing listens on port 1
    False
    """
    try:
        client = admin_client(bootstrap, client_id="sensor-anomaly-probe", timeout_s=timeout_s, **client_config)
    except (KafkaError, OSError, ValueError) as exc:
        logger.debug("broker at %s not reachable: %r", bootstrap, exc)
        return False
    try:
        cluster = client.describe_cluster()
        return bool(cluster.get("brokers"))
    except (KafkaError, OSError) as exc:
        logger.debug("broker at %s answered but describe_cluster failed: %r", bootstrap, exc)
        return False
    finally:
        client.close()


def wait_for_broker(
    bootstrap: str,
    *,
    timeout_s: float = 60.0,
    poll_interval_s: float = 0.5,
    **client_config: Any,
) -> None:
    """Block until :func:`broker_ready` holds for ``bootstrap``.

    Raises
    ------
    streams.errors.BrokerUnavailableError
        If no broker answered within ``timeout_s``; the message names the address.

    Examples
    --------
    >>> wait_for_broker("127.0.0.1:1", timeout_s=0.5)
    Traceback (most recent call last):
    ...
    streams.errors.BrokerUnavailableError: no Kafka broker answered at 127.0.0.1:1 within 0.5 s
    """
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if broker_ready(bootstrap, timeout_s=max(0.5, min(_PROBE_TIMEOUT_S, remaining)), **client_config):
            return
        if time.monotonic() >= deadline:
            raise BrokerUnavailableError(f"no Kafka broker answered at {bootstrap} within {timeout_s:g} s")
        time.sleep(poll_interval_s)


def ensure_topics(
    admin: KafkaAdminClient,
    topics: Mapping[str, TopicSpec],
    *,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create the topics that do not exist yet and wait until every one has a partition leader.

    Existing topics are left untouched (their partition count may differ from the spec; see
    :func:`partition_counts`).

    Parameters
    ----------
    admin
        From :func:`admin_client`.
    topics
        Topic name -> :class:`TopicSpec`.
    timeout_s
        Bound on creation and on waiting for leaders.

    Returns
    -------
    list of str
        Names of the topics this call created (in the order given).

    Raises
    ------
    kafka.errors.KafkaError
        If the broker rejects a topic for any reason other than "already exists"; the message
        names the topic and the broker's error.
    """
    if not topics:
        return []
    request = {
        name: {
            "num_partitions": spec.partitions,
            "replication_factor": spec.replication_factor,
            "configs": dict(spec.configs),
        }
        for name, spec in topics.items()
    }
    timeout_ms = int(timeout_s * 1000)
    response = admin.create_topics(request, timeout_ms=timeout_ms, raise_errors=False)
    created: list[str] = []
    for result in response["topics"]:
        name, code = result["name"], result["error_code"]
        if code == 0:
            created.append(name)
            continue
        error_cls = for_code(code)
        if error_cls is TopicAlreadyExistsError:
            logger.debug("topic %s already exists; left unchanged", name)
            continue
        raise error_cls(f"cannot create topic {name!r}: {error_cls.__name__}: {result.get('error_message')}")
    admin.wait_for_topics(list(topics), timeout_ms=timeout_ms)
    if created:
        logger.info("created topics %s", ", ".join(f"{n}[{topics[n].partitions}]" for n in created))
    return [name for name in topics if name in created]


def partition_counts(admin: KafkaAdminClient, names: list[str]) -> dict[str, int]:
    """Partition count per existing topic; topics that do not exist are left out.

    Examples
    --------
    >>> partition_counts(None, [])   # no names, no request
    {}
    """
    if not names:
        return {}
    counts: dict[str, int] = {}
    for topic in admin.describe_topics(names):
        if topic.get("error_code", 0) == 0:
            counts[topic["name"]] = len(topic.get("partitions") or [])
    return counts


def check_authentication(bootstrap: str, *, timeout_s: float = 10.0, **security: Any) -> None:
    """Authenticate once to the first bootstrap server that accepts a connection, outside kafka-python.

    Why: kafka-python 3.0 treats a refused SASL login like an unreachable broker. Its bootstrap loop
    logs the failure and retries until ``bootstrap_timeout_ms``, then raises "Unable to bootstrap";
    and the broker often closes the connection (``connection.failed.authentication.delay.ms``)
    before its error response is read, so not even the log says why. This probe speaks the two SASL
    requests itself (SaslHandshake, SaslAuthenticate, with kafka-python's mechanism classes) and
    tells a wrong password from a broker that is not there.

    Parameters
    ----------
    bootstrap
        ``host:port[,host:port...]``; the servers are tried in order until one accepts TCP.
    timeout_s
        Bound on the connection, TLS handshake and each request.
    **security
        kafka-python keywords (``ServiceConfig.kafka_security()``). Without a SASL protocol this
        only checks TLS (``SSL``) or returns at once (``PLAINTEXT``).

    Raises
    ------
    streams.errors.AuthenticationError
        The broker refused the credentials (its message is included), closed the connection during
        authentication, does not enable the mechanism, or its certificate failed verification.
    streams.errors.BrokerUnavailableError
        No bootstrap server accepted a TCP connection within ``timeout_s`` (retrying may help).

    Examples
    --------
    >>> check_authentication("127.0.0.1:1", timeout_s=0.5, security_protocol="SASL_PLAINTEXT",
    ...                      sasl_mechanism="PLAIN", sasl_plain_username="u", sasl_plain_password="p")
    Traceback (most recent call last):
    ...
    streams.errors.BrokerUnavailableError: no Kafka broker accepted a connection at 127.0.0.1:1 ...
    """
    from kafka.net.sasl import get_sasl_mechanism
    from kafka.protocol.parser import KafkaProtocol
    from kafka.protocol.sasl import SaslAuthenticateRequest, SaslHandshakeRequest

    protocol = security.get("security_protocol", "PLAINTEXT")
    if protocol == "PLAINTEXT":
        return
    sock, host, errors = None, "", []
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s)
            break
        except (OSError, ValueError) as exc:
            errors.append(f"{server.strip()}: {exc}")
    if sock is None:
        raise BrokerUnavailableError(f"no Kafka broker accepted a connection at {bootstrap} ({'; '.join(errors)})")
    user, mechanism_name = security.get("sasl_plain_username"), security.get("sasl_mechanism")
    who = f"user {user!r} with {mechanism_name}" if protocol.startswith("SASL") else "TLS"
    try:
        if protocol.endswith("SSL"):
            sock = _tls_wrap(sock, host, security)
        if not protocol.startswith("SASL"):
            return
        wire = KafkaProtocol(client_id="sensor-anomaly-auth-check")

        def request(message: Any) -> Any:
            wire.send_request(message)
            sock.sendall(wire.send_bytes())
            while True:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionResetError("connection closed by the broker")
                responses = wire.receive_bytes(data)
                if responses:
                    return responses[0][1]

        handshake = request(SaslHandshakeRequest(mechanism=mechanism_name, version=1))
        if handshake.error_code != 0 or mechanism_name not in handshake.mechanisms:
            raise AuthenticationError(f"Kafka at {bootstrap} does not accept SASL mechanism {mechanism_name} "
                                      f"(enabled: {', '.join(handshake.mechanisms) or 'none'}); set sasl_mechanism")
        mechanism = get_sasl_mechanism(mechanism_name)(host=host, **security)
        while not mechanism.is_done():
            try:
                response = request(SaslAuthenticateRequest(auth_bytes=mechanism.auth_bytes(), version=1))
            except ConnectionResetError:
                raise AuthenticationError(
                    f"Kafka at {bootstrap} closed the connection during SASL authentication of {who}: "
                    "the user name or password is wrong (check sasl_username / sasl_password)") from None
            if response.error_code != 0:
                raise AuthenticationError(f"Kafka at {bootstrap} refused {who}: {response.error_message}")
            mechanism.receive(response.auth_bytes)
        if not mechanism.is_authenticated():
            raise AuthenticationError(f"Kafka at {bootstrap}: SASL authentication of {who} did not complete")
    except ssl.SSLError as exc:
        raise AuthenticationError(f"TLS handshake with Kafka at {bootstrap} failed: {exc.reason or exc} "
                                  "(check ssl_cafile and that the broker's certificate names this host)") from exc
    except (TimeoutError, OSError) as exc:
        raise BrokerUnavailableError(f"Kafka at {bootstrap} did not complete authentication of {who}: {exc}") from exc
    finally:
        sock.close()


def _tls_wrap(sock: socket.socket, host: str, security: dict[str, Any]) -> ssl.SSLSocket:
    """The TLS client side as kafka-python builds it (CA file or system CAs, optional client certificate)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = bool(security.get("ssl_check_hostname", True))
    if security.get("ssl_cafile"):
        context.load_verify_locations(security["ssl_cafile"])
    else:
        context.load_default_certs()
    if security.get("ssl_certfile"):
        context.load_cert_chain(security["ssl_certfile"], security.get("ssl_keyfile"), security.get("ssl_password"))
    return context.wrap_socket(sock, server_hostname=host)
