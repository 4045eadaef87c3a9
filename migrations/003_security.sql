-- 003: who may do what. The frontend (anon / authenticated keys) may read products, nothing else; only the
-- service role (the backend) writes. Realtime needs the table in the `supabase_realtime` publication.

alter table public.products enable row level security;

-- Supabase grants anon and authenticated everything on new tables by default: take it back, then grant reads.
revoke all on table public.products from anon, authenticated;
grant select on table public.products to anon, authenticated;
grant all on table public.products to service_role;

drop policy if exists products_public_read on public.products;
create policy products_public_read on public.products for select to anon, authenticated using (true);

-- The job functions are for the backend only.
do $$
declare
  fn text;
begin
  foreach fn in array array[
    'public.claim_next_job(text, double precision)',
    'public.heartbeat_job(uuid, text, double precision)',
    'public.set_job_variant(uuid, text, jsonb)',
    'public.release_job(uuid, text, text, double precision, integer, boolean)',
    'public.recover_stale_jobs(integer)',
    'public.requeue_job(uuid, jsonb, text)'
  ] loop
    execute format('revoke all on function %s from public, anon, authenticated', fn);
    execute format('grant execute on function %s to service_role', fn);
  end loop;
end
$$;

-- Realtime: the publication exists on Supabase, not on plain PostgreSQL; adding a table twice is an error.
do $$
begin
  if exists (select 1 from pg_publication where pubname = 'supabase_realtime')
     and not exists (select 1 from pg_publication_tables
                      where pubname = 'supabase_realtime' and schemaname = 'public' and tablename = 'products') then
    alter publication supabase_realtime add table public.products;
  end if;
end
$$;

-- Tell PostgREST (and so supabase-py's `rpc`) about the new functions without a restart.
notify pgrst, 'reload schema';
