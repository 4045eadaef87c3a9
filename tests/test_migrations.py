"""The migrations on a real PostgreSQL behind a real PostgREST: idempotence, the seed-table upgrade, row level
security and grants as the frontend's anon key meets them, realtime, and the updated_at trigger."""

from __future__ import annotations

import subprocess
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import pytest
from postgrest import APIError

from tests.conftest import REPO

MIGRATIONS = sorted((REPO / "migrations").glob("0*.sql"))


def psql(dsn: str, sql: str) -> str:
    result = subprocess.run(["psql", dsn, "-v", "ON_ERROR_STOP=1", "-At", "-f", "-"], input=sql, text=True,
                            capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def apply_file(dsn: str, path: Path) -> None:
    result = subprocess.run(["psql", dsn, "-v", "ON_ERROR_STOP=1", "-q", "-f", str(path)], text=True,
                            capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, f"{path.name}: {result.stderr}"


@pytest.fixture
def scratch_db(supabase_stack) -> str:
    """A fresh database in the same cluster, for migrations that must start from a given state."""
    name = f"scratch_{uuid4().hex[:8]}"
    supabase_stack.execute(f"create database {name}")
    parts = urlsplit(supabase_stack.superuser_dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


def test_migrations_build_an_empty_project_and_apply_twice(scratch_db: str) -> None:
    psql(scratch_db, "create publication supabase_realtime")  # as on Supabase
    for _ in range(2):
        for migration in MIGRATIONS:
            apply_file(scratch_db, migration)
    columns = set(psql(scratch_db, "select column_name from information_schema.columns "
                                   "where table_name = 'products'").split())
    assert columns >= {"id", "title", "jewellery_type", "image_url", "generated_image_urls", "created_at",
                       "updated_at", "status", "attempts", "error", "lease_owner", "lease_expires_at", "raw_image_url",
                       "cutout_url", "raw_sha256", "variants", "cutout_confidence", "marketplace_image_url"}
    assert psql(scratch_db, "select relrowsecurity from pg_class where relname = 'products'") == "t"
    assert psql(scratch_db, "select count(*) from pg_publication_tables where tablename = 'products'") == "1"


def test_migrations_run_on_plain_postgresql_without_the_realtime_publication(scratch_db: str) -> None:
    for migration in MIGRATIONS:
        apply_file(scratch_db, migration)
    assert psql(scratch_db, "select count(*) from pg_publication") == "0"


def test_a_seed_project_keeps_its_rows_and_does_not_requeue_them(scratch_db: str) -> None:
    psql(scratch_db, """
        create table public.products (
          id uuid primary key default gen_random_uuid(), title text, jewellery_type text, image_url text,
          created_at timestamptz default now());
        insert into public.products (title, image_url) values ('old with images', 'http://x/raw1.jpg'),
                                                              ('old without', 'http://x/raw2.jpg');""")
    apply_file(scratch_db, REPO / "migrations" / "add_generated_image_urls.sql")
    psql(scratch_db, """update public.products set generated_image_urls = '["http://x/v1.png"]'
                        where title = 'old with images'""")
    for migration in MIGRATIONS:
        apply_file(scratch_db, migration)
    rows = dict(line.split("|", 1) for line in psql(
        scratch_db, "select title, status || '|' || coalesce(error, '') from products").splitlines())
    assert rows["old with images"] == "done|"
    status, error = rows["old without"].split("|")
    assert status == "failed" and "re-trigger" in error
    psql(scratch_db, "insert into public.products (title) values ('new')")
    assert psql(scratch_db, "select status from products where title = 'new'") == "pending"
    assert psql(scratch_db, "select count(*) from claim_next_job('w', 60)") == "1"


async def test_anon_can_read_a_product_but_never_write_or_run_jobs(supabase_stack, supabase_client) -> None:
    from database import SupabaseStore

    store = SupabaseStore(client=supabase_client)
    product = await store.create_product(product_id=uuid4(), title="Ring", jewellery_type=None,
                                         raw_image_url="http://x/r.jpg", variants=[])
    async with supabase_stack.supabase(key=supabase_stack.anon_key) as anon:
        read = await anon.table("products").select("*").eq("id", str(product.id)).execute()
        assert [row["title"] for row in read.data] == ["Ring"]

        writes = [
            anon.table("products").update({"title": "hacked"}).eq("id", str(product.id)),
            anon.table("products").insert({"title": "spam"}),
            anon.table("products").delete().eq("id", str(product.id)),
            anon.table("products").upsert({"id": str(product.id), "title": "hacked"}),
        ]
        for write in writes:
            with pytest.raises(APIError) as refused:
                await write.execute()
            assert refused.value.code == "42501"
        with pytest.raises(APIError) as rpc:
            await anon.rpc("claim_next_job", {"p_worker": "anon", "p_lease_seconds": 60}).execute()
        assert rpc.value.code == "42501"
    async with supabase_stack.supabase(key=supabase_stack.mint_jwt("authenticated")) as user:
        with pytest.raises(APIError):
            await user.rpc("recover_stale_jobs", {"p_max_attempts": 1}).execute()
    after = await store.get_product(product.id)
    assert after is not None and after.title == "Ring", "the row survived anon's update and delete"


def test_updated_at_is_kept_by_the_database(clean_products) -> None:
    stack = clean_products
    product_id = stack.execute("insert into products (title) values ('t') returning id")
    before = stack.execute(f"select updated_at from products where id = '{product_id}'")
    stack.execute(f"update products set title = 'u' where id = '{product_id}'")
    after = stack.execute(f"select updated_at from products where id = '{product_id}'")
    assert after > before


async def test_row_level_security_holds_even_if_a_write_grant_comes_back(supabase_stack, supabase_client) -> None:
    """Supabase's dashboard can re-grant table privileges; the absent write policies still stop anon."""
    from database import SupabaseStore

    product = await SupabaseStore(client=supabase_client).create_product(
        product_id=uuid4(), title="Ring", jewellery_type=None, raw_image_url="http://x/r.jpg", variants=[])
    supabase_stack.execute("grant update, delete on public.products to anon")
    try:
        async with supabase_stack.supabase(key=supabase_stack.anon_key) as anon:
            updated = await anon.table("products").update({"title": "hacked"}).eq("id", str(product.id)).execute()
            deleted = await anon.table("products").delete().eq("id", str(product.id)).execute()
        assert updated.data == [] and deleted.data == []
    finally:
        supabase_stack.execute("revoke update, delete on public.products from anon")
    assert supabase_stack.execute(f"select title from products where id = '{product.id}'") == "Ring"
