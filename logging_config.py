"""structlog set-up: JSON lines in production, a readable console in development; secrets redacted.

Configured once by the process entry point (`main.py`'s lifespan or `worker.py`). Context such as ``request_id``
and ``product_id`` is bound with `structlog.contextvars` and appears on every event of that request or job.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

# Field names whose values are never logged, whatever they hold.
_SECRET_FIELD = re.compile(r"(api[_-]?key|secret|token|password|authorization|service[_-]?role)", re.IGNORECASE)
# Bearer tokens and JWTs that turn up inside free text (an exception message quoting a header, say).
_SECRET_TEXT = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
REDACTED = "[redacted]"


class SecretRedactor:
    """A structlog processor that removes configured secret values and secret-looking fields from every event."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return _SECRET_TEXT.sub(lambda m: (m.group(1) or "") + REDACTED, text)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {k: REDACTED if _SECRET_FIELD.search(str(k)) else self._clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._clean(v) for v in value]
        if isinstance(value, BaseException):
            return self.redact(repr(value))
        return value

    def __call__(self, _logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key in list(event):
            event[key] = REDACTED if _SECRET_FIELD.search(key) else self._clean(event[key])
        return event


def _redact_rendered(redactor: SecretRedactor) -> Any:
    # Tracebacks are rendered to text late in the chain; clean the final line as well.
    def processor(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key in ("exception", "stack"):
            if isinstance(event.get(key), str):
                event[key] = redactor.redact(event[key])
        return event

    return processor


def configure_logging(*, level: str, json_logs: bool, secrets: Iterable[str] = ()) -> None:
    """Route structlog and the standard library's logging (uvicorn, httpx) through one redacting pipeline."""
    redactor = SecretRedactor(secrets)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redactor,
    ]
    structlog.configure(
        # filter_by_level first: an event below LOG_LEVEL is dropped before any processor runs (at 50 polls a second
        # the request events alone would otherwise be stamped and scanned for secrets only to be thrown away).
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    renderer: Any = (
        structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer(colors=False)
    )
    final: list[Any] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        structlog.processors.format_exc_info,
        _redact_rendered(redactor),
    ]
    formatter = structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=[*final, renderer])
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request URL at INFO; uvicorn's access log duplicates our request events.
    for noisy in ("httpx", "httpcore", "hpack", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
