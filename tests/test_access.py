"""Who may spend the shop's credits: API keys, rate limits, CORS, and the production start-up guard."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from config import Settings
from errors import ConfigError
from main import RateLimiter, create_app
from tests.conftest import jpeg_bytes

KEY = "k" * 24
OTHER_KEY = "o" * 24


@pytest.fixture
async def client_for(make_services: Any) -> AsyncIterator[Callable[..., Any]]:
    clients: list[httpx.AsyncClient] = []

    async def make(**settings: Any) -> httpx.AsyncClient:
        services = await make_services(**settings)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(services=services)),
                                   base_url="http://testserver")
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


async def post_photo(client: httpx.AsyncClient, headers: dict[str, str] | None = None) -> httpx.Response:
    return await client.post("/process", files={"file": ("p.jpg", jpeg_bytes(), "image/jpeg")}, headers=headers)


async def test_with_keys_the_spending_and_listing_routes_need_one(client_for: Any) -> None:
    client = await client_for(api_keys=f"{KEY},{OTHER_KEY}")
    missing = await post_photo(client)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert (await post_photo(client, {"X-API-Key": "x" * 24})).status_code == 401
    assert (await post_photo(client, {"Authorization": f"Basic {KEY}"})).status_code == 401
    accepted = await post_photo(client, {"X-API-Key": KEY})
    assert accepted.status_code == 202
    assert (await post_photo(client, {"Authorization": f"Bearer {OTHER_KEY}"})).status_code == 202

    product_id = accepted.json()["product_id"]
    assert (await client.post(f"/process/{product_id}")).status_code == 401
    assert (await client.post(f"/process/{product_id}", headers={"X-API-Key": KEY})).status_code in (202, 409)
    assert (await client.get("/products")).status_code == 401
    assert (await client.get("/products", headers={"X-API-Key": KEY})).status_code == 200
    # Open: frontends poll products by their unguessable id, and load balancers check health.
    assert (await client.get(f"/product/{product_id}")).status_code == 200
    assert (await client.get("/health")).status_code == 200


async def test_no_keys_means_open(client_for: Any) -> None:
    client = await client_for()
    assert (await post_photo(client)).status_code == 202
    assert (await client.get("/products")).status_code == 200


async def test_uploads_are_rate_limited_per_key_with_retry_after(client_for: Any) -> None:
    client = await client_for(api_keys=f"{KEY},{OTHER_KEY}", rate_limit_per_minute=6, rate_limit_burst=2)
    assert [(await post_photo(client, {"X-API-Key": KEY})).status_code for _ in range(2)] == [202, 202]
    throttled = await post_photo(client, {"X-API-Key": KEY})
    assert throttled.status_code == 429
    assert 1 <= int(throttled.headers["retry-after"]) <= 10
    assert (await post_photo(client, {"X-API-Key": OTHER_KEY})).status_code == 202, "limits are per key"
    assert (await client.get("/products", headers={"X-API-Key": KEY})).status_code == 200, "reads are not limited"


async def test_anonymous_uploads_are_rate_limited_per_address(client_for: Any) -> None:
    client = await client_for(rate_limit_per_minute=60, rate_limit_burst=1)
    assert (await post_photo(client)).status_code == 202
    assert (await post_photo(client)).status_code == 429


def test_rate_limiter_refills() -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=2, clock=lambda: now[0])
    assert [limiter.take("a"), limiter.take("a")] == [0, 0]
    assert limiter.take("a") == pytest.approx(1.0)
    now[0] = 1.0
    assert limiter.take("a") == 0
    assert limiter.take("b") == 0


async def test_cors_lists_origins_and_never_pairs_a_wildcard_with_credentials(client_for: Any) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key"}
    listed = await client_for(cors_origins="https://shop.example")
    allowed = await listed.options("/process", headers={"Origin": "https://shop.example", **preflight})
    assert allowed.headers["access-control-allow-origin"] == "https://shop.example"
    assert allowed.headers.get("access-control-allow-credentials") == "true"
    refused = await listed.options("/process", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in refused.headers

    open_cors = await client_for(cors_origins="*")
    response = await open_cors.get("/health", headers={"Origin": "https://anyone.example"})
    assert response.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in response.headers


async def test_401_and_429_are_readable_by_browsers(client_for: Any) -> None:
    client = await client_for(api_keys=KEY, cors_origins="https://shop.example")
    response = await post_photo(client, {"Origin": "https://shop.example"})
    assert response.status_code == 401
    assert response.headers["access-control-allow-origin"] == "https://shop.example"


def test_production_without_keys_refuses_to_start_unless_told(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ConfigError, match="API_KEYS"):
        make_settings(environment="production").check_access()
    make_settings(environment="production", allow_anonymous=True).check_access()
    make_settings(environment="production", api_keys=KEY).check_access()
    with pytest.raises(ValueError, match="16 characters"):
        make_settings(api_keys="short")


async def test_openapi_shows_the_key_schemes(client_for: Any) -> None:
    client = await client_for(api_keys=KEY)
    schema = (await client.get("/openapi.json")).json()
    assert {"APIKeyHeader", "HTTPBearer"} <= set(schema["components"]["securitySchemes"])
    assert schema["paths"]["/process"]["post"]["security"]
