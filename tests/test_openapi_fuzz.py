"""The app against its own OpenAPI schema, fuzzed by schemathesis: no 5xx anywhere, every status code documented,
every response body and header matching what the schema documents, API keys enforced where the schema requires them.

The app runs in process on temporary embedded services (SQLite, a storage folder, scripted providers, no worker)
with API keys on and rate limits off, so the fuzzer reaches the routes. One product is seeded and processed, so rows
with variants and URLs are validated too. Bounded and deterministic: a fixed seed, derandomized Hypothesis and a
fixed number of examples per operation, a few seconds in all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import UUID

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings, strategies
from starlette.types import Receive, Scope, Send

from config import Settings
from main import create_app
from pipeline import initial_variants
from tests.conftest import ring_photo
from worker import Worker

API_KEY = "fuzz-" + "k" * 24
SEEDED = UUID("6f1b0d36-94a4-4c8e-9a55-0d1d3a4c2b10")
PHOTO = ring_photo(64)
SETTINGS = {"max_upload_bytes": 200_000, "rate_limit_per_minute": 0, "api_keys": API_KEY}
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance", "ignored_auth")
# Positive and negative data checks only where the schema can say what is valid: an upload is schema-valid bytes
# whether or not they are a photo, and multipart turns every value into a string.
DATA_CHECKS = {"positive_data_acceptance": {"enabled": True}, "negative_data_rejection": {"enabled": True}}


class AppUnderTest:
    """The ASGI app schemathesis is bound to: it forwards to the app the running test built on its own services.

    Schemathesis needs an app when the schema is loaded, at import; the services need a test's temporary folder.
    The lifespan is answered here, since the apps behind it are built with their services and start nothing.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Any]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await self.app(scope, receive, send)


# Only /openapi.json is served by this first app; no test sends it anything else.
APP = AppUnderTest(create_app(Settings(_env_file=None, run_worker=False, **SETTINGS)))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP, config=schemathesis.Config.from_dict({
    "seed": 20261125,
    "auth": {"openapi": {"APIKeyHeader": {"api_key": API_KEY}}},
    "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
    "operations": [{"include-method": "GET", "checks": DATA_CHECKS}],
}))


@schema.hook
def flatmap_body(_context: Any, body: Any) -> Any:
    # Half the uploads carry a real photo, so 202 responses (and the rows they create) are checked too.
    if isinstance(body, dict) and "file" in body:
        return strategies.sampled_from([body, {**body, "file": PHOTO}])
    return strategies.just(body)


@schema.hook
def flatmap_path_parameters(_context: Any, path_parameters: Any) -> Any:
    # Half the valid ids name the seeded product, so 200 rows and re-triggers are checked, not only 404s.
    value = path_parameters.get("product_id") if isinstance(path_parameters, dict) else None
    try:
        UUID(str(value))
    except ValueError:
        return strategies.just(path_parameters)
    return strategies.sampled_from([path_parameters, {**path_parameters, "product_id": str(SEEDED)}])


@pytest.fixture
async def app_under_test(make_services: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    services = await make_services(**SETTINGS)
    layout = services.layout
    raw_url = await services.images.upload(layout.raw_bucket, layout.raw_path(SEEDED), PHOTO,
                                           content_type="image/jpeg")
    await services.store.create_product(product_id=SEEDED, title="Seeded ring", jewellery_type="ring",
                                       raw_image_url=raw_url, variants=initial_variants(services.variant_specs))
    assert await Worker(services=services, retry_backoff_s=0).run_once() == 1
    monkeypatch.setattr(APP, "app", create_app(services=services))
    yield


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
@pytest.mark.usefixtures("app_under_test")
def test_the_api_honours_its_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(timeout=15)


@pytest.mark.parametrize(("method", "path", "request_kwargs", "status"), [
    ("POST", "/process", {"files": {"file": ("ring.jpg", PHOTO, "image/jpeg")}, "data": {"title": "Ring"}}, 202),
    ("POST", f"/process/{SEEDED}", {}, 202),
    ("GET", f"/product/{SEEDED}", {}, 200),
    ("GET", "/products", {}, 200),
    ("GET", "/health", {}, 200),
    ("POST", "/process", {"files": {"file": ("a.txt", b"not an image", "text/plain")}}, 415),
    ("POST", "/process", {"files": {"file": ("a.jpg", b"", "image/jpeg")}}, 422),
    ("POST", "/process", {"files": {"file": ("a.jpg", PHOTO, "image/jpeg")}, "data": {"title": "t" * 201}}, 422),
    ("POST", "/process", {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}, 400),
    ("GET", "/product/not-a-uuid", {}, 422),
    ("GET", f"/product/{UUID(int=1)}", {}, 404),
])
async def test_each_documented_outcome_matches_the_schema(
    app_under_test: None, method: str, path: str, request_kwargs: dict[str, Any], status: int
) -> None:
    """The outcomes the fuzzer may not hit, sent on purpose and validated against the operation's schema."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=APP.app), base_url="http://testserver",
                                 headers={"X-API-Key": API_KEY}, timeout=15) as client:
        response = await client.request(method, path, **request_kwargs)
        await response.request.aread()  # schemathesis reads the request it validates against
    assert response.status_code == status, response.text
    template = path if path in ("/process", "/products", "/health") else (
        "/process/{product_id}" if path.startswith("/process/") else "/product/{product_id}")
    schema[template][method].validate_response(response)


def test_the_schema_documents_the_upload_routes_fully() -> None:
    """Statuses an upload route can return whatever the request: the ones the fuzzer might not reach by chance."""
    for path in ("/process", "/process/{product_id}"):
        documented = set(schema.raw_schema["paths"][path]["post"]["responses"])
        assert {"202", "400", "401", "413", "415", "422", "429", "503"} <= documented, (path, sorted(documented))
