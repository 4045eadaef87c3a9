-- 002: the job queue's state changes, each one statement, called by the service through PostgREST (`rpc`).
-- Functions return `setof products` so that "no row" is an empty list rather than a row of nulls.
-- Every write a worker makes is conditional on it still holding the lease: a worker that lost its lease
-- (it stalled, the job was recovered and claimed again) gets no row back and stops.

-- The URLs of the variants that succeeded, in variant order.
create or replace function public.done_variant_urls(p_variants jsonb) returns jsonb
language sql immutable as $$
  select coalesce(jsonb_agg(v -> 'url' order by (v ->> 'index')::int), '[]'::jsonb)
    from jsonb_array_elements(coalesce(p_variants, '[]'::jsonb)) as v
   where v ->> 'status' = 'done' and v ? 'url' and jsonb_typeof(v -> 'url') = 'string';
$$;

-- Hand the oldest due pending job to one worker. SKIP LOCKED lets concurrent claimers pass each other by.
create or replace function public.claim_next_job(p_worker text, p_lease_seconds double precision)
returns setof public.products
language sql volatile as $$
  update public.products as p
     set status = 'processing',
         lease_owner = p_worker,
         lease_expires_at = now() + make_interval(secs => p_lease_seconds),
         attempts = p.attempts + 1,
         error = null
   where p.id = (
           select q.id from public.products as q
            where q.status = 'pending' and q.run_after <= now()
            order by q.run_after, q.created_at
            limit 1
              for update skip locked)
  returning p.*;
$$;

-- Extend a lease the worker still holds.
create or replace function public.heartbeat_job(p_id uuid, p_worker text, p_lease_seconds double precision)
returns setof public.products
language sql volatile as $$
  update public.products
     set lease_expires_at = now() + make_interval(secs => p_lease_seconds)
   where id = p_id and lease_owner = p_worker and status = 'processing'
  returning *;
$$;

-- Replace one entry of `variants` (matched by position = index - 1) in place: four variants finishing at once
-- each change their own entry, and the row lock serialises them, so none overwrites another.
create or replace function public.set_job_variant(p_id uuid, p_worker text, p_variant jsonb)
returns setof public.products
language sql volatile as $$
  update public.products
     set variants = jsonb_set(variants, array[((p_variant ->> 'index')::int - 1)::text], p_variant, false)
   where id = p_id and lease_owner = p_worker and status = 'processing'
  returning *;
$$;

-- Give a job back: to `pending` (after p_retry_in_seconds) while attempts remain, else end it. A job that runs
-- out of attempts still ends `done` when some variants succeeded. p_refund gives the attempt back (a graceful
-- shutdown is not the job's fault).
create or replace function public.release_job(
  p_id uuid, p_worker text, p_error text, p_retry_in_seconds double precision, p_max_attempts integer,
  p_refund boolean default false)
returns setof public.products
language sql volatile as $$
  with exhausted as (
    select id, (not p_refund and attempts >= p_max_attempts) as gave_up,
           public.done_variant_urls(variants) as urls
      from public.products
     where id = p_id and lease_owner = p_worker and status = 'processing'
       for update)
  update public.products as p
     set status = case when not e.gave_up then 'pending'
                       when jsonb_array_length(e.urls) > 0 then 'done' else 'failed' end,
         attempts = case when p_refund then greatest(p.attempts - 1, 0) else p.attempts end,
         error = case when e.gave_up then p_error end,
         generated_image_urls = case when e.gave_up then e.urls else p.generated_image_urls end,
         image_url = case when e.gave_up and jsonb_array_length(e.urls) > 0 then e.urls ->> 0 else p.image_url end,
         lease_owner = null,
         lease_expires_at = null,
         run_after = now() + make_interval(secs => greatest(p_retry_in_seconds, 0))
    from exhausted as e
   where p.id = e.id
  returning p.*;
$$;

-- Recover jobs whose worker stopped heart-beating: back to `pending` while attempts remain, else end them.
create or replace function public.recover_stale_jobs(p_max_attempts integer)
returns setof public.products
language sql volatile as $$
  with stale as (
    select id, attempts >= p_max_attempts as gave_up, public.done_variant_urls(variants) as urls
      from public.products
     where status = 'processing' and lease_expires_at < now()
       for update skip locked)
  update public.products as p
     set status = case when not s.gave_up then 'pending'
                       when jsonb_array_length(s.urls) > 0 then 'done' else 'failed' end,
         error = case when s.gave_up then
                   format('gave up after %s attempts: the worker processing it stopped responding', p.attempts) end,
         generated_image_urls = case when s.gave_up then s.urls else p.generated_image_urls end,
         image_url = case when s.gave_up and jsonb_array_length(s.urls) > 0 then s.urls ->> 0 else p.image_url end,
         lease_owner = null,
         lease_expires_at = null,
         run_after = now()
    from stale as s
   where p.id = s.id
  returning p.*;
$$;

-- Queue a finished or failed product again (a re-trigger), optionally with a new raw photo. A job that is
-- processing is left alone: no row comes back and the API answers 409.
create or replace function public.requeue_job(p_id uuid, p_variants jsonb, p_raw_image_url text default null)
returns setof public.products
language sql volatile as $$
  update public.products
     set status = 'pending',
         attempts = 0,
         error = null,
         lease_owner = null,
         lease_expires_at = null,
         run_after = now(),
         variants = p_variants,
         generated_image_urls = '[]'::jsonb,
         marketplace_image_url = null,
         raw_image_url = coalesce(p_raw_image_url, raw_image_url),
         image_url = coalesce(p_raw_image_url, raw_image_url)
   where id = p_id and status <> 'processing'
  returning *;
$$;
