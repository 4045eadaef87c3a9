"""Running the provider fakes, and the faults that live below HTTP.

A fake is a plain ASGI app. It runs three ways:

- in-process, mounted in ``httpx.ASGITransport(app=fake.app)`` (keep ``raise_app_exceptions=True``, the default);
- on a loopback port in a background thread: ``base_url, stop = serve_in_thread(fake.app)``;
- in its own process: ``python -m tests.fakes.reve --port 0`` prints ``READY http://127.0.0.1:<port>`` on stdout
  (see :func:`serve_forever`) and is steered through its ``/__admin`` endpoints.

Connection-level faults, shared by both fakes:

- :class:`Drop`: the connection closes without a response. On a real server (uvicorn) the fake aborts the socket
  before writing anything, so the client's read fails (httpx raises ``RemoteProtocolError`` "Server disconnected
  without sending a response", or ``ReadError`` if the kernel chose a reset). In-process there is no socket:
  the fake raises ``httpx.RemoteProtocolError`` from inside the app, which ``ASGITransport`` passes up to the
  client unchanged. Both modes therefore surface as an ``httpx.TransportError`` at the client.
- :class:`Delay`: sleep, then answer normally. On a real server a client read timeout fires; ``ASGITransport``
  enforces no timeouts, so in-process this only slows the answer down.
- :class:`Stall`: never answer. On a real server the request is held until the client gives up (disconnects) or
  ``STALL_CAP_S`` passes; in-process the fake raises ``httpx.ReadTimeout``, which is what the client's timer
  would have raised.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx
import uvicorn
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

# Scope key under which `expose_transport` stores the server's socket transport (uvicorn only).
TRANSPORT_SCOPE_KEY = "fakes.transport"
STALL_CAP_S = 300.0


@dataclass(frozen=True)
class Drop:
    """Close the connection without sending a response."""

    kind: ClassVar[str] = "drop"


@dataclass(frozen=True)
class Delay:
    """Sleep ``seconds`` before handling the request normally."""

    seconds: float
    kind: ClassVar[str] = "delay"


@dataclass(frozen=True)
class Stall:
    """Never answer: hold the request until the client gives up."""

    kind: ClassVar[str] = "stall"


def expose_transport(app: ASGIApp) -> ASGIApp:
    """Wrap ``app`` so handlers can reach the server's socket transport through the scope.

    uvicorn hands the app its per-request cycle's bound ``send``, whose owner holds the asyncio transport. Only
    that transport can end a connection without a response: an exception before ``http.response.start`` makes
    uvicorn answer 500 instead. Under ``ASGITransport`` or an unknown server nothing is exposed.
    """

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        transport = getattr(getattr(send, "__self__", None), "transport", None)
        if scope["type"] == "http" and transport is not None and hasattr(transport, "abort"):
            scope[TRANSPORT_SCOPE_KEY] = transport
        await app(scope, receive, send)

    return wrapped


def has_socket(request: Request) -> bool:
    """Whether the request arrived over a real socket that the fake can drop."""
    return TRANSPORT_SCOPE_KEY in request.scope


class DroppedConnection(Response):
    """A "response" that closes the connection instead of answering (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(status_code=500)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        transport: Any = scope.get(TRANSPORT_SCOPE_KEY)
        if transport is None:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        transport.abort()
        # connection_lost runs on the next loop iterations; once uvicorn has seen it, it neither sends its own
        # 500 nor logs "returned without starting response" when we return.
        for _ in range(3):
            await asyncio.sleep(0)


async def wait_unless_disconnected(request: Request, seconds: float) -> bool:
    """Sleep up to ``seconds``; return False early if the client disconnected (its timeout fired)."""
    if seconds <= 0:
        return True
    disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({disconnect}, timeout=seconds)
    finally:
        disconnect.cancel()
    return not done


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next message is http.disconnect. Under ASGITransport that only comes
    # after the response, so in-process this waits out the whole timeout, as it should.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def stall(request: Request) -> Response:
    """Hold the request until the client gives up; in-process, raise the client's own timeout error."""
    if not has_socket(request):
        raise httpx.ReadTimeout("Timed out waiting for the fake to answer (stall fault).")
    await wait_unless_disconnected(request, STALL_CAP_S)
    return DroppedConnection()


async def apply_connection_fault(request: Request, fault: object) -> Response | None:
    """Play a connection-level fault; return the response to send, or None to carry on normally."""
    if isinstance(fault, Drop):
        return DroppedConnection()
    if isinstance(fault, Stall):
        return await stall(request)
    if isinstance(fault, Delay):
        if not await wait_unless_disconnected(request, fault.seconds):
            return DroppedConnection()
    return None


def connection_fault_from_json(kind: str, fields: dict[str, Any]) -> Drop | Delay | Stall | None:
    """Build a connection-level fault from its admin-endpoint JSON, or None if ``kind`` is not one."""
    if kind == Drop.kind:
        return Drop(**fields)
    if kind == Stall.kind:
        return Stall(**fields)
    if kind == Delay.kind:
        return Delay(seconds=float(fields["seconds"]))
    return None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # Listening before uvicorn starts lets a parent connect as soon as it has read the URL.
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _url_for(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ipaddress.ip_address(host).version == 6:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _config(app: ASGIApp, *, log_level: str, configure_logging: bool) -> uvicorn.Config:
    return uvicorn.Config(
        expose_transport(app),
        lifespan="off",
        ws="none",
        loop="asyncio",
        proxy_headers=False,
        log_level=log_level,
        log_config=uvicorn.config.LOGGING_CONFIG if configure_logging else None,
        access_log=False,
        timeout_graceful_shutdown=2,
    )


def serve_in_thread(
    app: ASGIApp, host: str = "127.0.0.1", port: int = 0, *, startup_timeout_s: float = 10.0
) -> tuple[str, Callable[[], None]]:
    """Serve ``app`` with uvicorn on its own event loop in a daemon thread.

    Port 0 picks a free port. Returns the real base URL and an idempotent ``stop()`` that shuts the server down
    (in-flight requests get ``timeout_graceful_shutdown`` seconds) and joins the thread.
    """
    sock = _bind(host, port)
    # Leave the test process's logging configuration alone; uvicorn's loggers propagate to the root logger.
    server = uvicorn.Server(_config(app, log_level="warning", configure_logging=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fake-server", daemon=True)
    thread.start()
    lock = threading.Lock()
    stopped = False

    def stop() -> None:
        nonlocal stopped
        with lock:
            if stopped:
                return
            stopped = True
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()

    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive():
            stop()
            raise RuntimeError("the fake's server thread exited during startup")
        if time.monotonic() > deadline:
            stop()
            raise TimeoutError(f"the fake's server did not start within {startup_timeout_s} s")
        time.sleep(0.01)
    return _url_for(sock), stop


def serve_forever(app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> None:
    """Serve ``app`` in the foreground until SIGINT/SIGTERM; print ``READY <base_url>`` once connectable."""
    sock = _bind(host, port)
    server = uvicorn.Server(_config(app, log_level="warning", configure_logging=True))
    print(f"READY {_url_for(sock)}", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
