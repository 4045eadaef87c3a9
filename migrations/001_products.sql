-- 001: the products table, which is also the job queue.
-- Idempotent: safe on an empty Supabase project, on a project that already has the seed's `products` table
-- (columns are added, existing rows are marked finished rather than queued), and when run again.

-- Supabase has these roles; plain PostgreSQL (local tests, self-hosting) gets them here so the grants below work.
do $$
begin
  if not exists (select 1 from pg_roles where rolname = 'anon') then create role anon nologin; end if;
  if not exists (select 1 from pg_roles where rolname = 'authenticated') then create role authenticated nologin; end if;
  if not exists (select 1 from pg_roles where rolname = 'service_role') then
    create role service_role nologin bypassrls;
  end if;
end
$$;

create table if not exists public.products (
  id uuid primary key default gen_random_uuid(),
  title text not null default 'Untitled',
  jewellery_type text,
  image_url text,
  generated_image_urls jsonb not null default '[]'::jsonb,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);

-- The seed's columns, for tables made before they existed.
alter table public.products add column if not exists generated_image_urls jsonb not null default '[]'::jsonb;
alter table public.products add column if not exists created_at timestamptz not null default now();
alter table public.products add column if not exists updated_at timestamptz not null default now();
update public.products set generated_image_urls = '[]'::jsonb where generated_image_urls is null;
alter table public.products alter column generated_image_urls set default '[]'::jsonb;
alter table public.products alter column generated_image_urls set not null;

-- Job state. `status` is added without a default first, so rows that predate the queue are not picked up as new
-- work (each would cost a Reve and four NanoBanana calls): they are marked done or failed from what they hold.
alter table public.products add column if not exists status text;
update public.products
   set status = case when generated_image_urls is not null and generated_image_urls <> '[]'::jsonb
                     then 'done' else 'failed' end
 where status is null;
alter table public.products alter column status set default 'pending';
alter table public.products alter column status set not null;

alter table public.products add column if not exists attempts integer not null default 0;
alter table public.products add column if not exists error text;
alter table public.products add column if not exists lease_owner text;
alter table public.products add column if not exists lease_expires_at timestamptz;
alter table public.products add column if not exists run_after timestamptz not null default now();

-- Results.
alter table public.products add column if not exists raw_image_url text;
alter table public.products add column if not exists cutout_url text;
alter table public.products add column if not exists raw_sha256 text;
alter table public.products add column if not exists cutout_confidence real;
alter table public.products add column if not exists marketplace_image_url text;
alter table public.products add column if not exists variants jsonb not null default '[]'::jsonb;

update public.products
   set error = 'made before the job queue existed and has no styled images; re-trigger it to process it'
 where status = 'failed' and error is null and attempts = 0 and lease_owner is null
   and variants = '[]'::jsonb and generated_image_urls = '[]'::jsonb and raw_image_url is null;

do $$
begin
  if not exists (select 1 from pg_constraint where conname = 'products_status_check') then
    alter table public.products add constraint products_status_check
      check (status in ('pending', 'processing', 'done', 'failed'));
  end if;
  if not exists (select 1 from pg_constraint where conname = 'products_variants_is_array') then
    alter table public.products add constraint products_variants_is_array
      check (jsonb_typeof(variants) = 'array' and jsonb_typeof(generated_image_urls) = 'array');
  end if;
end
$$;

-- updated_at is kept by the database, whoever writes.
create or replace function public.set_updated_at() returns trigger
language plpgsql as $$
begin
  new.updated_at := now();
  return new;
end
$$;

drop trigger if exists products_set_updated_at on public.products;
create trigger products_set_updated_at before update on public.products
  for each row execute function public.set_updated_at();

-- Claiming scans pending rows in queue order; recovery scans expired leases; operators list newest first.
create index if not exists products_pending_queue_idx on public.products (run_after, created_at)
  where status = 'pending';
create index if not exists products_processing_lease_idx on public.products (lease_expires_at)
  where status = 'processing';
create index if not exists products_created_at_idx on public.products (created_at desc);
