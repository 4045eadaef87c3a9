"""Route an httpx client's requests to in-process ASGI apps by host name, as DNS would to real servers."""

from __future__ import annotations

import httpx


class HostRouter(httpx.AsyncBaseTransport):
    """``HostRouter({"api.reve.test": httpx.ASGITransport(app=fake.app), ...})``. Unknown hosts fail like DNS."""

    def __init__(self, routes: dict[str, httpx.AsyncBaseTransport]) -> None:
        self.routes = routes
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        transport = self.routes.get(request.url.host)
        if transport is None:
            raise httpx.ConnectError(f"no route to {request.url.host}", request=request)
        return await transport.handle_async_request(request)

    async def aclose(self) -> None:
        for transport in self.routes.values():
            await transport.aclose()
