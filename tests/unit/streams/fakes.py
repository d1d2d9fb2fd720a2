"""In-process stand-ins shared by the streams unit tests (imported by ``conftest.py`` and the tests)."""

from __future__ import annotations


class FakeClock:
    """Monotonic seconds that only move when told to, so liveness tests need no sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
