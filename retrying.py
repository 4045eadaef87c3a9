"""The one retry policy: narrow (only errors marked ``retryable``), bounded in attempts and time, switchable in tests.

Built from settings by the entry point and passed to each client that retries (providers, storage).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, stop_after_delay

from errors import ServiceError

log = structlog.get_logger(__name__)
T = TypeVar("T")


async def _no_sleep(_seconds: float) -> None:
    return None


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, ServiceError) and exc.retryable


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a `ServiceError` whose ``retryable`` is true.

    A server's ``Retry-After`` (``retry_after_s`` on the error) is honoured up to ``retry_after_cap_s``; otherwise the
    wait grows exponentially with jitter up to ``wait_max_s``. Tests pass ``sleep`` to record waits instead of
    sleeping, or use `RetryPolicy.immediate`.
    """

    attempts: int = 4
    wait_initial_s: float = 1.0
    wait_max_s: float = 30.0
    retry_after_cap_s: float = 60.0
    total_s: float = 300.0
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep)

    @classmethod
    def immediate(cls, attempts: int = 4) -> RetryPolicy:
        """Retry without waiting: for tests."""
        return cls(attempts=attempts, wait_initial_s=0, wait_max_s=0, retry_after_cap_s=0, sleep=_no_sleep)

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, ServiceError) and exc.retry_after_s is not None:
            return max(0.0, min(float(exc.retry_after_s), self.retry_after_cap_s))
        backoff = min(self.wait_max_s, self.wait_initial_s * 2 ** (state.attempt_number - 1))
        return float(backoff * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not cryptography

    async def run(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run ``operation``; retryable errors are retried, and the last one is raised as is (never `RetryError`)."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(_is_retryable),
            stop=stop_after_attempt(max(1, self.attempts)) | stop_after_delay(self.total_s),
            wait=self._wait,
            sleep=self.sleep,
            reraise=True,
            before_sleep=_log_retry,
        )
        async for attempt in retrying:
            with attempt:
                return await operation()
        raise AssertionError("unreachable: tenacity either returns or re-raises")  # pragma: no cover


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    wait_s = state.next_action.sleep if state.next_action else None
    log.warning("retrying", attempt=state.attempt_number, wait_s=wait_s, error=str(exc))
