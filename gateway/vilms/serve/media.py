"""Image and frame handling for vision requests: decode-verify, sample frames, downscale, re-encode.

Blocking Pillow work runs on a small dedicated executor (media.decode-concurrency threads), so at most
that many images are decoded at once however many requests arrive; the event loop only shuffles bytes.
Every check that can refuse a request (part types, counts, sizes) runs first, in one linear pass.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Collection

import pybase64
from PIL import Image, ImageOps, UnidentifiedImageError

from vilms.errors import BadRequest
from vilms.serve.admission import FairGate
from vilms.serve.fetch import FetchRefused, ImageFetcher

DECODE_NICE = 10  # the decode threads' nice value (0: the gateway's own priority; see _lowered)
_PASSTHROUGH = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


@dataclass(frozen=True)
class ImageLimits:
    max_frames: int
    max_side: int
    max_pixels: int
    max_bytes: int = 20 * 1024 * 1024
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF")


@dataclass(frozen=True)
class PreparedImage:
    mime: str
    data: bytes
    width: int
    height: int

    def data_url(self) -> str:
        return f"data:{self.mime};base64,{pybase64.b64encode_as_string(self.data)}"


def sample_indices(count: int, keep: int) -> list[int]:
    """`keep` evenly spaced indices out of `count`, in order, first and last included."""
    if count <= keep:
        return list(range(count))
    if keep == 1:
        return [0]
    return [round(i * (count - 1) / (keep - 1)) for i in range(keep)]


def process_image(data: bytes, limits: ImageLimits) -> PreparedImage:
    """Decode fully (a truncated or fake image fails here), downscale if too large, re-encode compactly.

    Images already small enough and in a format every engine reads pass through byte for byte.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=limits.formats)
        width, height = image.size
        if width * height > limits.max_pixels:
            raise ValueError(f"image has {width}x{height} pixels, more than the {limits.max_pixels} allowed")
        fmt = image.format
        if max(width, height) <= limits.max_side and fmt in _PASSTHROUGH:
            image.load()
            return PreparedImage(_PASSTHROUGH[fmt], data, width, height)
        if fmt == "JPEG":
            image.draft("RGB", (limits.max_side, limits.max_side))  # decode at reduced scale: much faster
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError("not a decodable image") from exc
    image = ImageOps.exif_transpose(image)
    image.thumbnail((limits.max_side, limits.max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        return PreparedImage("image/png", saved(image.convert("RGBA"), "PNG", optimize=False), *image.size)
    return PreparedImage("image/jpeg", saved(image.convert("RGB"), "JPEG", quality=88, optimize=True), *image.size)


def saved(image: Image.Image, fmt: str, **params: Any) -> bytes:
    """The image encoded, through an in-memory file. Why not io.BytesIO: Pillow encodes into a Python buffer holding
    the GIL (one 1024 px JPEG: a 17 ms call), and into a file descriptor with the GIL released."""
    with _memory_file() as file:
        image.save(file, fmt, **params)
        file.seek(0)
        return file.read()


def _lowered(nice: int) -> None:
    """This decode thread's scheduling priority lowered (Linux: a thread is its own task; raising one's own nice
    value needs no capability). Why: Pillow decodes with the GIL released, so two decode threads can fill two
    cores; at the same priority the event loop then waited for a core as well as for the GIL (8 bodies of three
    15 MiB images: /health_check 33-36 ms worst, 12-22 at nice 10; bench/bigbodies.py)."""
    if nice and hasattr(os, "setpriority"):
        with contextlib.suppress(OSError):
            me = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + nice))


def _memory_file() -> Any:
    """A file in memory (Linux memfd: never on a disk); io.BytesIO where none can be made (no memfd on this
    kernel or sandbox, out of descriptors: review): slower for the loop, never an error."""
    with contextlib.suppress(OSError, AttributeError):
        return open(os.memfd_create("vilms-image", os.MFD_CLOEXEC), "w+b")
    return io.BytesIO()


B64_PIECE = 1 << 22  # base64 characters per pybase64 call on the strict road (a multiple of 4): ~0.3 ms of GIL
B64_SLICE = 1 << 20  # characters cleaned per call on the lenient road (~1 ms of GIL each)
_NOT_B64 = bytes(c for c in range(256) if chr(c) not in
                 "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


def data_url_payload(url: str | memoryview, max_bytes: int) -> int:
    """Where a base64 data URL's payload starts, after checking its header and (before decoding) its size. `url`:
    a string, or a view of a kept plain-ASCII literal in the received body (Large.literal)."""
    head = url[:1024] if isinstance(url, str) else str(url[:1024], "ascii")
    comma = head.find(",")
    if comma < 0 or not head.startswith("data:") or ";base64" not in head[:comma]:
        raise ValueError("data URLs must be base64-encoded (data:image/...;base64,...)")
    if (len(url) - comma - 1) // 4 * 3 > max_bytes + 2:
        raise ValueError(f"image is larger than {max_bytes} bytes (media.max-bytes)")
    return comma + 1


def decode_data_url(url: str | memoryview, max_bytes: int) -> bytes:
    """The payload's bytes, as leniently as b64decode(validate=False): characters outside the alphabet skipped.

    Why two roads: binascii decodes ~4 ms per MiB holding the GIL (three 15 MiB images from each of 8 requests were
    seconds of GIL the event loop waited behind), pybase64 (SIMD) ~0.07 ms. Canonical base64, what clients send,
    is decoded strictly by pybase64 in pieces; anything else (line breaks, stray characters) the lenient way."""
    start = data_url_payload(url, max_bytes)
    try:
        return _strict(url, start)
    except (binascii.Error, ValueError):
        return _lenient(url, start)


def _strict(url: str | memoryview, start: int) -> bytes:
    """Canonical base64 only (alphabet, padding at the very end), a piece of B64_PIECE characters per call: a
    piece that is not whole groups of four raises, and the lenient road takes over."""
    out = []
    for at in range(start, len(url), B64_PIECE):
        piece = url[at:at + B64_PIECE]  # of a view: no copy
        if piece[-1:] in ("=", b"=") and at + B64_PIECE < len(url):
            raise ValueError("padding before the end")  # the lenient decoder stops there: let it
        out.append(pybase64.b64decode(piece, validate=True))
    return b"".join(out)


def _lenient(url: str | memoryview, start: int) -> bytes:
    """What b64decode(validate=False) makes of a payload whose padding, if any, is at its end (MIME line breaks,
    stray characters: dropped): the characters outside the alphabet removed a slice at a time, then the strict road
    over what is left. Padding anywhere else is refused (b64decode stops there, pybase64 reads on: neither is an
    image)."""
    kept = []
    try:
        for at in range(start, len(url), B64_SLICE):
            piece = url[at:at + B64_SLICE]
            kept.append((piece.encode("ascii") if isinstance(piece, str) else bytes(piece)).translate(None, _NOT_B64))
        cleaned = b"".join(kept)
        if cleaned.rstrip(b"=").find(b"=") >= 0:
            raise ValueError("padding before the end")
        return _strict(memoryview(cleaned), 0)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("data URL is not valid base64") from exc


def image_url_of(part: dict[str, Any]) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise ValueError("image_url part has no url")
    return url


def inspect_content(messages: list[dict[str, Any]], allowed: Collection[str], max_frames: int,
                    max_images: int) -> int:
    """One linear pass over every part: refuse part types the engine may not receive (naming the part) and
    requests whose images, after per-message sampling, exceed `max_images`. Returns the images to decode.

    Shapes were validated already (strict request models): parts are dicts with a string `type`.
    """
    total = 0
    for mi, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        images = 0
        for pi, part in enumerate(content):
            kind = part["type"]
            if kind not in allowed:
                where = f"messages[{mi}].content[{pi}]"
                raise BadRequest(f"{where}: content part type {kind!r} is not accepted for this model (accepted: "
                                 f"{', '.join(sorted(allowed))})", param=where, code="unsupported_content_part")
            images += kind == "image_url"
        total += min(images, max_frames)
    if total > max_images:
        raise BadRequest(f"the request carries {total} images (after sampling {max_frames} per message); at most "
                         f"{max_images} are accepted (media.max-images)", param="messages", code="too_many_images")
    return total


def _prepared_url(data: bytes | str | memoryview, limits: ImageLimits) -> str:
    """In the decode pool: a data URL's payload decoded first (the loop never decodes base64), then Pillow."""
    if isinstance(data, (str, memoryview)):
        data = decode_data_url(data, limits.max_bytes)
        if len(data) > limits.max_bytes:
            raise ValueError(f"image is larger than {limits.max_bytes} bytes (media.max-bytes)")
    return process_image(data, limits).data_url()


class Decoder:
    """A dedicated, small thread pool for Pillow: bounds decode concurrency (and so peak memory)."""

    def __init__(self, workers: int):
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vilms-decode",
                                           initializer=_lowered, initargs=(DECODE_NICE,))
        self.gate = FairGate("image decode", workers)  # the pool's places, shared fairly between keys

    async def run(self, data: bytes | str | memoryview, limits: ImageLimits, owner: str = "") -> str:
        """The prepared image (bytes, or a data URL to decode first) as a data URL (base64 both ways is CPU work
        too: done in the pool)."""
        await self.gate.acquire(owner)
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, _prepared_url, data, limits)
        finally:
            self.gate.release(owner)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


async def prepare_images(messages: list[dict[str, Any]], limits: ImageLimits, fetcher: ImageFetcher,
                         decoder: Decoder, owner: str = "",
                         literal: Callable[[Any], memoryview | None] | None = None) -> list[dict[str, Any]]:
    """New message list: each message's images sampled to `max_frames`, verified, resized, as data URLs.

    Text parts keep their places; dropped frames simply vanish from the sequence. Linear in the parts.
    `literal`: a large body's placeholder -> the view of the kept URL literal it stands for (Large.literal).
    """
    jobs: list[tuple[int, int, dict[str, Any]]] = []
    new_messages = []
    for mi, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            new_messages.append(message)
            continue
        image_positions = [pi for pi, p in enumerate(content) if p.get("type") == "image_url"]
        kept = {image_positions[i] for i in sample_indices(len(image_positions), limits.max_frames)}
        dropped = set(image_positions) - kept
        parts = []
        for pi, part in enumerate(content):
            if pi in dropped:
                continue
            if pi in kept:
                part = dict(part)
                jobs.append((mi, pi, part))
            parts.append(part)
        new_messages.append({**message, "content": parts})

    async def load(mi: int, pi: int, part: dict[str, Any]) -> None:
        where = f"messages[{mi}].content[{pi}]"
        try:
            url: str | memoryview = image_url_of(part)
            view = literal(url) if literal is not None else None
            if view is not None:  # a kept literal: printable ASCII, decoded from the received body as it lies
                url = view if view[:5] == b"data:" else str(view, "ascii")
            if isinstance(url, memoryview) or url.startswith("data:"):
                data_url_payload(url, limits.max_bytes)  # header and size refused here, decoded in the pool
                raw: bytes | str | memoryview = url
            elif url.startswith(("http://", "https://")):
                raw = await fetcher.fetch(url, owner)
                if len(raw) > limits.max_bytes:
                    raise ValueError(f"image is larger than {limits.max_bytes} bytes (media.max-bytes)")
            else:
                raise ValueError("image url must be a data: URL or an http(s) URL")
            prepared_url = await decoder.run(raw, limits, owner)
        except (ValueError, FetchRefused) as exc:
            raise BadRequest(f"{where}: {exc}", param=where, code="invalid_image") from exc
        detail = part["image_url"].get("detail") if isinstance(part.get("image_url"), dict) else None
        part["image_url"] = {"url": prepared_url, **({"detail": detail} if detail else {})}

    try:
        async with asyncio.TaskGroup() as group:  # the first bad image cancels the rest
            for job in jobs:
                group.create_task(load(*job))
    except* BadRequest as failures:
        raise failures.exceptions[0] from None
    return new_messages
