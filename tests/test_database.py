"""The ProductStore contract, run against every store: SQLite here, and Supabase (real PostgreSQL + PostgREST)
through the `store` fixture's other parameter."""

from __future__ import annotations

import asyncio
from uuid import UUID, uuid4

import httpx
import pytest

from config import Settings
from database import JobStatus, Product, ProductStore, VariantState, VariantStatus
from errors import DatabaseError, JobRunning, LeaseLost, ProductNotFound
from pipeline import initial_variants

SPECS = Settings(_env_file=None).variant_specs()


async def new_product(store: ProductStore, title: str = "Ring") -> Product:
    return await store.create_product(
        product_id=uuid4(), title=title, jewellery_type="ring", raw_image_url=f"http://x/{title}.jpg",
        variants=initial_variants(SPECS),
    )


async def claimed(store: ProductStore, worker: str = "w1", lease_s: float = 60) -> Product:
    await new_product(store)
    job = await store.claim_next_job(worker_id=worker, lease_s=lease_s)
    assert job is not None
    return job


async def test_create_get_and_list_newest_first(store: ProductStore) -> None:
    first = await new_product(store, "first")
    await asyncio.sleep(0.01)
    second = await new_product(store, "second")
    assert first.status == JobStatus.PENDING
    assert first.generated_image_urls == []
    assert first.image_url == first.raw_image_url == "http://x/first.jpg"
    assert [v.label for v in first.variants] == [s.label for s in SPECS]
    assert all(v.status == VariantStatus.PENDING for v in first.variants)

    fetched = await store.get_product(first.id)
    assert fetched is not None and fetched.id == first.id and fetched.title == "first"
    assert await store.get_product(uuid4()) is None

    assert [p.id for p in await store.list_products(limit=10, offset=0)] == [second.id, first.id]
    assert [p.id for p in await store.list_products(limit=1, offset=1)] == [first.id]
    assert await store.list_products(limit=5, offset=5) == []


async def test_claim_takes_the_oldest_pending_job_once(store: ProductStore) -> None:
    first = await new_product(store, "a")
    await asyncio.sleep(0.01)
    await new_product(store, "b")
    job = await store.claim_next_job(worker_id="w1", lease_s=60)
    assert job is not None and job.id == first.id
    assert job.status == JobStatus.PROCESSING
    assert job.attempts == 1
    assert job.lease_owner == "w1"
    assert job.lease_expires_at is not None and job.lease_expires_at > job.updated_at
    second = await store.claim_next_job(worker_id="w2", lease_s=60)
    assert second is not None and second.id != first.id
    assert await store.claim_next_job(worker_id="w3", lease_s=60) is None


async def test_concurrent_claimers_take_each_job_exactly_once(store: ProductStore) -> None:
    created = {(await new_product(store, f"p{i}")).id for i in range(20)}
    claims: dict[str, list[UUID]] = {f"w{i}": [] for i in range(8)}

    async def claimer(worker: str) -> None:
        while (job := await store.claim_next_job(worker_id=worker, lease_s=60)) is not None:
            claims[worker].append(job.id)

    await asyncio.wait_for(asyncio.gather(*(claimer(w) for w in claims)), timeout=60)
    all_claims = [job_id for ids in claims.values() for job_id in ids]
    assert sorted(all_claims) == sorted(created)
    assert len(set(all_claims)) == 20


async def test_heartbeat_extends_only_the_holders_lease(store: ProductStore) -> None:
    job = await claimed(store, lease_s=5)
    assert await store.heartbeat(job.id, worker_id="w1", lease_s=600)
    extended = await store.get_product(job.id)
    assert extended is not None and extended.lease_expires_at is not None and job.lease_expires_at is not None
    assert extended.lease_expires_at > job.lease_expires_at
    assert not await store.heartbeat(job.id, worker_id="intruder", lease_s=600)


async def test_set_variant_replaces_one_entry_and_concurrent_writes_all_land(store: ProductStore) -> None:
    job = await claimed(store)

    async def finish(index: int) -> None:
        state = job.variant(index).model_copy(update={"status": VariantStatus.DONE, "url": f"http://x/v{index}.png"})
        await store.set_variant(job.id, worker_id="w1", variant=state)

    await asyncio.gather(*(finish(i) for i in (1, 2, 3, 4)))
    product = await store.get_product(job.id)
    assert product is not None
    assert [v.url for v in product.variants] == [f"http://x/v{i}.png" for i in (1, 2, 3, 4)]
    assert [v.label for v in product.variants] == [s.label for s in SPECS]
    assert product.generated_image_urls == [], "URLs are written once, at the end"


async def test_writes_need_the_lease(store: ProductStore) -> None:
    job = await claimed(store)
    with pytest.raises(LeaseLost):
        await store.update_job(job.id, worker_id="other", fields={"cutout_url": "http://x/c.png"})
    with pytest.raises(LeaseLost):
        await store.set_variant(job.id, worker_id="other", variant=VariantState(index=1, key="stone", label="S"))
    updated = await store.update_job(job.id, worker_id="w1", fields={"cutout_url": "http://x/c.png"})
    assert updated.cutout_url == "http://x/c.png"
    with pytest.raises(ValueError, match="not a job field"):
        await store.update_job(job.id, worker_id="w1", fields={"title": "hijack"})


async def test_expired_lease_is_recovered_and_the_old_worker_cannot_write(store: ProductStore) -> None:
    job = await claimed(store, lease_s=-1)
    recovered = await store.recover_stale_jobs(max_attempts=3)
    assert [p.id for p in recovered] == [job.id]
    assert recovered[0].status == JobStatus.PENDING and recovered[0].lease_owner is None
    again = await store.claim_next_job(worker_id="w2", lease_s=60)
    assert again is not None and again.id == job.id and again.attempts == 2
    with pytest.raises(LeaseLost):
        await store.update_job(job.id, worker_id="w1", fields={"status": JobStatus.DONE})
    assert not await store.heartbeat(job.id, worker_id="w1", lease_s=60)
    assert await store.recover_stale_jobs(max_attempts=3) == [], "a live lease is left alone"


async def test_a_job_past_max_attempts_ends_failed(store: ProductStore) -> None:
    job = await claimed(store, lease_s=-1)
    for attempt in (2, 3):
        await store.recover_stale_jobs(max_attempts=3)
        job = await store.claim_next_job(worker_id=f"w{attempt}", lease_s=-1)
        assert job is not None and job.attempts == attempt
    [final] = await store.recover_stale_jobs(max_attempts=3)
    assert final.status == JobStatus.FAILED
    assert final.error is not None and "3 attempts" in final.error
    assert await store.claim_next_job(worker_id="w9", lease_s=60) is None


async def test_recovery_that_gives_up_keeps_finished_variants(store: ProductStore) -> None:
    job = await claimed(store, lease_s=-1)
    done = job.variant(3).model_copy(update={"status": VariantStatus.DONE, "url": "http://x/v3.png"})
    await store.set_variant(job.id, worker_id="w1", variant=done)
    [final] = await store.recover_stale_jobs(max_attempts=1)
    assert final.status == JobStatus.DONE
    assert final.generated_image_urls == ["http://x/v3.png"]
    assert final.image_url == "http://x/v3.png"


async def test_release_requeues_then_fails_when_attempts_run_out(store: ProductStore) -> None:
    job = await claimed(store)
    released = await store.release_job(job.id, worker_id="w1", error="reve down", retry_in_s=0, max_attempts=2)
    assert released is not None and released.status == JobStatus.PENDING and released.error is None
    job2 = await store.claim_next_job(worker_id="w1", lease_s=60)
    assert job2 is not None and job2.attempts == 2
    final = await store.release_job(job.id, worker_id="w1", error="reve down", retry_in_s=0, max_attempts=2)
    assert final is not None and final.status == JobStatus.FAILED and final.error == "reve down"
    assert await store.release_job(job.id, worker_id="w1", error="x", retry_in_s=0, max_attempts=2) is None


async def test_release_with_delay_and_refund(store: ProductStore) -> None:
    job = await claimed(store)
    later = await store.release_job(job.id, worker_id="w1", error="busy", retry_in_s=3600, max_attempts=3)
    assert later is not None and later.status == JobStatus.PENDING
    assert await store.claim_next_job(worker_id="w1", lease_s=60) is None, "not before its retry time"

    other = await claimed(store, worker="w2")
    refunded = await store.release_job(other.id, worker_id="w2", error="shutdown", retry_in_s=0, max_attempts=1,
                                       refund_attempt=True)
    assert refunded is not None and refunded.status == JobStatus.PENDING and refunded.attempts == 0


async def test_requeue(store: ProductStore) -> None:
    job = await claimed(store)
    with pytest.raises(JobRunning):
        await store.requeue_product(job.id, variants=initial_variants(SPECS))
    with pytest.raises(ProductNotFound):
        await store.requeue_product(uuid4(), variants=initial_variants(SPECS))
    done = job.variant(1).model_copy(update={"status": VariantStatus.DONE, "url": "http://x/v1.png"})
    await store.set_variant(job.id, worker_id="w1", variant=done)
    await store.update_job(job.id, worker_id="w1", fields={
        "status": JobStatus.DONE, "generated_image_urls": ["http://x/v1.png"], "image_url": "http://x/v1.png",
        "lease_owner": None, "lease_expires_at": None})

    again = await store.requeue_product(job.id, variants=initial_variants(SPECS))
    assert again.status == JobStatus.PENDING and again.attempts == 0
    assert again.generated_image_urls == []
    assert all(v.status == VariantStatus.PENDING and v.url is None for v in again.variants)
    assert again.image_url == again.raw_image_url == job.raw_image_url

    newer = await store.requeue_product(job.id, variants=initial_variants(SPECS), raw_image_url="http://x/new.jpg")
    assert newer.raw_image_url == newer.image_url == "http://x/new.jpg"


# ---- Supabase: a dropped connection --------------------------------------------------------------------------------


class DropFirstRequests(httpx.AsyncBaseTransport):
    """Fails the first ``drops`` requests as a keep-alive connection closed by a proxy would, then passes through."""

    def __init__(self, inner: httpx.AsyncBaseTransport, drops: int) -> None:
        self.inner, self.drops, self.requests = inner, drops, 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        if self.drops > 0:
            self.drops -= 1
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.integration
async def test_supabase_repeats_safe_requests_after_a_dropped_connection_but_never_a_claim(clean_products) -> None:
    from supabase import AsyncClientOptions, acreate_client

    from database import SupabaseStore
    from retrying import RetryPolicy
    from tests.pgstack import IN_PROCESS_URL

    flaky = DropFirstRequests(clean_products.transport(), drops=0)
    async with httpx.AsyncClient(transport=flaky) as http:
        client = await acreate_client(IN_PROCESS_URL, clean_products.service_role_key,
                                      options=AsyncClientOptions(httpx_client=http))
        store = SupabaseStore(client=client, retry=RetryPolicy.immediate(attempts=3))
        product = await new_product(store)

        flaky.drops, flaky.requests = 1, 0
        assert (await store.get_product(product.id)) == product  # a read is repeated (by postgrest-py itself)
        assert flaky.requests == 2

        flaky.drops, flaky.requests = 1, 0
        with pytest.raises(DatabaseError, match="RemoteProtocolError"):
            await store.claim_next_job(worker_id="w1", lease_s=30)  # a claim is not: it may have happened
        assert flaky.requests == 1

        job = await store.claim_next_job(worker_id="w1", lease_s=30)
        assert job is not None and job.id == product.id
        flaky.drops, flaky.requests = 1, 0
        assert await store.heartbeat(job.id, worker_id="w1", lease_s=30)  # heartbeats and variants are repeatable
        assert flaky.requests == 2

        flaky.drops, flaky.requests = 5, 0
        with pytest.raises(DatabaseError):  # a longer outage is reported, after the policy's attempts
            await store.set_variant(job.id, worker_id="w1", variant=job.variants[0])
        assert flaky.requests == 3
