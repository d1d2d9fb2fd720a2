"""Shared fixtures of the streams unit tests: a fake monotonic clock and a metrics object on a private registry."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from streams.metrics import ServiceMetrics
from tests.unit.streams.fakes import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metrics(clock: FakeClock) -> ServiceMetrics:
    return ServiceMetrics(CollectorRegistry(), topics=["sensor.readings"], liveness_timeout_s=30, clock=clock)


