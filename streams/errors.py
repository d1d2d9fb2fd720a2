"""Errors raised by the streaming service.

Every error :mod:`streams` raises derives from :class:`StreamsError`, so the CLI and the service
loop catch the package's failures by name, never by message. Bad *input messages* are not errors:
the codec turns them into :class:`~streams.codec.DeadLetter` values and the service keeps running.
Errors an operator must act on say what to do in their docstring. This module must stay free of
imports (no Kafka, no torch) so that every other module can import it cheaply.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BrokerUnavailableError",
    "CodecError",
    "ConfigError",
    "FencedError",
    "StreamsError",
]


class StreamsError(Exception):
    """Root of every error raised by :mod:`streams`."""


class ConfigError(StreamsError, ValueError):
    """A setting is missing, malformed or contradicts another one.

    The operator fixes the environment variable or CLI option that the message names and restarts
    the service.
    """


class BrokerUnavailableError(StreamsError):
    """No Kafka broker answered within the configured timeout.

    The operator checks the bootstrap servers setting, the network path to the brokers and the
    security settings (protocol, SASL mechanism, credentials, CA file); the message names the
    servers that were tried.
    """


class CodecError(StreamsError, ValueError):
    """A value cannot be encoded to, or decoded from, a message of one of the service's topics.

    Raised by the ``encode_*`` helpers and by :func:`~streams.codec.decode_event`. Decoding the input
    topic never raises it: a bad input message becomes a dead letter instead.
    """


class FencedError(StreamsError):
    """Another instance took over this instance's transactional identity or group generation.

    The broker fenced this (zombie) instance so that it cannot produce duplicates; it stops. If
    this happens without a deliberate restart, two instances share one transactional id: give each
    instance its own ``transactional_id`` (by default ``<group_id>-<hostname>``).
    """


class AuthenticationError(ConfigError):
    """The brokers refused this client's credentials or TLS settings.

    Retrying does not help. The operator checks the SASL mechanism, user name and password (and,
    for TLS, the CA file and the broker's certificate) named in the message, fixes the Secret or
    environment variable, and restarts the service.
    """
