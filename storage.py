"""Files: the `ImageStore` protocol, Supabase Storage, and a local folder served by the app.

Paths are ``<bucket>/<path>`` as in the seed's layout. ``upload`` overwrites and returns the public URL; callers
add a ``?v=`` version when a file at the same path changed, since CDNs cache by URL.
"""

from __future__ import annotations

import asyncio
import mimetypes
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import httpx
import structlog
from storage3.exceptions import StorageApiError
from storage3.types import FileOptions
from supabase import AsyncClient

from errors import StorageError
from retrying import RetryPolicy

log = structlog.get_logger(__name__)


class ImageStore(Protocol):
    name: str

    async def ensure_buckets(self, buckets: Iterable[str]) -> None:
        """Create missing buckets (public, since product images are shown to shoppers)."""
        ...

    async def upload(self, bucket: str, path: str, data: bytes, *, content_type: str) -> str:
        """Store ``data`` at ``path`` (overwriting) and return its public URL."""
        ...

    async def download(self, bucket: str, path: str) -> bytes:
        """Raises `StorageError` with ``not_found`` set when there is no such object."""
        ...

    async def delete(self, bucket: str, paths: Iterable[str]) -> None: ...

    def public_url(self, bucket: str, path: str) -> str: ...


def _check_path(path: str) -> str:
    if not path or any(part in ("..", ".", "") for part in path.split("/")) or "\\" in path:
        raise ValueError(f"not a safe object path: {path!r}")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Supabase Storage


class SupabaseImageStore:
    """Supabase Storage through supabase-py's storage3 client (PROVIDERS.md §3)."""

    name = "supabase"

    def __init__(
        self, *, client: AsyncClient, supabase_url: str, retry: RetryPolicy, cache_control_s: int = 3600
    ) -> None:
        self._client = client
        self._public_base = f"{supabase_url.rstrip('/')}/storage/v1/object/public"
        self._retry = retry
        self._cache_control = str(cache_control_s)

    async def _call(self, what: str, operation: Any) -> Any:
        async def once() -> Any:
            try:
                return await operation()
            except StorageApiError as exc:
                # Nearly every Storage error is HTTP 400; the real status is the body's *string* statusCode.
                status = str(exc.status)
                raise StorageError(
                    f"{what}: storage answered {status} {exc.message}",
                    transient=status.startswith("5") or status in ("429", "503"),
                    not_found=status == "404",
                ) from exc
            except httpx.HTTPError as exc:
                raise StorageError(f"{what}: {type(exc).__name__}", transient=True) from exc

        return await self._retry.run(once)

    async def ensure_buckets(self, buckets: Iterable[str]) -> None:
        existing = {bucket.id for bucket in await self._call("list buckets", self._client.storage.list_buckets)}
        for bucket in sorted(set(buckets) - existing):
            await self._call(
                f"create bucket {bucket}",
                lambda b=bucket: self._client.storage.create_bucket(b, options={"public": True}),
            )
            log.info("bucket_created", bucket=bucket)

    async def upload(self, bucket: str, path: str, data: bytes, *, content_type: str) -> str:
        _check_path(path)
        # upsert must be the *string* "true": a bool raises, and "True" silently keeps the old object.
        options: FileOptions = {"content-type": content_type, "upsert": "true", "cache-control": self._cache_control}
        await self._call(f"upload {bucket}/{path}", lambda: self._client.storage.from_(bucket).upload(path, data,
                                                                                                       options))
        return self.public_url(bucket, path)

    async def download(self, bucket: str, path: str) -> bytes:
        _check_path(path)
        data: bytes = await self._call(f"download {bucket}/{path}",
                                       lambda: self._client.storage.from_(bucket).download(path))
        return data

    async def delete(self, bucket: str, paths: Iterable[str]) -> None:
        names = [_check_path(p) for p in paths]
        if names:
            await self._call(f"delete from {bucket}", lambda: self._client.storage.from_(bucket).remove(names))

    def public_url(self, bucket: str, path: str) -> str:
        # The same URL storage3's get_public_url builds, without a coroutine for a string.
        return f"{self._public_base}/{quote(bucket)}/{quote(_check_path(path))}"


# ---------------------------------------------------------------------------------------------------------------------
# Local folder


class LocalImageStore:
    """Files under ``root/<bucket>/<path>``, served by the app at ``/storage/<bucket>/<path>``."""

    name = "local"

    def __init__(self, *, root: Path, public_base_url: str) -> None:
        self._root = root.resolve()
        self._public_base = public_base_url.rstrip("/")

    def file_path(self, bucket: str, path: str) -> Path:
        """The file for an object, refusing anything that would leave the storage folder."""
        _check_path(f"{bucket}/{path}")
        full = (self._root / bucket / path).resolve()
        if not full.is_relative_to(self._root):
            raise ValueError(f"not a safe object path: {bucket}/{path!r}")
        return full

    async def ensure_buckets(self, buckets: Iterable[str]) -> None:
        for bucket in set(buckets):
            await asyncio.to_thread(self.file_path(bucket, "x").parent.mkdir, parents=True, exist_ok=True)

    async def upload(self, bucket: str, path: str, data: bytes, *, content_type: str) -> str:
        target = self.file_path(bucket, path)

        def write() -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so a reader never sees half a file and a crash never leaves one.
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

        try:
            await asyncio.to_thread(write)
        except OSError as exc:
            raise StorageError(f"upload {bucket}/{path}: {exc.strerror}", transient=True) from exc
        return self.public_url(bucket, path)

    async def download(self, bucket: str, path: str) -> bytes:
        target = self.file_path(bucket, path)
        try:
            return await asyncio.to_thread(target.read_bytes)
        except FileNotFoundError as exc:
            raise StorageError(f"{bucket}/{path} not found", transient=False, not_found=True) from exc
        except OSError as exc:
            raise StorageError(f"download {bucket}/{path}: {exc.strerror}", transient=True) from exc

    async def delete(self, bucket: str, paths: Iterable[str]) -> None:
        for path in paths:
            await asyncio.to_thread(self.file_path(bucket, path).unlink, missing_ok=True)

    def public_url(self, bucket: str, path: str) -> str:
        _check_path(path)
        return f"{self._public_base}/storage/{quote(bucket)}/{quote(path)}"

    @staticmethod
    def content_type(path: Path) -> str:
        return mimetypes.guess_type(path.name)[0] or "application/octet-stream"
