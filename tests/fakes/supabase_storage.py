"""A fake of Supabase Storage's REST API (PROVIDERS.md §3), faithful where our code and tests touch it.

Built from the real server (supabase/storage, a Fastify service: its routes, ``uploader.ts``, ``errors/codes.ts``,
``error-handler.ts``, the ``jwt`` plugin) and checked against what storage3 2.34 sends, so the pitfalls PROVIDERS.md
warns about show up here as they would in production.

Usage::

    fake = FakeStorage(service_role_key="service-key", anon_key="anon-key")
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=fake.app), base_url="http://supabase.test")
    sb = await acreate_client("http://supabase.test", "service-key",
                              options=AsyncClientOptions(httpx_client=http))
    base_url, stop = fake.serve_in_thread()   # or on a loopback port: pass base_url to acreate_client

The app serves everything under ``/storage/v1`` (where hosted Supabase's gateway forwards to the server), so the
Supabase project URL is the app's root.

What storage3 sends, and what the fake answers:

- ``POST /object/{bucket}/{path}`` upload, ``PUT`` the same path update. storage3 always sends
  ``multipart/form-data``: a ``cacheControl`` text field (``"3600"`` by default) **before** a ``file`` part whose
  filename is the last path segment and whose ``Content-Type`` is the ``content-type`` option
  (``text/plain;charset=UTF-8`` when not given). Every other option becomes a header: ``x-upsert`` (``"false"``
  unless ``upsert`` is truthy; bool ``True`` makes httpx raise ``AttributeError`` before anything is sent; PUT
  drops ``x-upsert``). The server stores the part's media type as busboy parses it (type/subtype, lower-cased,
  parameters dropped: ``text/plain`` when the caller set none), ``cache-control: max-age=<cacheControl>`` (``no-cache``
  without the field), and only fields that come before the file count. A raw (non-multipart) body is stored with
  its ``Content-Type`` header verbatim (``application/octet-stream`` if absent) and ``Cache-Control`` header
  (``no-cache``). POST overwrites only when ``x-upsert`` is exactly ``true`` (``"True"`` does not); otherwise an
  existing key is 409 Duplicate. PUT always upserts (it also creates). Answer: ``{"Id": <uuid>, "Key":
  "<bucket>/<path>"}``; the id survives overwrites, the version does not.
- ``GET /object/{bucket}/{path}`` download: a public bucket serves anyone (no or bad token too); a private one
  needs a valid token and row access (anon has none: "Object not found"). ``GET /object/authenticated/...`` demands
  a valid token. ``GET /object/public/{bucket}/{path}``: public buckets only, else "Bucket not found". Responses
  carry ``Content-Type`` (``text/html`` is served as ``text/plain``), ``Cache-Control`` (the stored value),
  ``ETag`` (quoted md5), ``Last-Modified``, ``Content-Length``, ``Accept-Ranges: bytes``; ``If-None-Match`` with the
  current ETag → bare 304; ``?download[=name]`` → ``Content-Disposition``. ``HEAD`` on the same paths, no body.
  ``GET /object/info/{bucket}/{path}`` (storage3's ``info``/``exists``) answers the object's info JSON.
- ``DELETE /object/{bucket}`` with ``{"prefixes": [...]}`` deletes those exact names (not prefixes) and answers the
  deleted rows (``[]`` for unknown names, missing buckets and anon callers). ``DELETE /object/{bucket}/{path}``
  deletes one → ``{"message": "Successfully deleted"}``.
- ``POST /object/list/{bucket}`` with ``{prefix, limit, offset, sortBy: {column, order}, search}`` answers the
  level below ``prefix`` as ``storage.search`` does: folders first (``id``/``metadata`` null), then files, names
  relative to the prefix, ``prefix || search`` matched with ILIKE.
- ``POST /object/sign/{bucket}/{path}`` with ``{"expiresIn": n}`` (storage3 sends a string; the server coerces)
  → ``{"signedURL": "/object/sign/<bucket>/<path>?token=<HS256 JWT {url, iat, exp}>"}``; ``GET`` that URL serves the
  object with ``Expires`` instead of ``Cache-Control``. ``POST /object/sign/{bucket}`` with ``{"paths": [...]}``.
- Buckets: ``GET /bucket``, ``GET /bucket/{id}``, ``POST /bucket`` (``{"id", "name", "public", "file_size_limit",
  "allowed_mime_types"}``; ``name`` required, ``id`` defaults to it) → ``{"name": ...}``, ``PUT /bucket/{id}``,
  ``POST /bucket/{id}/empty``, ``DELETE /bucket/{id}`` (refused while it holds objects).
- Not implemented (answer 501 so nobody mistakes them for the real thing): move, copy, list-v2, signed uploads,
  image rendering. Unknown routes answer Fastify's 404 (``statusCode`` a number there).

Auth, as the server's ``jwt`` plugin and Supabase's default row security (RLS on, no storage policies) make it:
``Authorization: Bearer <key>``; the ``apikey`` header is the gateway's business and is only recorded. The
service-role key bypasses row security and may do everything. The anon key is a valid token whose rows are
invisible: it lists no buckets, finds no bucket or object through the authenticated routes, deletes nothing, and
every insert (bucket, upload, upsert) fails with "new row violates row-level security policy" (``"403"``); it can
read public buckets. A missing ``Authorization`` header on an authenticated route → ``"400"`` "headers must have
required property 'authorization'"; any other token → ``"403"`` ``Unauthorized`` ("jwt malformed" for a non-JWT,
"invalid signature" for a foreign JWT, "jwt must be provided" for an empty one).

Errors, as the server renders them: **HTTP 400** (500 only for ``"500"``) with ``{"statusCode": "<string>", "code":
<ErrorCode>, "error": <legacy name>, "message": ...}``, e.g. ``{"statusCode": "409", "code": "KeyAlreadyExists",
"error": "Duplicate", "message": "The resource already exists"}``. storage3 raises ``StorageApiError(message,
error, statusCode)``, so ``.status`` is the string ``"409"`` and ``.code`` the legacy ``error``. Checks run in the
server's order: auth, bucket name, bucket exists, body (mime type allowed; a raw body over the size limit → 413),
key valid, row security / duplicate, then a multipart file over the limit → ``"413"`` "Payload too large". The
limit is the smaller of ``max_object_bytes`` (the project's global limit, 50 MB by default) and the bucket's
``file_size_limit``.

Faults, for the next ``times`` requests whose method and path match (a path pattern is a prefix of the path after
``/storage/v1``, or a compiled regex searched in it; method ``"*"`` matches any), applied before auth:

- ``fail_next(method, path, status=500, body=None, headers=None, error=None)``: answer ``status`` with ``body``
  (dict → JSON, bytes/str verbatim; default: what the server or its gateway sends for that status), or render
  ``error`` (a :class:`StorageError`, e.g. ``StorageError.database_connection_limit()``: HTTP 400, ``"503"``);
- ``disconnect_next(method, path, after_handling=False)``: close the connection without an answer; with
  ``after_handling=True`` the request takes effect first (an upload lands, its response is lost);
- ``delay_next(method, path, seconds)``, ``stall_next(method, path)``: see ``tests.fakes.server``.

Observation: ``requests`` (every request, faulted or not, as :class:`RecordedRequest`), ``calls(method, path)``,
``call_count(...)``, ``get_object(bucket, path)``, ``object_paths(bucket)``, ``get_bucket(id)``; seeding without
HTTP: ``add_bucket(...)``, ``put_object(...)``; ``reset()``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Any, ClassVar, Literal
from urllib.parse import quote

import jwt
from starlette.applications import Starlette
from starlette.datastructures import Headers, UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .server import Delay, Drop, DroppedConnection, Stall, apply_connection_fault
from .server import serve_in_thread as _serve_in_thread

__all__ = [
    "DEFAULT_MAX_OBJECT_BYTES",
    "STORAGE_PREFIX",
    "Bucket",
    "FakeStorage",
    "RecordedRequest",
    "StorageError",
    "StoredObject",
]

STORAGE_PREFIX = "/storage/v1"
# The server's FILE_SIZE_LIMIT default, and the free plan's global limit.
DEFAULT_MAX_OBJECT_BYTES = 50 * 1024 * 1024
_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_BEARER = re.compile(r"^Bearer\s+", re.IGNORECASE)
# limits.ts: S3-safe characters only (JavaScript's \w is ASCII).
_VALID_KEY = re.compile(r"^(\w|/|!|-|\.|\*|'|\(|\)| |&|\$|@|=|;|:|\+|,|\?)*$", re.ASCII)
_VALID_BUCKET_NAME = re.compile(r"^(\w|!|-|\.|\*|'|\(|\)| |&|\$|@|=|;|:|\+|,|\?)*$", re.ASCII)
_VALID_ALLOWED_MIME = re.compile(r"^([a-zA-Z0-9\-+.]+)/([a-zA-Z0-9\-+.]+)(;\s*charset=[a-zA-Z0-9\-]+)?$|\*$")
_FILE_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(gb|mb|kb|b)$", re.IGNORECASE)
_SORT_COLUMNS = ("name", "updated_at", "created_at", "last_accessed_at")
_RLS_DENIED = "new row violates row-level security policy"


# -- errors ------------------------------------------------------------------------------------------------------


class StorageError(Exception):
    """An error as the server renders it (``StorageBackendError.render`` through ``error-handler.ts``).

    ``status_code`` is the body's ``statusCode`` (sent as a string); the HTTP status is 400 unless it is 500, or
    ``http_status`` when the server overrides it (544 database timeout, 429 too many connections).
    """

    def __init__(
        self,
        status_code: int,
        code: str | None,
        message: str,
        *,
        error: str | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code = status_code
        self.code = code
        self.error = error or code or "Error"
        self.message = message
        self.http_status = http_status if http_status is not None else (500 if status_code == 500 else 400)

    def body(self) -> dict[str, str]:
        rendered = {"statusCode": str(self.status_code)}
        if self.code is not None:
            rendered["code"] = self.code
        rendered.update(error=self.error, message=self.message)
        return rendered

    def response(self) -> Response:
        return _json(self.body(), self.http_status)

    # The server's ERRORS.* factories that the fake can raise.
    @classmethod
    def no_such_bucket(cls) -> StorageError:
        return cls(404, "NoSuchBucket", "Bucket not found", error="Bucket not found")

    @classmethod
    def no_such_key(cls) -> StorageError:
        return cls(404, "NoSuchKey", "Object not found", error="not_found")

    @classmethod
    def key_already_exists(cls) -> StorageError:
        return cls(409, "KeyAlreadyExists", "The resource already exists", error="Duplicate")

    @classmethod
    def bucket_already_exists(cls) -> StorageError:
        return cls(409, "BucketAlreadyExists", "The resource already exists", error="Duplicate")

    @classmethod
    def bucket_not_empty(cls) -> StorageError:
        return cls(409, "ResourceNotEmpty", "The bucket you tried to delete is not empty")

    @classmethod
    def entity_too_large(cls) -> StorageError:
        return cls(413, "EntityTooLarge", "The object exceeded the maximum allowed size", error="Payload too large")

    @classmethod
    def access_denied(cls, message: str) -> StorageError:
        return cls(403, "AccessDenied", message or "Access denied", error="Unauthorized")

    @classmethod
    def invalid_jwt(cls, message: str) -> StorageError:
        return cls(400, "InvalidJWT", message or "Invalid JWT")

    @classmethod
    def invalid_signature(cls) -> StorageError:
        return cls(400, "InvalidSignature", "Invalid signature")

    @classmethod
    def invalid_key(cls, key: str) -> StorageError:
        return cls(400, "InvalidKey", f"Invalid key: {key}")

    @classmethod
    def invalid_bucket_name(cls) -> StorageError:
        return cls(400, "InvalidBucketName", "Bucket name invalid", error="Invalid Input")

    @classmethod
    def invalid_mime_type(cls, mime_type: str) -> StorageError:
        return cls(415, "InvalidMimeType", f"mime type {mime_type} is not supported", error="invalid_mime_type")

    @classmethod
    def invalid_file_size_limit(cls) -> StorageError:
        return cls(400, "InvalidRequest", "Invalid file size format, hint: use 20GB / 20MB / 30KB / 3B")

    @classmethod
    def no_content_provided(cls) -> StorageError:
        return cls(400, "InvalidRequest", "No content provided")

    @classmethod
    def internal_error(cls) -> StorageError:
        return cls(500, "InternalError", "Internal server error")

    @classmethod
    def database_connection_limit(cls) -> StorageError:
        return cls(
            503,
            "DatabaseConnectionLimit",
            "The database has reached its maximum number of connections. Please try again later.",
        )

    @classmethod
    def database_timeout(cls) -> StorageError:
        return cls(544, "DatabaseTimeout", "The connection to the database timed out", http_status=544)

    @classmethod
    def too_many_connections(cls) -> StorageError:
        return cls(
            429,
            "SlowDown",
            "Too many connections issued to the database",
            error="too_many_connections",
            http_status=429,
        )

    @classmethod
    def schema(cls, message: str) -> StorageError:
        """A Fastify schema validation failure: no ``code``, ``error`` is the JS error's name."""
        return cls(400, None, message, error="Error")


# -- state -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    id: str
    name: str
    public: bool
    file_size_limit: int | None
    allowed_mime_types: tuple[str, ...] | None
    created_at: float
    updated_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            # A null owner serialised by fast-json-stringify as a string.
            "owner": "",
            "public": self.public,
            "file_size_limit": self.file_size_limit,
            "allowed_mime_types": list(self.allowed_mime_types) if self.allowed_mime_types is not None else None,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }


@dataclass(frozen=True)
class StoredObject:
    bucket: str
    name: str
    data: bytes = field(repr=False)
    content_type: str
    cache_control: str
    etag: str
    version: str
    id: str
    user_metadata: dict[str, Any]
    created_at: float
    updated_at: float
    last_accessed_at: float

    @property
    def size(self) -> int:
        return len(self.data)

    def metadata(self) -> dict[str, Any]:
        """The ``metadata`` column the server keeps (what list and remove answer)."""
        return {
            "eTag": self.etag,
            "size": self.size,
            "mimetype": self.content_type,
            "cacheControl": self.cache_control,
            "lastModified": _iso(self.updated_at),
            "contentLength": self.size,
            "httpStatusCode": 200,
        }

    def row(self) -> dict[str, Any]:
        """The ``storage.objects`` row as the remove endpoint answers it."""
        return {
            "name": self.name,
            "bucket_id": self.bucket,
            "owner": "",
            "owner_id": "",
            "version": self.version,
            "id": self.id,
            "updated_at": _iso(self.updated_at),
            "created_at": _iso(self.created_at),
            "last_accessed_at": _iso(self.last_accessed_at),
            "metadata": self.metadata(),
            "user_metadata": self.user_metadata,
        }


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it. ``path`` is relative to ``/storage/v1`` and percent-decoded.

    For a multipart body: ``form`` holds the text fields before the file part, ``file_name`` and
    ``file_content_type`` describe the file part (its own ``Content-Type``, verbatim, or None).
    """

    method: str
    path: str
    headers: Headers
    query: dict[str, str]
    body_size: int
    json: Any = None
    form: dict[str, str] | None = None
    file_name: str | None = None
    file_content_type: str | None = None


@dataclass(frozen=True)
class _FilePart:
    filename: str | None
    content_type: str | None
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class _Multipart:
    fields: dict[str, str]
    file: _FilePart | None


@dataclass(frozen=True)
class _Caller:
    role: str | None  # "service_role" or "anon"; None when unauthenticated

    @property
    def authenticated(self) -> bool:
        return self.role is not None

    @property
    def bypasses_rls(self) -> bool:
        return self.role == "service_role"


_UNAUTHENTICATED = _Caller(role=None)


@dataclass(frozen=True)
class _HttpFault:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]
    content_type: str | None


@dataclass(frozen=True)
class _DropAfterHandling:
    kind: ClassVar[str] = "drop_after"


_Fault = _HttpFault | Drop | Delay | Stall | _DropAfterHandling
PathPattern = str | re.Pattern[str]


@dataclass
class _FaultRule:
    method: str
    path: PathPattern
    fault: _Fault
    remaining: int


@dataclass(frozen=True)
class _Context:
    request: Request
    params: dict[str, str]
    body: bytes
    multipart: _Multipart | None
    caller: _Caller


AuthMode = Literal["required", "optional", "none"]
_Handler = Callable[[_Context], Awaitable[Response]]


@dataclass(frozen=True)
class _Route:
    method: str
    pattern: re.Pattern[str]
    auth: AuthMode
    handler: _Handler | None  # None: a real route the fake does not implement


# -- the fake ----------------------------------------------------------------------------------------------------


class FakeStorage:
    """Supabase Storage in memory, behind the ASGI app ``app`` (see the module docstring)."""

    def __init__(
        self,
        service_role_key: str,
        anon_key: str | None = None,
        *,
        max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service_role_key = service_role_key
        self.anon_key = anon_key
        self.max_object_bytes = max_object_bytes
        self._clock = clock
        # Signs the signed-URL tokens (the project's JWT secret on the real server).
        self._url_secret = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._buckets: dict[str, Bucket] = {}
        self._objects: dict[tuple[str, str], StoredObject] = {}
        self._faults: list[_FaultRule] = []
        self._requests: list[RecordedRequest] = []
        self._routes = self._build_routes()
        self.app = Starlette(routes=[Route("/{path:path}", self._handle, methods=_METHODS)])

    # -- seeding and inspection (no HTTP) ---------------------------------------------------------------------

    def add_bucket(
        self,
        bucket_id: str,
        *,
        public: bool = False,
        file_size_limit: int | None = None,
        allowed_mime_types: Iterable[str] | None = None,
    ) -> Bucket:
        now = self._clock()
        bucket = Bucket(
            bucket_id,
            bucket_id,
            public,
            file_size_limit,
            tuple(allowed_mime_types) if allowed_mime_types is not None else None,
            now,
            now,
        )
        with self._lock:
            self._buckets[bucket_id] = bucket
        return bucket

    def put_object(
        self,
        bucket: str,
        path: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        cache_control: str = "max-age=3600",
    ) -> StoredObject:
        with self._lock:
            if bucket not in self._buckets:
                raise KeyError(f"no bucket {bucket!r}")
            return self._store(bucket, path, data, content_type, cache_control, {})

    def get_bucket(self, bucket_id: str) -> Bucket | None:
        with self._lock:
            return self._buckets.get(bucket_id)

    def get_object(self, bucket: str, path: str) -> StoredObject | None:
        with self._lock:
            return self._objects.get((bucket, path))

    def object_paths(self, bucket: str) -> list[str]:
        with self._lock:
            return sorted(name for bucket_id, name in self._objects if bucket_id == bucket)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def calls(self, method: str = "*", path: PathPattern = "") -> list[RecordedRequest]:
        """The recorded requests matching ``method`` and ``path`` (same matching as the faults)."""
        return [r for r in self.requests if _matches(method, path, r.method, r.path)]

    def call_count(self, method: str = "*", path: PathPattern = "") -> int:
        return len(self.calls(method, path))

    def reset(self) -> None:
        with self._lock:
            self._buckets.clear()
            self._objects.clear()
            self._faults.clear()
            self._requests.clear()

    def serve_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, Callable[[], None]]:
        """Serve on a loopback port; returns the project URL (storage lives under it) and ``stop()``."""
        return _serve_in_thread(self.app, host, port)

    # -- faults -----------------------------------------------------------------------------------------------

    def fail_next(
        self,
        method: str,
        path: PathPattern,
        *,
        times: int = 1,
        status: int = 500,
        body: Mapping[str, Any] | bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        error: StorageError | None = None,
    ) -> None:
        """Answer the next ``times`` matching requests with an error instead of handling them."""
        if error is not None:
            status, body = error.http_status, error.body()
        elif body is None:
            body = _default_fault_body(status)
        content_type = None
        if isinstance(body, Mapping):
            raw, content_type = json.dumps(dict(body), separators=(",", ":")).encode(), "application/json"
        else:
            raw = body.encode() if isinstance(body, str) else body
        self._add_fault(method, path, _HttpFault(status, raw, tuple((headers or {}).items()), content_type), times)

    def disconnect_next(self, method: str, path: PathPattern, *, times: int = 1, after_handling: bool = False) -> None:
        """Close the connection without answering; ``after_handling`` lets the request take effect first."""
        self._add_fault(method, path, _DropAfterHandling() if after_handling else Drop(), times)

    def delay_next(self, method: str, path: PathPattern, seconds: float, *, times: int = 1) -> None:
        self._add_fault(method, path, Delay(seconds), times)

    def stall_next(self, method: str, path: PathPattern, *, times: int = 1) -> None:
        self._add_fault(method, path, Stall(), times)

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return sum(rule.remaining for rule in self._faults)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _add_fault(self, method: str, path: PathPattern, fault: _Fault, times: int) -> None:
        if times < 1:
            raise ValueError("times must be at least 1")
        if isinstance(path, str) and path.startswith(STORAGE_PREFIX):
            path = path[len(STORAGE_PREFIX) :]
        with self._lock:
            self._faults.append(_FaultRule(method.upper(), path, fault, times))

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for rule in self._faults:
                if rule.remaining > 0 and _matches(rule.method, rule.path, method, path):
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        self._faults.remove(rule)
                    return rule.fault
        return None

    # -- dispatch ---------------------------------------------------------------------------------------------

    def _build_routes(self) -> list[_Route]:
        bucket, key = r"(?P<bucket>[^/]+)", r"(?P<key>.*)"

        def route(method: str, pattern: str, auth: AuthMode, handler: _Handler | None) -> _Route:
            return _Route(method, re.compile(pattern), auth, handler)

        # Order matters where Fastify prefers a static segment ("list", "sign", "public" …) to a bucket name.
        return [
            route("GET", r"/bucket/?", "required", self._list_buckets),
            route("POST", r"/bucket/?", "required", self._create_bucket),
            route("POST", rf"/bucket/{bucket}/empty/?", "required", self._empty_bucket),
            route("GET", rf"/bucket/{bucket}/?", "required", self._get_bucket),
            route("PUT", rf"/bucket/{bucket}/?", "required", self._update_bucket),
            route("DELETE", rf"/bucket/{bucket}/?", "required", self._delete_bucket),
            route("POST", r"/object/(move|copy)/?", "required", None),
            route("POST", r"/object/list-v2/.*", "required", None),
            route("POST", r"/object/upload/sign/.*", "required", None),
            route("PUT", r"/object/upload/sign/.*", "none", None),
            route("GET", r"/render/.*", "none", None),
            route("POST", rf"/object/list/{bucket}/?", "required", self._list_objects),
            route("POST", rf"/object/sign/{bucket}/{key}", "required", self._sign_url),
            route("POST", rf"/object/sign/{bucket}/?", "required", self._sign_urls),
            route("GET", rf"/object/sign/{bucket}/{key}", "none", self._get_signed_object),
            route("GET", rf"/object/public/{bucket}/{key}", "none", self._get_public_object),
            route("HEAD", rf"/object/public/{bucket}/{key}", "none", self._get_public_object),
            route("GET", rf"/object/info/public/{bucket}/{key}", "none", self._public_info),
            route("GET", rf"/object/info/authenticated/{bucket}/{key}", "required", self._object_info),
            route("GET", rf"/object/info/{bucket}/{key}", "optional", self._object_info),
            route("GET", rf"/object/authenticated/{bucket}/{key}", "required", self._get_object),
            route("HEAD", rf"/object/authenticated/{bucket}/{key}", "required", self._get_object),
            route("GET", rf"/object/{bucket}/{key}", "optional", self._get_object),
            route("HEAD", rf"/object/{bucket}/{key}", "optional", self._get_object),
            route("POST", rf"/object/{bucket}/{key}", "required", self._upload),
            route("PUT", rf"/object/{bucket}/{key}", "required", self._upload),
            route("DELETE", rf"/object/{bucket}/(?P<key>.+)", "required", self._delete_object),
            route("DELETE", rf"/object/{bucket}/?", "required", self._delete_objects),
        ]

    async def _handle(self, request: Request) -> Response:
        full_path: str = request.scope["path"]
        method = request.method
        body = await request.body()
        multipart = await _read_multipart(request)
        path = full_path[len(STORAGE_PREFIX) :] if full_path.startswith(STORAGE_PREFIX + "/") else None
        self._record(request, path if path is not None else full_path, body, multipart)

        fault = self._take_fault(method, path) if path is not None else None
        if isinstance(fault, _HttpFault):
            return Response(fault.body, fault.status, headers=dict(fault.headers), media_type=fault.content_type)
        if isinstance(fault, Drop | Delay | Stall):
            interrupted = await apply_connection_fault(request, fault)
            if interrupted is not None:
                return interrupted

        response = await self._route(request, method, path, body, multipart)
        if isinstance(fault, _DropAfterHandling):
            return DroppedConnection()
        return response

    async def _route(
        self, request: Request, method: str, path: str | None, body: bytes, multipart: _Multipart | None
    ) -> Response:
        for route in self._routes if path is not None else []:
            match = route.pattern.fullmatch(path or "")
            if route.method != method or match is None:
                continue
            if route.handler is None:
                return _json(
                    {
                        "statusCode": "501",
                        "error": "NotImplementedByFake",
                        "message": f"{method} {path} is a real Storage route the fake does not implement",
                    },
                    501,
                )
            try:
                caller = self._authenticate(request, route.auth)
                return await route.handler(_Context(request, match.groupdict(), body, multipart, caller))
            except StorageError as exc:
                return exc.response()
        # Fastify's own not-found answer (the gateway strips /storage/v1 before the server sees the path).
        shown = path if path is not None else request.scope["path"]
        return _json({"message": f"Route {method}:{shown} not found", "error": "Not Found", "statusCode": 404}, 404)

    def _record(self, request: Request, path: str, body: bytes, multipart: _Multipart | None) -> None:
        parsed_json = None
        if request.headers.get("content-type", "").startswith("application/json") and body:
            try:
                parsed_json = json.loads(body)
            except ValueError:
                parsed_json = None
        record = RecordedRequest(
            method=request.method,
            path=path,
            headers=Headers(raw=list(request.scope["headers"])),
            query=dict(request.query_params),
            body_size=len(body),
            json=parsed_json,
            form=dict(multipart.fields) if multipart is not None else None,
            file_name=multipart.file.filename if multipart and multipart.file else None,
            file_content_type=multipart.file.content_type if multipart and multipart.file else None,
        )
        with self._lock:
            self._requests.append(record)

    def _authenticate(self, request: Request, mode: AuthMode) -> _Caller:
        if mode == "none":
            return _UNAUTHENTICATED
        header = request.headers.get("authorization")
        if header is None and mode == "required":
            raise StorageError.schema("headers must have required property 'authorization'")
        token = _BEARER.sub("", header or "", count=1)
        if not token and mode == "optional":
            return _UNAUTHENTICATED
        if token == self.service_role_key:
            return _Caller("service_role")
        if self.anon_key is not None and token == self.anon_key:
            return _Caller("anon")
        if mode == "optional":
            return _UNAUTHENTICATED
        # jsonwebtoken's messages, which the server passes through.
        if not token:
            raise StorageError.access_denied("jwt must be provided")
        if token.count(".") != 2:
            raise StorageError.access_denied("jwt malformed")
        raise StorageError.access_denied("invalid signature")

    # -- buckets ----------------------------------------------------------------------------------------------

    async def _list_buckets(self, ctx: _Context) -> Response:
        with self._lock:
            visible = list(self._buckets.values()) if ctx.caller.bypasses_rls else []
        return _json([bucket.to_json() for bucket in visible])

    async def _get_bucket(self, ctx: _Context) -> Response:
        return _json(self._find_bucket(ctx.params["bucket"], ctx.caller).to_json())

    async def _create_bucket(self, ctx: _Context) -> Response:
        body = _json_object(ctx.body)
        name = _required(body, "name", str)
        bucket_id = _optional(body, "id", str) or name
        public = _coerce_bool(body.get("public"), "public")
        _check_bucket_name(name)
        size_limit = self._parse_size_limit(body.get("file_size_limit"))
        mime_types = _parse_allowed_mime_types(body.get("allowed_mime_types"))
        if not ctx.caller.bypasses_rls:
            raise StorageError.access_denied(_RLS_DENIED)
        now = self._clock()
        with self._lock:
            if bucket_id in self._buckets:
                raise StorageError.bucket_already_exists()
            self._buckets[bucket_id] = Bucket(bucket_id, name, bool(public), size_limit, mime_types, now, now)
        return _json({"name": name})

    async def _update_bucket(self, ctx: _Context) -> Response:
        body = _json_object(ctx.body)
        bucket_id = ctx.params["bucket"]
        _check_bucket_name(bucket_id)
        changes: dict[str, Any] = {}
        if body.get("public") is not None:
            changes["public"] = _coerce_bool(body["public"], "public")
        if "file_size_limit" in body:
            changes["file_size_limit"] = self._parse_size_limit(body["file_size_limit"])
        if "allowed_mime_types" in body:
            changes["allowed_mime_types"] = _parse_allowed_mime_types(body["allowed_mime_types"])
        with self._lock:
            current = self._buckets.get(bucket_id)
            # An UPDATE under row security touches no row: "not found" rather than "denied".
            if current is None or not ctx.caller.bypasses_rls:
                raise StorageError.no_such_bucket()
            self._buckets[bucket_id] = replace(current, updated_at=self._clock(), **changes)
        return _json({"message": "Successfully updated"})

    async def _empty_bucket(self, ctx: _Context) -> Response:
        bucket = self._find_bucket(ctx.params["bucket"], ctx.caller)
        with self._lock:
            for bucket_id, name in list(self._objects):
                if bucket_id == bucket.id:
                    del self._objects[(bucket_id, name)]
        return _json({"message": "Successfully emptied"})

    async def _delete_bucket(self, ctx: _Context) -> Response:
        bucket_id = ctx.params["bucket"]
        with self._lock:
            if bucket_id not in self._buckets:
                raise StorageError.no_such_bucket()
            if any(b == bucket_id for b, _ in self._objects):
                raise StorageError.bucket_not_empty()
            if not ctx.caller.bypasses_rls:
                raise StorageError.no_such_bucket()
            del self._buckets[bucket_id]
        return _json({"message": "Successfully deleted"})

    def _find_bucket(self, bucket_id: str, caller: _Caller) -> Bucket:
        with self._lock:
            bucket = self._buckets.get(bucket_id)
        if bucket is None or not caller.bypasses_rls:
            raise StorageError.no_such_bucket()
        return bucket

    def _parse_size_limit(self, value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise StorageError.schema("body/file_size_limit must be integer")
        if isinstance(value, int):
            if value < 0:
                raise StorageError.schema("body/file_size_limit must be >= 0")
            limit = value
        else:
            limit = _parse_file_size(value)
        if limit > self.max_object_bytes:
            raise StorageError.entity_too_large()
        return limit

    # -- uploads ----------------------------------------------------------------------------------------------

    async def _upload(self, ctx: _Context) -> Response:
        bucket_id, key = ctx.params["bucket"], ctx.params["key"]
        # PUT is "update": always an upsert. POST overwrites only on the exact string "true".
        upsert = ctx.request.method == "PUT" or ctx.request.headers.get("x-upsert") == "true"
        _check_bucket_name(bucket_id)
        with self._lock:
            bucket = self._buckets.get(bucket_id)
        if bucket is None:
            raise StorageError.no_such_bucket()
        limit = self.max_object_bytes
        if bucket.file_size_limit is not None:
            limit = min(limit, bucket.file_size_limit)

        if ctx.request.headers.get("content-type", "").startswith("multipart/form-data"):
            if ctx.multipart is None or ctx.multipart.file is None:
                raise StorageError.no_content_provided()
            fields, part = ctx.multipart.fields, ctx.multipart.file
            content_type = fields.get("contentType") or _busboy_mime_type(part.content_type)
            cache_time = fields.get("cacheControl")
            cache_control = f"max-age={cache_time}" if cache_time else "no-cache"
            user_metadata = _parse_json_object(fields.get("metadata") or fields.get("userMetadata"))
            data = part.data
            _check_allowed_mime_type(content_type, bucket.allowed_mime_types)
        else:
            data = ctx.body
            content_type = ctx.request.headers.get("content-type") or "application/octet-stream"
            cache_control = ctx.request.headers.get("cache-control") or "no-cache"
            user_metadata = _parse_base64_json(ctx.request.headers.get("x-metadata"))
            _check_allowed_mime_type(content_type, bucket.allowed_mime_types)
            declared = ctx.request.headers.get("content-length")
            # The server rejects a raw body by its declared length, before reading it.
            if (int(declared) if declared and declared.isdigit() else len(data)) > limit:
                raise StorageError.entity_too_large()

        if not key or not _VALID_KEY.fullmatch(key):
            raise StorageError.invalid_key(key)
        if not ctx.caller.bypasses_rls:
            raise StorageError.access_denied(_RLS_DENIED)
        with self._lock:
            if not upsert and (bucket_id, key) in self._objects:
                raise StorageError.key_already_exists()
        # A multipart file is streamed and truncated at the limit: only noticed once the upload has run.
        if len(data) > limit:
            raise StorageError.entity_too_large()
        with self._lock:
            if bucket_id not in self._buckets:
                raise StorageError.no_such_bucket()
            if not upsert and (bucket_id, key) in self._objects:
                raise StorageError.key_already_exists()
            stored = self._store(bucket_id, key, data, content_type, cache_control, user_metadata)
        return _json({"Id": stored.id, "Key": f"{bucket_id}/{key}"})

    def _store(
        self,
        bucket: str,
        name: str,
        data: bytes,
        content_type: str,
        cache_control: str,
        user_metadata: dict[str, Any],
    ) -> StoredObject:
        """Insert or overwrite (caller holds the lock): the row keeps its id, the version is new."""
        now = self._clock()
        previous = self._objects.get((bucket, name))
        stored = StoredObject(
            bucket=bucket,
            name=name,
            data=data,
            content_type=content_type,
            cache_control=cache_control,
            etag=f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"',
            version=str(uuid.uuid4()),
            id=previous.id if previous else str(uuid.uuid4()),
            user_metadata=user_metadata,
            created_at=previous.created_at if previous else now,
            updated_at=now,
            last_accessed_at=now,
        )
        self._objects[(bucket, name)] = stored
        return stored

    # -- downloads --------------------------------------------------------------------------------------------

    async def _get_object(self, ctx: _Context) -> Response:
        stored = self._readable_object(ctx)
        return self._render(ctx.request, stored)

    async def _object_info(self, ctx: _Context) -> Response:
        return _json(_info(self._readable_object(ctx)))

    async def _public_info(self, ctx: _Context) -> Response:
        bucket_id, key = ctx.params["bucket"], ctx.params["key"]
        with self._lock:
            bucket = self._buckets.get(bucket_id)
            stored = self._objects.get((bucket_id, key))
        if bucket is None or not bucket.public:
            raise StorageError.no_such_bucket()
        if stored is None:
            raise StorageError.no_such_key()
        return _json(_info(stored))

    def _readable_object(self, ctx: _Context) -> StoredObject:
        """getObject.ts: public buckets are read as superuser; private ones need a token and row access."""
        bucket_id, key = ctx.params["bucket"], ctx.params["key"]
        with self._lock:
            bucket = self._buckets.get(bucket_id)
            stored = self._objects.get((bucket_id, key))
        if bucket is None or (not ctx.caller.authenticated and not bucket.public):
            raise StorageError.no_such_bucket()
        if stored is None or not (bucket.public or ctx.caller.bypasses_rls):
            raise StorageError.no_such_key()
        return stored

    async def _get_public_object(self, ctx: _Context) -> Response:
        bucket_id, key = ctx.params["bucket"], ctx.params["key"]
        with self._lock:
            bucket = self._buckets.get(bucket_id)
            stored = self._objects.get((bucket_id, key))
        if bucket is None or not bucket.public:
            raise StorageError.no_such_bucket()
        if stored is None:
            raise StorageError.no_such_key()
        return self._render(ctx.request, stored)

    async def _get_signed_object(self, ctx: _Context) -> Response:
        token = ctx.request.query_params.get("token")
        if token is None:
            raise StorageError.schema("querystring must have required property 'token'")
        payload = self._verify_url_token(token)
        if payload.get("url") != f"{ctx.params['bucket']}/{ctx.params['key']}":
            raise StorageError.invalid_signature()
        with self._lock:
            stored = self._objects.get((ctx.params["bucket"], ctx.params["key"]))
        if stored is None:
            raise StorageError.no_such_key()
        return self._render(ctx.request, stored, expires=formatdate(float(payload["exp"]), usegmt=True))

    def _render(self, request: Request, stored: StoredObject, *, expires: str | None = None) -> Response:
        if request.headers.get("if-none-match") == stored.etag:
            return Response(status_code=304)
        headers = {
            "accept-ranges": "bytes",
            "content-type": "text/plain" if "text/html" in stored.content_type else stored.content_type,
            "etag": stored.etag,
            "content-length": str(stored.size),
            "last-modified": formatdate(stored.updated_at, usegmt=True),
        }
        if expires is not None:
            headers["expires"] = expires
        else:
            headers["cache-control"] = stored.cache_control
        download = request.query_params.get("download")
        if download == "":
            headers["content-disposition"] = "attachment;"
        elif download is not None:
            encoded = quote(download, safe="-_.!~*'()")
            headers["content-disposition"] = f"attachment; filename={encoded}; filename*=UTF-8''{encoded};"
        body = b"" if request.method == "HEAD" else stored.data
        return Response(body, 200, headers=headers)

    # -- signed URLs ------------------------------------------------------------------------------------------

    async def _sign_url(self, ctx: _Context) -> Response:
        body = _json_object(ctx.body)
        expires_in = _expires_in(body)
        bucket_id, key = ctx.params["bucket"], ctx.params["key"]
        _check_bucket_name(bucket_id)
        with self._lock:
            stored = self._objects.get((bucket_id, key))
        if stored is None or not ctx.caller.bypasses_rls:
            raise StorageError.no_such_key()
        return _json({"signedURL": self._signed_path(bucket_id, key, expires_in)})

    async def _sign_urls(self, ctx: _Context) -> Response:
        body = _json_object(ctx.body)
        expires_in = _expires_in(body)
        paths = _required(body, "paths", list)
        bucket_id = ctx.params["bucket"]
        _check_bucket_name(bucket_id)
        results = []
        for path in paths:
            with self._lock:
                visible = (bucket_id, path) in self._objects and ctx.caller.bypasses_rls
            results.append(
                {
                    "error": None if visible else "Either the object does not exist or you do not have access to it",
                    "path": path,
                    "signedURL": self._signed_path(bucket_id, path, expires_in) if visible else None,
                }
            )
        return _json(results)

    def _signed_path(self, bucket_id: str, key: str, expires_in: int) -> str:
        now = int(self._clock())
        token = jwt.encode(
            {"url": f"{bucket_id}/{key}", "iat": now, "exp": now + expires_in}, self._url_secret, algorithm="HS256"
        )
        return f"/object/sign/{bucket_id}/{key}?token={token}"

    def _verify_url_token(self, token: str) -> dict[str, Any]:
        try:
            # Expiry is checked against the fake's clock, so tests can move time instead of sleeping.
            payload: dict[str, Any] = jwt.decode(
                token, self._url_secret, algorithms=["HS256"], options={"verify_exp": False, "verify_iat": False}
            )
        except jwt.InvalidSignatureError as exc:
            raise StorageError.invalid_jwt("invalid signature") from exc
        except jwt.PyJWTError as exc:
            raise StorageError.invalid_jwt("jwt malformed") from exc
        if float(payload.get("exp", 0)) <= self._clock():
            raise StorageError.invalid_jwt("jwt expired")
        return payload

    # -- listing and removal ----------------------------------------------------------------------------------

    async def _list_objects(self, ctx: _Context) -> Response:
        body = _json_object(ctx.body)
        prefix = _required(body, "prefix", str)
        limit = _coerce_int(body.get("limit"), "limit", minimum=1) or 100
        offset = _coerce_int(body.get("offset"), "offset", minimum=0) or 0
        search = _optional(body, "search", str) or ""
        sort_by = body.get("sortBy") or {}
        column, order = sort_by.get("column", "name"), sort_by.get("order", "asc")
        if column not in _SORT_COLUMNS:
            raise StorageError.schema("body/sortBy/column must be equal to one of the allowed values")
        if order not in ("asc", "desc"):
            raise StorageError.schema("body/sortBy/order must be equal to one of the allowed values")
        _check_bucket_name(ctx.params["bucket"])
        if not ctx.caller.bypasses_rls:
            return _json([])
        if prefix and not prefix.endswith("/"):
            prefix += "/"  # object.ts: a prefix is always a folder
        with self._lock:
            objects = [o for (b, _), o in self._objects.items() if b == ctx.params["bucket"]]
        return _json(_search(objects, prefix, search, limit, offset, column, order))

    async def _delete_objects(self, ctx: _Context) -> Response:
        body = _json_object(ctx.body)
        prefixes = _required(body, "prefixes", list)
        if not prefixes:
            raise StorageError.schema("body/prefixes must NOT have fewer than 1 items")
        bucket_id = ctx.params["bucket"]
        _check_bucket_name(bucket_id)
        if not ctx.caller.bypasses_rls:
            return _json([])
        deleted = []
        with self._lock:
            for name in dict.fromkeys(p for p in prefixes if isinstance(p, str)):
                stored = self._objects.pop((bucket_id, name), None)
                if stored is not None:
                    deleted.append(stored.row())
        return _json(deleted)

    async def _delete_object(self, ctx: _Context) -> Response:
        bucket_id, key = ctx.params["bucket"], ctx.params["key"]
        _check_bucket_name(bucket_id)
        with self._lock:
            if (bucket_id, key) not in self._objects or not ctx.caller.bypasses_rls:
                raise StorageError.no_such_key()
            del self._objects[(bucket_id, key)]
        return _json({"message": "Successfully deleted"})


# -- helpers -----------------------------------------------------------------------------------------------------


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status, media_type="application/json; charset=utf-8")


def _iso(timestamp: float) -> str:
    """A timestamptz as node-pg's Date serialises it: milliseconds, UTC, ``Z``."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _matches(rule_method: str, rule_path: PathPattern, method: str, path: str) -> bool:
    if rule_method.upper() not in ("*", method.upper()):
        return False
    if isinstance(rule_path, re.Pattern):
        return rule_path.search(path) is not None
    return path.startswith(rule_path)


def _default_fault_body(status: int) -> dict[str, Any]:
    """What answers with this HTTP status in production: the server itself, or Kong in front of it."""
    gateway = {
        502: "An invalid response was received from the upstream server",
        503: "failure to get a peer from the ring-balancer",
        504: "The upstream server is timing out",
    }
    if status in gateway:
        return {"message": gateway[status]}
    if status == 429:
        return StorageError.too_many_connections().body()
    if status >= 500:
        return StorageError(status, "InternalError", "Internal server error").body()
    return StorageError(status, "InvalidRequest", "Injected fault").body()


async def _read_multipart(request: Request) -> _Multipart | None:
    """The text fields before the first file part, and that part (as @fastify/multipart's ``request.file()``)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return None
    try:
        form = await request.form()
    except Exception:
        return _Multipart(fields={}, file=None)
    try:
        fields: dict[str, str] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                part = _FilePart(value.filename, value.headers.get("content-type"), await value.read())
                return _Multipart(fields=fields, file=part)
            fields.setdefault(name, value)
        return _Multipart(fields=fields, file=None)
    finally:
        await form.close()


def _busboy_mime_type(header: str | None) -> str:
    """busboy keeps a part's type/subtype only, lower-cased; a part without Content-Type is text/plain."""
    mime = (header or "").split(";", 1)[0].strip().lower()
    return mime or "text/plain"


def _check_allowed_mime_type(mime_type: str, allowed: tuple[str, ...] | None) -> None:
    if not allowed:
        return
    requested = mime_type.split("/")
    if len(requested) < 2:
        raise StorageError.invalid_mime_type(mime_type)
    for entry in allowed:
        allowed_type, _, allowed_ext = entry.partition("/")
        if allowed_type == requested[0] and allowed_ext in ("*", requested[1]):
            return
    raise StorageError.invalid_mime_type(mime_type)


def _check_bucket_name(name: str) -> None:
    if not name or not _VALID_BUCKET_NAME.fullmatch(name):
        raise StorageError.invalid_bucket_name()


def _parse_allowed_mime_types(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise StorageError.schema("body/allowed_mime_types must be array")
    kept = tuple(v for v in value if v)
    for mime in kept:
        if len(mime) > 1000 or not _VALID_ALLOWED_MIME.match(mime):
            raise StorageError.invalid_mime_type(mime)
    return kept


def _parse_file_size(value: str) -> int:
    match = _FILE_SIZE.fullmatch(value)
    if match is None:
        raise StorageError.invalid_file_size_limit()
    amount = float(f"{float(match[1]):.3g}")
    return int(amount * {"gb": 1e9, "mb": 1e6, "kb": 1e3, "b": 1}[match[2].lower()])


def _parse_json_object(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _parse_base64_json(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        return _parse_json_object(base64.b64decode(text).decode())
    except (binascii.Error, UnicodeDecodeError):
        return {}


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body) if body else None
    except ValueError:
        raise StorageError(400, None, "Body is not valid JSON", error="Bad Request") from None
    if not isinstance(value, dict):
        raise StorageError.schema("body must be object")
    return value


def _required(body: Mapping[str, Any], name: str, kind: type) -> Any:
    if name not in body:
        raise StorageError.schema(f"body must have required property '{name}'")
    return _optional(body, name, kind)


def _optional(body: Mapping[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise StorageError.schema(f"body/{name} must be {'array' if kind is list else 'string'}")
    return value


def _coerce_bool(value: Any, name: str) -> bool | None:
    """Fastify's ajv runs with coerceTypes: "true"/"false" (and 1/0) pass as booleans."""
    if value is None or isinstance(value, bool):
        return value
    if value in ("true", 1):
        return True
    if value in ("false", 0):
        return False
    raise StorageError.schema(f"body/{name} must be boolean")


def _coerce_int(value: Any, name: str, *, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise StorageError.schema(f"body/{name} must be integer")
    if value < minimum:
        raise StorageError.schema(f"body/{name} must be >= {minimum}")
    return value


def _expires_in(body: Mapping[str, Any]) -> int:
    if "expiresIn" not in body:
        raise StorageError.schema("body must have required property 'expiresIn'")
    value = _coerce_int(body["expiresIn"], "expiresIn", minimum=1)
    assert value is not None
    return value


def _info(stored: StoredObject) -> dict[str, Any]:
    # InfoRenderer's body. The route does not select updated_at, so last_modified is undefined and dropped.
    return {
        "id": stored.id,
        "name": stored.name,
        "version": stored.version,
        "bucket_id": stored.bucket,
        "size": stored.size,
        "content_type": stored.content_type,
        "cache_control": stored.cache_control,
        "etag": stored.etag,
        "metadata": stored.user_metadata,
        "created_at": _iso(stored.created_at),
    }


def _ilike(pattern: str) -> re.Pattern[str]:
    """A SQL ILIKE pattern (``%``, ``_``, backslash escapes) as a regex."""
    out, escaped = [], False
    for char in pattern:
        if escaped:
            out.append(re.escape(char))
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "%":
            out.append(".*")
        elif char == "_":
            out.append(".")
        else:
            out.append(re.escape(char))
    return re.compile("".join(out), re.IGNORECASE | re.DOTALL)


def _search(
    objects: list[StoredObject], prefix: str, search: str, limit: int, offset: int, column: str, order: str
) -> list[dict[str, Any]]:
    """``storage.search``: folders one level below ``prefix`` first, then the files at that level."""
    levels = len(prefix.split("/"))
    pattern = _ilike(prefix + search + "%")
    matching = [o for o in objects if pattern.fullmatch(o.name)]
    descending = order == "desc"
    folders = sorted(
        {o.name.split("/")[levels - 1] for o in matching if len(o.name.split("/")) != levels}, reverse=descending
    )
    files = [o for o in matching if len(o.name.split("/")) == levels]

    def sort_key(o: StoredObject) -> Any:
        return {
            "name": o.name.split("/")[levels - 1],
            "updated_at": o.updated_at,
            "created_at": o.created_at,
            "last_accessed_at": o.last_accessed_at,
        }[column]

    files.sort(key=sort_key, reverse=descending)
    rows: list[dict[str, Any]] = [
        {"name": folder, "id": None, "updated_at": None, "created_at": None, "last_accessed_at": None, "metadata": None}
        for folder in folders
    ]
    rows += [
        {
            "name": o.name.split("/")[levels - 1],
            "id": o.id,
            "updated_at": _iso(o.updated_at),
            "created_at": _iso(o.created_at),
            "last_accessed_at": _iso(o.last_accessed_at),
            "metadata": o.metadata(),
        }
        for o in files
    ]
    return rows[offset : offset + limit]
