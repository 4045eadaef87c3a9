"""Shared fixtures: settings in a temp folder, the embedded stores, a services factory, and image samples."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from config import Settings

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO.parent / "shared" / "samples"


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "public_base_url": "http://testserver",
            "run_worker": False,
            "environment": "test",
            **overrides,
        }
        return Settings(_env_file=None, **values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


def sample_photos() -> list[Path]:
    photos = sorted(SAMPLES.glob("*_photo.jpg"))
    assert photos, f"no sample photos in {SAMPLES}: the tests expect ../shared/samples beside the repo"
    return photos


@pytest.fixture
def sample_jpeg() -> bytes:
    return next(p for p in sample_photos() if "white_sweep" in p.name).read_bytes()


def jpeg_bytes(width: int = 64, height: int = 48, colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "JPEG")
    return out.getvalue()


def ring_photo(size: int = 256) -> bytes:
    """A small synthetic product photo: a gold ring on a light backdrop."""
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.full((size, size, 3), (236, 234, 230), np.uint8)
    radius = np.hypot(yy - size / 2, xx - size / 2)
    ring = (radius > size * 0.18) & (radius < size * 0.28)
    image[ring] = (212, 175, 55)
    out = io.BytesIO()
    Image.fromarray(image).save(out, "JPEG", quality=95)
    return out.getvalue()


async def eventually(check: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.05) -> Any:
    """Poll an async or sync check until it returns something truthy."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
            await asyncio.sleep(interval_s)


# ---- real PostgreSQL + PostgREST, shaped like Supabase ---------------------------------------------------------------


@pytest.fixture(scope="session")
def supabase_stack():
    """PostgreSQL 15 and PostgREST on loopback ports with the migrations applied. Never skipped: when a binary is
    missing the session fails, saying what to install (`make test` installs them)."""
    from tests.pgstack import SupabaseStack

    with SupabaseStack.start() as stack:
        stack.execute("select 1")
        for migration in sorted((REPO / "migrations").glob("0*.sql")):
            stack.apply_sql(migration)
        stack.reload_schema()
        yield stack


@pytest.fixture
def clean_products(supabase_stack):
    supabase_stack.execute("truncate table public.products")
    return supabase_stack


@pytest.fixture
async def supabase_client(clean_products):
    async with clean_products.supabase() as client:
        yield client


@pytest.fixture(params=["sqlite", "supabase"])
async def store(request: pytest.FixtureRequest, tmp_path: Path):
    """Every ProductStore implementation, for the contract tests."""
    from database import SqliteStore, SupabaseStore

    if request.param == "sqlite":
        sqlite = SqliteStore(path=tmp_path / "products.db")
        yield sqlite
        await sqlite.aclose()
    else:
        stack = request.getfixturevalue("clean_products")
        async with stack.supabase() as client:
            yield SupabaseStore(client=client)


# ---- services with scripted providers --------------------------------------------------------------------------------


class ScriptedRemover:
    """A background remover for pipeline tests: makes a real RGBA PNG (border colour → transparent)."""

    name = "scripted"

    def __init__(self, fail: Exception | None = None, delay_s: float = 0.0) -> None:
        self.calls = 0
        self.fail = fail
        self.delay_s = delay_s

    async def remove_background(self, image: bytes):
        from ai_clients import CutoutResult

        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        rgb = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
        border = np.median(np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]), axis=0)
        alpha = (np.abs(rgb.astype(int) - border).sum(axis=2) > 40).astype(np.uint8) * 255
        out = io.BytesIO()
        Image.fromarray(np.dstack([rgb, alpha])).save(out, "PNG")
        return CutoutResult(image=out.getvalue(), confidence=0.9)


class ScriptedGenerator:
    """A variant generator for pipeline tests. ``outcomes[index]`` is an exception to raise (once per entry of a
    list) or None for success; every call is recorded."""

    name = "scripted"

    def __init__(self, outcomes: dict[int, Any] | None = None, delay_s: float = 0.0, task_ids: bool = False) -> None:
        self.outcomes = outcomes or {}
        self.delay_s = delay_s
        self.task_ids = task_ids
        self.calls: list[tuple[int, str | None]] = []
        self.submitted: list[int] = []

    async def generate(self, request, *, task_id, on_submitted) -> bytes:
        index = request.spec.index
        self.calls.append((index, task_id))
        if self.task_ids and task_id is None:
            self.submitted.append(index)
            await on_submitted(f"task-{request.product_id}-{index}")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        outcome = self.outcomes.get(index)
        if isinstance(outcome, list):
            outcome = outcome.pop(0) if outcome else None
        if outcome is not None:
            raise outcome
        colour = [(30, 40, 90), (110, 20, 40), (235, 235, 230), (40, 40, 40)][index - 1]
        out = io.BytesIO()
        Image.new("RGB", (96, 96), colour).save(out, "JPEG")
        return out.getvalue()


def white_marketplace(cutout_png: bytes) -> bytes:
    rgba = Image.open(io.BytesIO(cutout_png)).convert("RGBA")
    canvas = Image.new("RGB", (200, 200), (255, 255, 255))
    rgba.thumbnail((170, 170))
    canvas.paste(rgba, ((200 - rgba.width) // 2, (200 - rgba.height) // 2), rgba)
    out = io.BytesIO()
    canvas.save(out, "JPEG", quality=95)
    return out.getvalue()


@pytest.fixture
async def make_services(make_settings: Callable[..., Settings]):
    """Build `Services` on the embedded stores with the given providers; closes the stores afterwards."""
    from database import SqliteStore
    from pipeline import JobSignal, Layout, Services
    from storage import LocalImageStore

    opened: list[Any] = []

    async def make(remover: Any = None, generator: Any = None, store: Any = None, image_store: Any = None,
                   **overrides: Any) -> Services:
        settings = make_settings(**overrides)
        if store is None:
            store = SqliteStore(path=settings.data_dir / "products.db")
            opened.append(store)
        image_store = image_store or LocalImageStore(
            root=settings.data_dir / "storage", public_base_url=settings.public_base_url
        )
        layout = Layout.from_settings(settings)
        await image_store.ensure_buckets(layout.buckets)
        return Services(
            settings=settings,
            backends=settings.resolve_backends(),
            store=store,
            images=image_store,
            remover=remover or ScriptedRemover(),
            generator=generator or ScriptedGenerator(),
            render_marketplace=white_marketplace,
            layout=layout,
            variant_specs=settings.variant_specs(),
            job_signal=JobSignal(),
        )

    yield make
    for store in opened:
        await store.aclose()


def framed(placement: Any, frame_px: int) -> tuple[np.ndarray, np.ndarray]:
    """A `studio.Placement` in frame coordinates: the piece's RGB and alpha where it sits, zeros elsewhere."""
    rgb = np.zeros((frame_px, frame_px, 3), np.uint8)
    alpha = np.zeros((frame_px, frame_px), np.uint8)
    height, width = placement.piece.shape[:2]
    box = np.s_[placement.y : placement.y + height, placement.x : placement.x + width]
    rgb[box], alpha[box] = placement.piece[..., :3], placement.piece[..., 3]
    return rgb, alpha
