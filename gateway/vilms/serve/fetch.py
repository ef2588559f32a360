"""Server-side image fetching that cannot be pointed at the gateway's own network (SSRF guard).

The guard sits where connections are made (an httpcore network backend): every hop, redirects
included, resolves the host once, refuses non-global addresses, and connects to the checked
address itself, so neither DNS rebinding nor decimal/hex/IPv4-mapped spellings get through.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any, Iterable
from urllib.parse import urljoin, urlsplit

import httpcore

from vilms.serve.admission import FairGate

_REDIRECTS = {301, 302, 303, 307, 308}


class FetchRefused(Exception):
    """A URL the gateway will not fetch; the message is safe to show (no resolved addresses)."""


def address_is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            ip = embedded
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_link_local or ip.is_loopback
                                 or ip.is_private or ip.is_unspecified)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Connects only to public addresses, unless the host is allow-listed by name."""

    def __init__(self, allow_hosts: Iterable[str]):
        self.allow = {h.lower().strip("[]") for h in allow_hosts}
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        if host.lower().strip("[]") in self.allow:
            return await self.inner.connect_tcp(host, port, timeout, local_address, socket_options)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise FetchRefused("image host could not be resolved") from exc
        addresses = [info[4][0] for info in infos]
        if not addresses or not all(address_is_public(a) for a in addresses):
            raise FetchRefused("image host resolves to a private, loopback or reserved address; not fetched")
        return await self.inner.connect_tcp(addresses[0], port, timeout, local_address, socket_options)

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        raise FetchRefused("unix sockets are not fetched")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class ImageFetcher:
    """Fetches http(s) images with a byte cap, a timeout and a redirect cap."""

    def __init__(self, media: dict[str, Any]):
        self.enabled = bool(media["remote-fetch"])
        self.max_bytes = int(media["max-bytes"])
        self.timeout = float(media["fetch-timeout"])
        self.max_redirects = int(media["max-redirects"])
        self.pool = httpcore.AsyncConnectionPool(network_backend=GuardedBackend(media["allow-hosts"]),
                                                 max_connections=32, retries=0)
        self.gate = FairGate("image fetch", 32)  # the pool's connections, shared fairly between keys

    async def aclose(self) -> None:
        await self.pool.aclose()

    async def fetch(self, url: str, owner: str = "") -> bytes:
        """`owner` (an API key's name) waits in its own line for one of the pool's connections."""
        if not self.enabled:
            raise FetchRefused("remote image URLs are disabled on this gateway (media.remote-fetch: false); send a data: URL")
        try:
            async with asyncio.timeout(self.timeout):
                await self.gate.acquire(owner)
                try:
                    return await self._follow(url)
                finally:
                    self.gate.release(owner)
        except TimeoutError as exc:
            raise FetchRefused(f"image fetch took longer than {self.timeout:g}s") from exc
        except httpcore.TimeoutException as exc:
            raise FetchRefused("image fetch timed out") from exc
        except (httpcore.ConnectError, OSError) as exc:
            raise FetchRefused("image host could not be reached") from exc
        except httpcore.ProtocolError as exc:
            raise FetchRefused("image host answered with broken HTTP") from exc

    async def _follow(self, url: str) -> bytes:
        for _ in range(self.max_redirects + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise FetchRefused("only http and https image URLs are fetched")
            if parts.username or parts.password:
                raise FetchRefused("image URLs with credentials are not fetched")
            async with self.pool.stream("GET", url, headers=[(b"accept", b"image/*"), (b"user-agent", b"vilms-gateway")],
                                        extensions={"timeout": {"connect": self.timeout, "read": self.timeout,
                                                                "write": self.timeout, "pool": self.timeout}}) as response:
                if response.status in _REDIRECTS:
                    location = dict((k.lower(), v) for k, v in response.headers).get(b"location")
                    if not location:
                        raise FetchRefused("image host sent a redirect without a location")
                    url = urljoin(url, location.decode("latin-1"))
                    continue
                if response.status != 200:
                    raise FetchRefused(f"image host answered HTTP {response.status}")
                declared = dict((k.lower(), v) for k, v in response.headers).get(b"content-length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise FetchRefused(f"image is larger than {self.max_bytes} bytes")
                chunks, size = [], 0
                async for chunk in response.aiter_stream():
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise FetchRefused(f"image is larger than {self.max_bytes} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
        raise FetchRefused(f"image URL redirected more than {self.max_redirects} times")
