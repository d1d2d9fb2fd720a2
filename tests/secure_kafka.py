"""A real Kafka broker with SASL and TLS listeners, shared by the security and deployment tests.

Why this module exists: the client security settings (``ServiceConfig.kafka_security()``) and the
Kubernetes configuration (SASL_SSL + SCRAM-SHA-512 from a ConfigMap and a Secret) can only be shown
to work against a broker that really authenticates. :func:`secure_kafka` starts one
:class:`streams.dev.localkafka.LocalKafka` per test session with three client listeners:

* ``PLAINTEXT`` (``bootstrap``): admin work and test data, no authentication;
* ``SASL_PLAINTEXT`` (``sasl_plaintext``): PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512;
* ``SASL_SSL`` (``sasl_ssl``): the same mechanisms over TLS, with a server certificate for
  127.0.0.1 signed by a throw-away CA (``ca_file``) that ``openssl`` makes for the session.

The SCRAM credentials are created when the storage is formatted (``kafka-storage format
--add-scram``), the PLAIN ones in the listener's JAAS config (see :mod:`streams.dev.localkafka`).

Pytest caches a session fixture per module that imports it, so the broker and the trained model are
module-level singletons here: every test file that imports the fixtures gets the same broker. Like
``tests/kafka_broker.py``, a missing prerequisite (Java, the broker jars, openssl) skips locally and
fails under ``CI=true``.

What it must not do: mock anything, or leave the broker running (LocalKafka stops it at exit, and
the fixture at the end of the session).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

from streams.config import Secret, ServiceConfig
from streams.dev.localkafka import LocalKafka, MissingPrerequisiteError

__all__ = [
    "PASSWORD",
    "USER",
    "SecureBroker",
    "make_tls_files",
    "secure_kafka",
    "security_model",
]

logger = logging.getLogger(__name__)

USER = "sensor-anomaly"
PASSWORD = "s3cret-for-tests"

_BROKER: SecureBroker | None = None
_MODEL: Path | None = None


@dataclass(frozen=True)
class SecureBroker:
    """Addresses and credentials of the session's authenticating broker."""

    bootstrap: str
    sasl_plaintext: str
    sasl_ssl: str
    ca_file: Path
    user: str
    password: str
    local: LocalKafka

    def client_config(self, protocol: str, mechanism: str = "SCRAM-SHA-512", *, password: str | None = None,
                      model_dir: Path | str = "/nonexistent") -> dict[str, Any]:
        """kafka-python keywords for ``protocol``, built by the service's own :meth:`ServiceConfig.kafka_security`."""
        bootstrap = {"PLAINTEXT": self.bootstrap, "SASL_PLAINTEXT": self.sasl_plaintext,
                     "SASL_SSL": self.sasl_ssl}[protocol]
        config = ServiceConfig(
            bootstrap_servers=bootstrap, model_dir=Path(model_dir), security_protocol=protocol,  # type: ignore[arg-type]
            sasl_mechanism=None if protocol == "PLAINTEXT" else mechanism,  # type: ignore[arg-type]
            sasl_username=None if protocol == "PLAINTEXT" else self.user,
            sasl_password=None if protocol == "PLAINTEXT" else Secret(self.password if password is None else password),
            ssl_cafile=self.ca_file if protocol.endswith("SSL") else None)
        return {"bootstrap_servers": bootstrap, **config.kafka_security()}


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
        pytest.fail(f"CI=true and the SASL/TLS test broker cannot run: {reason}", pytrace=False)
    pytest.skip(f"SASL/TLS test broker cannot run: {reason}")


def make_tls_files(directory: Path) -> tuple[Path, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost, made with the ``openssl`` command.

    Returns ``(ca_file, keystore)``: the CA certificate (PEM), and the broker's PEM keystore (the
    unencrypted PKCS#8 private key, then the certificate chain), as Kafka's ``ssl.keystore.type=PEM``
    reads it. Raises :class:`FileNotFoundError` when ``openssl`` is not installed.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("openssl is not on PATH (apt-get install openssl)")
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=sensor-anomaly test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "server.ext")
    run("pkcs8", "-topk8", "-nocrypt", "-in", "server.key", "-out", "server.pk8")
    keystore = directory / "keystore.pem"
    keystore.write_text("".join((directory / name).read_text() for name in ("server.pk8", "server.pem", "ca.pem")))
    return directory / "ca.pem", keystore


def _start_broker(root: Path) -> SecureBroker:
    try:
        ca_file, keystore = make_tls_files(root / "tls")
    except FileNotFoundError as exc:
        _unavailable(str(exc))
    broker = LocalKafka(root / "kafka", sasl_users={USER: PASSWORD}, tls_keystore=keystore, start_timeout_s=120.0)
    try:
        broker.start()
    except MissingPrerequisiteError as exc:
        _unavailable(str(exc))
    return SecureBroker(bootstrap=broker.bootstrap, sasl_plaintext=broker.listener_bootstrap("SASL_PLAINTEXT"),
                        sasl_ssl=broker.listener_bootstrap("SASL_SSL"), ca_file=ca_file, user=USER,
                        password=PASSWORD, local=broker)


@pytest.fixture(scope="session")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    """The session's broker with SASL_PLAINTEXT and SASL_SSL listeners (started on first use)."""
    global _BROKER
    if _BROKER is None or not _BROKER.local.is_running():
        _BROKER = _start_broker(tmp_path_factory.mktemp("secure-kafka"))
    yield _BROKER
    _BROKER.local.stop()  # at the end of the session; a second teardown finds it stopped


@pytest.fixture(scope="session")
def security_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a small model trained on ``tests.integration.helpers.FLEET`` (trained once per session)."""
    global _MODEL
    if _MODEL is None or not (_MODEL / "bundle.json").is_file():
        from tests.integration.helpers import train_bundle

        _MODEL = tmp_path_factory.mktemp("security-model")
        train_bundle(_MODEL)
    return _MODEL
