"""The service's own exceptions, documented once.

Library errors (httpx, postgrest, storage3, sqlite3, Pillow) are caught at the edge of the module that uses the
library and re-raised as one of these, chained with ``from``. ``main.py`` maps them to HTTP statuses in one place;
the worker decides from them whether a job is retried or fails.

    ServiceError
    ├── ConfigError            settings that cannot work; raised at startup, names the variable
    ├── InputError             bad input from a client (422 unless a subclass says otherwise)
    │   ├── UploadTooLarge         413
    │   ├── UnsupportedImage       415
    │   └── UnreadableImage        422
    ├── ProductNotFound        404
    ├── JobRunning             409: a re-trigger of a job that is processing
    ├── ProviderError          Reve, NanoBanana or the local studio failed
    │   ├── ProviderRejected       permanent: bad request, bad key, no credits, content violation
    │   └── ProviderUnavailable    transient, retries exhausted: 429, 5xx, transport errors, deadlines
    ├── StorageError           the file store failed
    ├── DatabaseError          the product store failed
    └── LeaseLost              a worker no longer holds the job it is writing to
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error this service raises on purpose.

    ``retryable`` says whether the same operation may succeed if tried again (the retry policy and the worker read
    it); ``retry_after_s`` carries a server's ``Retry-After`` when it sent one.
    """

    retryable = False
    retry_after_s: float | None = None


class ConfigError(ServiceError):
    """The configuration cannot work; the message names the variable to fix."""


class InputError(ServiceError):
    """A client sent something we refuse. The message is shown to the client as ``detail``."""

    status_code = 422


class UploadTooLarge(InputError):
    status_code = 413


class UnsupportedImage(InputError):
    status_code = 415


class UnreadableImage(InputError):
    status_code = 422


class ProductNotFound(ServiceError):
    def __init__(self, product_id: str) -> None:
        super().__init__(f"product {product_id} not found")
        self.product_id = product_id


class JobRunning(ServiceError):
    def __init__(self, product_id: str) -> None:
        super().__init__(f"product {product_id} is being processed; re-trigger it once it is done or failed")
        self.product_id = product_id


class ProviderError(ServiceError):
    """An image provider failed. ``provider`` is "reve", "nanobana" or "local"."""

    def __init__(self, provider: str, message: str, *, status_code: int | None = None) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider
        self.status_code = status_code


class ProviderRejected(ProviderError):
    """Permanent: retrying the same request cannot succeed (and may be billed again)."""


class ProviderUnavailable(ProviderError):
    """Transient: the provider was unreachable, rate limited or too slow; a later run may succeed."""

    retryable = True

    def __init__(
        self,
        provider: str,
        message: str,
        *,
        status_code: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(provider, message, status_code=status_code)
        self.retry_after_s = retry_after_s


class StorageError(ServiceError):
    def __init__(self, message: str, *, transient: bool = True, not_found: bool = False) -> None:
        super().__init__(message)
        self.retryable = transient
        self.not_found = not_found


class DatabaseError(ServiceError):
    """The product store could not be reached or refused a statement."""

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.retryable = transient


class LeaseLost(ServiceError):
    def __init__(self, product_id: str, worker_id: str) -> None:
        super().__init__(f"worker {worker_id} no longer holds the lease on product {product_id}")
        self.product_id = product_id
        self.worker_id = worker_id
