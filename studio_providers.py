"""(Temporary home, to be merged into studio.py) The local providers: the studio's cut-out and scenes as async
providers that follow the protocols of `ai_clients.py`."""

from __future__ import annotations

import asyncio

import numpy as np

import images
from ai_clients import CutoutResult, TaskSubmitted, VariantRequest
from errors import ProviderRejected

MAX_CUTOUT_SIDE_PX = 2048
SCENE_FRAME_PX = 2048


class LocalBackgroundRemover:
    """Cuts the piece out on this machine (`cut_out`), in a worker thread."""

    name = "local"

    def __init__(self, *, limiter: asyncio.Semaphore) -> None:
        self._limiter = limiter

    async def remove_background(self, image: bytes) -> CutoutResult:
        async with self._limiter:
            return await asyncio.to_thread(self._cut, image)

    @staticmethod
    def _cut(image: bytes) -> CutoutResult:
        from studio import cut_out

        rgb = images.decode_rgb(image)
        scale = MAX_CUTOUT_SIDE_PX / max(rgb.shape[:2])
        if scale < 1:
            import cv2

            size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
            rgb = np.ascontiguousarray(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA))
        result = cut_out(rgb)
        if int(result.rgba[..., 3].max()) == 0:
            raise ProviderRejected("local", "no piece could be found in the photo")
        return CutoutResult(image=images.encode_png(result.rgba), confidence=round(float(result.confidence), 3))


class LocalVariantGenerator:
    """Renders the four scenes on this machine around the cut-out's own, unchanged pixels."""

    name = "local"

    def __init__(self, *, limiter: asyncio.Semaphore, frame_px: int = SCENE_FRAME_PX) -> None:
        self._limiter = limiter
        self._frame_px = frame_px

    async def generate(self, request: VariantRequest, *, task_id: str | None, on_submitted: TaskSubmitted) -> bytes:
        async with self._limiter:
            return await asyncio.to_thread(self._render, request.cutout_png, request.spec.key)

    def _render(self, cutout_png: bytes, scene: str) -> bytes:
        from scenes_draft import render_scene

        return images.encode_png(render_scene(images.decode_rgba(cutout_png), scene, self._frame_px))


def render_marketplace_jpeg(cutout_png: bytes) -> bytes:
    from scenes_draft import encode_marketplace_jpeg, render_marketplace

    return encode_marketplace_jpeg(render_marketplace(images.decode_rgba(cutout_png)))
