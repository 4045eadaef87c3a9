-- The seed's migration, kept for projects that already have the `products` table from before the job queue.
-- Running 001-003 afterwards (or instead) is safe: they add the same column only if it is missing.
alter table public.products add column if not exists generated_image_urls jsonb default '[]'::jsonb;
update public.products set generated_image_urls = '[]'::jsonb where generated_image_urls is null;
