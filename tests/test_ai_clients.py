"""The Reve and NanoBanana clients against respx routes built to PROVIDERS.md, with call counts asserted."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest
import respx
from pydantic import SecretStr

from ai_clients import NanobanaClient, ReveClient, VariantRequest
from config import Settings
from errors import ProviderRejected, ProviderUnavailable
from retrying import RetryPolicy

REVE = "https://api.reve.test"
NANO = "https://api.nanobanana.test"
FILES = "https://files.nanobanana.test"
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


class SleepRecorder:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture
async def http():
    async with httpx.AsyncClient() as client:
        yield client


def reve_client(http: httpx.AsyncClient, retry: RetryPolicy | None = None) -> ReveClient:
    return ReveClient(
        http=http,
        api_key=SecretStr("papi.secret-key"),
        base_url=REVE,
        prompt="Remove the background",
        version="latest",
        retry=retry or RetryPolicy.immediate(attempts=4),
        limiter=asyncio.Semaphore(2),
    )


def reve_ok(**extra: object) -> httpx.Response:
    body = {"image": base64.b64encode(PNG).decode(), "version": "reve-edit@20250915", "content_violation": False,
            "request_id": "rsid-1", "credits_used": 30, "credits_remaining": 970, **extra}
    return httpx.Response(200, json=body)


def reve_error(status: int, code: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error_code": code, "message": f"{code} happened", "params": {}},
                          headers=headers)


# ---- Reve -----------------------------------------------------------------------------------------------------------


@respx.mock
async def test_reve_sends_the_documented_request_and_decodes_the_png(http: httpx.AsyncClient) -> None:
    route = respx.post(f"{REVE}/v1/image/edit").mock(return_value=reve_ok())
    result = await reve_client(http).remove_background(b"raw-jpeg-bytes")
    assert result.image == PNG
    assert route.call_count == 1
    request = route.calls.last.request
    assert request.headers["authorization"] == "Bearer papi.secret-key"
    assert request.headers["accept"] == "application/json"
    body = json.loads(request.content)
    assert set(body) == {"edit_instruction", "reference_image", "version", "postprocessing"}
    assert base64.b64decode(body["reference_image"]) == b"raw-jpeg-bytes"
    assert not body["reference_image"].startswith("data:")
    assert {"process": "remove_background"} in body["postprocessing"]
    assert body["postprocessing"][-1] == {"process": "remove_background"}


@respx.mock
async def test_reve_content_violation_is_a_permanent_failure_not_a_result(http: httpx.AsyncClient) -> None:
    route = respx.post(f"{REVE}/v1/image/edit").mock(return_value=reve_ok(image="", content_violation=True))
    with pytest.raises(ProviderRejected, match="content violation"):
        await reve_client(http).remove_background(b"x")
    assert route.call_count == 1


@pytest.mark.parametrize(("status", "code"), [(400, "PROMPT_TOO_LONG"), (401, "INVALID_API_KEY"),
                                             (402, "INSUFFICIENT_CREDITS"), (404, "NOT_FOUND"),
                                             (422, "INVALID_IMAGE")])
@respx.mock
async def test_reve_client_errors_are_never_retried(http: httpx.AsyncClient, status: int, code: str) -> None:
    route = respx.post(f"{REVE}/v1/image/edit").mock(return_value=reve_error(status, code))
    with pytest.raises(ProviderRejected) as caught:
        await reve_client(http).remove_background(b"x")
    assert route.call_count == 1
    assert caught.value.status_code == status
    assert code in str(caught.value)


@pytest.mark.parametrize("status", [429, 500, 502, 503])
@respx.mock
async def test_reve_transient_errors_are_retried_then_succeed(http: httpx.AsyncClient, status: int) -> None:
    route = respx.post(f"{REVE}/v1/image/edit").mock(side_effect=[reve_error(status, "BUSY"), reve_ok()])
    assert (await reve_client(http).remove_background(b"x")).image == PNG
    assert route.call_count == 2


@respx.mock
async def test_reve_honours_fractional_retry_after(http: httpx.AsyncClient) -> None:
    sleeps = SleepRecorder()
    policy = RetryPolicy(attempts=3, wait_initial_s=5, retry_after_cap_s=60, sleep=sleeps)
    respx.post(f"{REVE}/v1/image/edit").mock(
        side_effect=[reve_error(429, "RATE_LIMITED", {"Retry-After": "1.5"}), reve_ok()]
    )
    await reve_client(http, policy).remove_background(b"x")
    assert sleeps.waits == [1.5]


@respx.mock
async def test_reve_retry_after_is_capped(http: httpx.AsyncClient) -> None:
    sleeps = SleepRecorder()
    policy = RetryPolicy(attempts=3, retry_after_cap_s=10, sleep=sleeps)
    respx.post(f"{REVE}/v1/image/edit").mock(
        side_effect=[reve_error(429, "RATE_LIMITED", {"Retry-After": "3600"}), reve_ok()]
    )
    await reve_client(http, policy).remove_background(b"x")
    assert sleeps.waits == [10]


@respx.mock
async def test_reve_gives_up_after_the_attempt_limit_with_our_own_error(http: httpx.AsyncClient) -> None:
    route = respx.post(f"{REVE}/v1/image/edit").mock(return_value=reve_error(503, "UNAVAILABLE"))
    with pytest.raises(ProviderUnavailable) as caught:
        await reve_client(http, RetryPolicy.immediate(attempts=3)).remove_background(b"x")
    assert route.call_count == 3
    assert caught.value.retryable


@respx.mock
async def test_reve_transport_errors_are_retried(http: httpx.AsyncClient) -> None:
    route = respx.post(f"{REVE}/v1/image/edit").mock(
        side_effect=[httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), reve_ok()]
    )
    assert (await reve_client(http).remove_background(b"x")).image == PNG
    assert route.call_count == 3


@pytest.mark.parametrize("image", ["", "!!!not-base64!!!"])
@respx.mock
async def test_reve_200_without_a_usable_image_fails_once(http: httpx.AsyncClient, image: str) -> None:
    route = respx.post(f"{REVE}/v1/image/edit").mock(return_value=reve_ok(image=image))
    with pytest.raises(ProviderRejected):
        await reve_client(http).remove_background(b"x")
    assert route.call_count == 1


@respx.mock
async def test_reve_key_never_appears_in_errors(http: httpx.AsyncClient) -> None:
    respx.post(f"{REVE}/v1/image/edit").mock(return_value=reve_error(401, "INVALID_API_KEY"))
    with pytest.raises(ProviderRejected) as caught:
        await reve_client(http).remove_background(b"x")
    assert "papi.secret-key" not in str(caught.value)


def test_default_reve_prompt_fits_and_a_long_one_is_refused() -> None:
    assert len(Settings(_env_file=None).reve_prompt) <= 2560
    with pytest.raises(ValueError, match="2560"):
        Settings(_env_file=None, reve_prompt="x" * 2561)


# ---- NanoBanana -----------------------------------------------------------------------------------------------------


def nano_client(http: httpx.AsyncClient, retry: RetryPolicy | None = None, deadline_s: float = 5.0,
                https_only: bool = False) -> NanobanaClient:
    return NanobanaClient(
        http=http,
        api_key=SecretStr("nano-secret"),
        base_url=NANO,
        callback_url="https://shop.example/callbacks/nanobanana",
        retry=retry or RetryPolicy.immediate(attempts=4),
        limiter=asyncio.Semaphore(8),
        poll_interval_s=0.01,
        deadline_s=deadline_s,
        https_only_downloads=https_only,
    )


def request_for(index: int = 1) -> VariantRequest:
    spec = Settings(_env_file=None).variant_specs()[index - 1]
    return VariantRequest(product_id="p1", spec=spec, cutout_png=PNG, cutout_url="https://cdn.example/cut.png")


def envelope(code: int = 200, data: object = None, msg: str = "success", status: int = 200,
             headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"code": code, "msg": msg, "data": data}, headers=headers)


def record(flag: int, url: str | None = None, error: str | None = None) -> httpx.Response:
    return envelope(data={"taskId": "t1", "successFlag": flag,
                          "response": {"resultImageUrl": url} if url is not None else None,
                          "errorCode": 0 if error is None else 1, "errorMessage": error})


class Submitted:
    def __init__(self) -> None:
        self.ids: list[str] = []

    async def __call__(self, task_id: str) -> None:
        self.ids.append(task_id)


def nano_routes(poll: list[httpx.Response] | httpx.Response, download: object = None):
    submit = respx.post(f"{NANO}/api/v1/nanobanana/generate").mock(return_value=envelope(data={"taskId": "t1"}))
    poll_route = respx.get(f"{NANO}/api/v1/nanobanana/record-info")
    if isinstance(poll, list):
        poll_route.mock(side_effect=poll)
    else:
        poll_route.mock(return_value=poll)
    file_route = respx.get(f"{FILES}/r.png").mock(
        side_effect=download if isinstance(download, list) else None,
        return_value=None if isinstance(download, list) else httpx.Response(200, content=PNG),
    )
    return submit, poll_route, file_route


@respx.mock
async def test_nanobanana_submit_poll_download(http: httpx.AsyncClient) -> None:
    submit, poll, download = nano_routes([record(0), record(0), record(1, f"{FILES}/r.png")])
    submitted = Submitted()
    assert await nano_client(http).generate(request_for(2), task_id=None, on_submitted=submitted) == PNG
    assert (submit.call_count, poll.call_count, download.call_count) == (1, 3, 1)
    assert submitted.ids == ["t1"]
    body = json.loads(submit.calls.last.request.content)
    assert body["type"] == "IMAGETOIAMGE"
    assert body["imageUrls"] == ["https://cdn.example/cut.png"]
    assert body["callBackUrl"] == "https://shop.example/callbacks/nanobanana"
    assert body["numImages"] == 1
    assert body["image_size"] == "1:1"
    assert "Velvet" in body["prompt"] or "velvet" in body["prompt"]
    assert submit.calls.last.request.headers["authorization"] == "Bearer nano-secret"
    assert poll.calls.last.request.url.params["taskId"] == "t1"
    assert "task_id" not in poll.calls.last.request.url.params
    # The result lives on a file host: the API key must not travel there.
    assert "authorization" not in download.calls.last.request.headers


@pytest.mark.parametrize("code", [400, 401, 402])
@respx.mock
async def test_nanobanana_body_code_errors_with_http_200_are_permanent(http: httpx.AsyncClient, code: int) -> None:
    submit = respx.post(f"{NANO}/api/v1/nanobanana/generate").mock(return_value=envelope(code, msg="nope"))
    with pytest.raises(ProviderRejected, match=f"code {code}"):
        await nano_client(http).generate(request_for(), task_id=None, on_submitted=Submitted())
    assert submit.call_count == 1


@pytest.mark.parametrize("code", [429, 455, 500, 501, 505])
@respx.mock
async def test_nanobanana_transient_body_codes_retry_the_submit(http: httpx.AsyncClient, code: int) -> None:
    submit, _poll, _download = nano_routes(record(1, f"{FILES}/r.png"))
    submit.mock(side_effect=[envelope(code, msg="busy"), envelope(data={"taskId": "t1"})])
    await nano_client(http).generate(request_for(), task_id=None, on_submitted=Submitted())
    assert submit.call_count == 2


@pytest.mark.parametrize("status", [429, 500, 503])
@respx.mock
async def test_nanobanana_transient_http_statuses_retry_the_submit(http: httpx.AsyncClient, status: int) -> None:
    submit, _, _ = nano_routes(record(1, f"{FILES}/r.png"))
    submit.mock(side_effect=[envelope(status, status=status, headers={"Retry-After": "0"}),
                             httpx.ConnectError("reset"), envelope(data={"taskId": "t1"})])
    await nano_client(http).generate(request_for(), task_id=None, on_submitted=Submitted())
    assert submit.call_count == 3


@respx.mock
async def test_nanobanana_poll_failures_are_retried_and_never_resubmit(http: httpx.AsyncClient) -> None:
    submit, poll, _ = nano_routes([httpx.ConnectError("reset"), envelope(500, msg="oops"),
                                   envelope(503, status=503), record(1, f"{FILES}/r.png")])
    await nano_client(http).generate(request_for(), task_id=None, on_submitted=Submitted())
    assert submit.call_count == 1
    assert poll.call_count == 4


@respx.mock
async def test_nanobanana_poll_that_keeps_failing_gives_up_without_resubmitting(http: httpx.AsyncClient) -> None:
    submit, poll, _ = nano_routes(envelope(500, status=500))
    submitted = Submitted()
    with pytest.raises(ProviderUnavailable):
        await nano_client(http, RetryPolicy.immediate(attempts=3)).generate(request_for(), task_id=None,
                                                                            on_submitted=submitted)
    assert submit.call_count == 1
    assert poll.call_count == 3
    assert submitted.ids == ["t1"], "the billed task id was handed over before polling, so it can be resumed"


@respx.mock
async def test_nanobanana_resumes_a_saved_task_without_submitting(http: httpx.AsyncClient) -> None:
    submit, poll, _download = nano_routes(record(1, f"{FILES}/r.png"))
    submitted = Submitted()
    assert await nano_client(http).generate(request_for(), task_id="t1", on_submitted=submitted) == PNG
    assert submit.call_count == 0
    assert submitted.ids == []
    assert poll.call_count == 1


@pytest.mark.parametrize(("flag", "stage"), [(2, "could not be created"), (3, "failed to generate")])
@respx.mock
async def test_nanobanana_failed_tasks_are_permanent(http: httpx.AsyncClient, flag: int, stage: str) -> None:
    submit, poll, download = nano_routes(record(flag, error="NSFW detected"))
    with pytest.raises(ProviderRejected, match=stage):
        await nano_client(http).generate(request_for(), task_id=None, on_submitted=Submitted())
    assert (submit.call_count, poll.call_count, download.call_count) == (1, 1, 0)


@respx.mock
async def test_nanobanana_failed_task_with_empty_error_message_still_says_why(http: httpx.AsyncClient) -> None:
    nano_routes(envelope(data={"taskId": "t1", "successFlag": 3, "errorCode": 0, "errorMessage": ""}))
    with pytest.raises(ProviderRejected, match="no reason given"):
        await nano_client(http).generate(request_for(), task_id=None, on_submitted=Submitted())


@pytest.mark.parametrize("url", ["", None])
@respx.mock
async def test_nanobanana_success_without_url_fails_the_variant(http: httpx.AsyncClient, url: str | None) -> None:
    submit, _, download = nano_routes(
        envelope(data={"taskId": "t1", "successFlag": 1, "response": {"resultImageUrl": url}})
    )
    with pytest.raises(ProviderRejected, match="without a result URL"):
        await nano_client(http).generate(request_for(), task_id=None, on_submitted=Submitted())
    assert (submit.call_count, download.call_count) == (1, 0)


@respx.mock
async def test_nanobanana_unknown_task_is_permanent(http: httpx.AsyncClient) -> None:
    nano_routes(envelope(404, msg="task not found"))
    with pytest.raises(ProviderRejected, match="code 404"):
        await nano_client(http).generate(request_for(), task_id="gone", on_submitted=Submitted())


@respx.mock
async def test_nanobanana_deadline(http: httpx.AsyncClient) -> None:
    submit, poll, _ = nano_routes(record(0))
    with pytest.raises(ProviderUnavailable, match="unfinished"):
        await nano_client(http, deadline_s=0.1).generate(request_for(), task_id=None, on_submitted=Submitted())
    assert submit.call_count == 1
    assert poll.call_count >= 2


@respx.mock
async def test_nanobanana_callback_hint_polls_at_once(http: httpx.AsyncClient) -> None:
    _submit, poll, _ = nano_routes([record(0), record(1, f"{FILES}/r.png")])
    client = NanobanaClient(http=http, api_key=SecretStr("k"), base_url=NANO, callback_url="https://x/cb",
                            retry=RetryPolicy.immediate(), limiter=asyncio.Semaphore(1), poll_interval_s=30)

    async def hint_soon() -> None:
        while poll.call_count == 0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        client.notify("t1")

    hinter = asyncio.create_task(hint_soon())
    result = await asyncio.wait_for(client.generate(request_for(), task_id=None, on_submitted=Submitted()), 5)
    await hinter
    assert result == PNG
    assert poll.call_count == 2


@respx.mock
async def test_nanobanana_download_is_retried_on_5xx_but_an_expired_url_is_final(http: httpx.AsyncClient) -> None:
    _, _, download = nano_routes(record(1, f"{FILES}/r.png"),
                                 download=[httpx.Response(502), httpx.Response(200, content=PNG)])
    assert await nano_client(http).generate(request_for(), task_id=None, on_submitted=Submitted()) == PNG
    assert download.call_count == 2

    respx.get(f"{FILES}/r.png").mock(return_value=httpx.Response(404))
    with pytest.raises(ProviderRejected, match="404"):
        await nano_client(http).generate(request_for(), task_id=None, on_submitted=Submitted())


@respx.mock
async def test_result_download_limits(http: httpx.AsyncClient) -> None:
    nano_routes(record(1, "file:///etc/passwd"))
    with pytest.raises(ProviderRejected, match="not allowed"):
        await nano_client(http).generate(request_for(), task_id=None, on_submitted=Submitted())

    respx.get(f"{NANO}/api/v1/nanobanana/record-info").mock(return_value=record(1, "http://files.test/r.png"))
    with pytest.raises(ProviderRejected, match="not allowed"):
        await nano_client(http, https_only=True).generate(request_for(), task_id=None, on_submitted=Submitted())

    respx.get(f"{NANO}/api/v1/nanobanana/record-info").mock(return_value=record(1, f"{FILES}/r.png"))
    respx.get(f"{FILES}/r.png").mock(return_value=httpx.Response(302, headers={"Location": "https://evil.test/x"}))
    with pytest.raises(ProviderRejected, match="another host"):
        await nano_client(http).generate(request_for(), task_id=None, on_submitted=Submitted())

    respx.get(f"{FILES}/r.png").mock(return_value=httpx.Response(302, headers={"Location": "/moved.png"}))
    respx.get(f"{FILES}/moved.png").mock(return_value=httpx.Response(200, content=PNG))
    assert await nano_client(http).generate(request_for(), task_id=None, on_submitted=Submitted()) == PNG

    respx.get(f"{FILES}/r.png").mock(return_value=httpx.Response(200, content=b"x" * 2048))
    small = NanobanaClient(http=http, api_key=SecretStr("k"), base_url=NANO, callback_url="https://x/cb",
                           retry=RetryPolicy.immediate(), limiter=asyncio.Semaphore(1), poll_interval_s=0.01,
                           max_download_bytes=1024)
    with pytest.raises(ProviderRejected, match="cap"):
        await small.generate(request_for(), task_id=None, on_submitted=Submitted())


@respx.mock
async def test_nanobanana_concurrency_limit_holds_across_calls(http: httpx.AsyncClient) -> None:
    nano_routes(record(1, f"{FILES}/r.png"))
    inflight = 0
    peak = 0

    async def slow_download(_request: httpx.Request) -> httpx.Response:
        nonlocal inflight, peak
        inflight += 1
        peak = max(peak, inflight)
        await asyncio.sleep(0.02)
        inflight -= 1
        return httpx.Response(200, content=PNG)

    respx.get(f"{FILES}/r.png").mock(side_effect=slow_download)
    client = NanobanaClient(http=http, api_key=SecretStr("k"), base_url=NANO, callback_url="https://x/cb",
                            retry=RetryPolicy.immediate(), limiter=asyncio.Semaphore(2), poll_interval_s=0.01)
    await asyncio.gather(*(client.generate(request_for(), task_id=None, on_submitted=Submitted())
                           for _ in range(6)))
    assert peak == 2
