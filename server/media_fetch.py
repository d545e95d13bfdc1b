"""Fetches http(s) media for a request: async DNS, SSRF guard, byte cap, no compression.

Each URL (and each redirect target) is resolved with the event loop's resolver and refused if any
address is loopback, private, link-local (cloud metadata), multicast, reserved or unspecified,
unless private hosts are allowed. The connection then goes to the address that was checked (Host
header and TLS SNI keep the name), so a DNS answer that changes between the check and the connect
(rebinding) cannot steer it to an internal service. Bodies are streamed with a byte cap and
`Accept-Encoding: identity`, so a compressed bomb is never inflated. The fetched bytes then go to
the processor, which checks their type by magic bytes and the pixel/frame caps before decoding.
A fetch error (MediaError) names the part it is about in `param`, e.g.
`messages[1].content[0].image_url`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urljoin, urlparse

import httpx

from plm_core.media.errors import MediaError


def is_public_address(address: str) -> bool:
    """True for a globally routable address; False for loopback, private, link-local, multicast,
    reserved, unspecified and shared (CGNAT) ranges, also behind an IPv4-mapped IPv6 address."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


class MediaFetcher:
    """One per server: the limits and the shared httpx client."""

    def __init__(
        self,
        *,
        max_bytes: int = 32 << 20,
        timeout_s: float = 10.0,
        max_redirects: int = 3,
        allow_private: bool = False,
        allowed_domains: list[str] | None = None,
    ):
        self.max_bytes, self.max_redirects = max_bytes, max_redirects
        self.allow_private = allow_private
        self.allowed_domains = [d.lower().lstrip(".") for d in allowed_domains or []]
        # No keep-alive: connections go to vetted IP addresses, and a pooled one must never carry a
        # request for another host name (its TLS certificate was checked for the first one).
        self.client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
            timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)),
            headers={"Accept-Encoding": "identity", "User-Agent": "plm-serve"},
        )

    async def _check(self, url: str) -> str | None:
        """Refuses a URL the guard forbids; returns the vetted address to connect to (None: no
        pinning)."""
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise MediaError("media URLs must be http(s) URLs with a host")
        host = parsed.hostname.lower()
        if self.allowed_domains and not any(
            host == d or host.endswith("." + d) for d in self.allowed_domains
        ):
            raise MediaError(f"media host {host} is not in the allowed media domains")
        if self.allow_private:
            return None
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, parsed.port or 443, type=socket.SOCK_STREAM
            )
        except socket.gaierror:
            raise MediaError(f"cannot resolve media host {host}") from None
        addresses = [str(info[4][0]) for info in infos]
        if not addresses or not all(is_public_address(a) for a in addresses):
            raise MediaError(
                f"media host {host} resolves to a private or reserved address; refused (a server "
                "whose clients are all trusted can allow it with --allow-private-media-hosts)"
            )
        return addresses[0]

    def _request(self, url: str, address: str | None) -> httpx.Request:
        """A GET for `url` that connects to `address` when given, keeping the name for Host and
        SNI."""
        if address is None:
            return self.client.build_request("GET", url)
        parsed = urlparse(url)
        literal = f"[{address}]" if ":" in address else address
        netloc = literal if parsed.port is None else f"{literal}:{parsed.port}"
        host_header = parsed.netloc.rsplit("@", 1)[-1]  # never forward userinfo
        return self.client.build_request(
            "GET",
            parsed._replace(netloc=netloc).geturl(),
            headers={"Host": host_header},
            extensions={"sni_hostname": parsed.hostname},
        )

    async def fetch(self, url: str) -> bytes:
        """The body of `url`, following at most max_redirects redirects, each one re-checked."""
        for _ in range(self.max_redirects + 1):
            address = await self._check(url)
            try:
                response = await self.client.send(self._request(url, address), stream=True)
                try:
                    if response.is_redirect:
                        location = response.headers.get("location")
                        if not location:
                            raise MediaError("media URL redirected without a location")
                        url = urljoin(url, location)
                        continue
                    return await self._read_body(response)
                finally:
                    await response.aclose()
            except httpx.HTTPError as e:
                raise MediaError(f"fetching media failed: {type(e).__name__}") from None
        raise MediaError(f"media URL redirected more than {self.max_redirects} times")

    async def _read_body(self, response: httpx.Response) -> bytes:
        """The raw body of a final response, refused if not 200, compressed or over the byte cap."""
        if response.status_code != 200:
            raise MediaError(f"fetching media failed with HTTP {response.status_code}")
        encoding = response.headers.get("content-encoding", "identity").lower()
        if encoding not in ("identity", ""):
            raise MediaError(f"media served with content-encoding {encoding}; refused")
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise MediaError(f"media is {declared} bytes, over the {self.max_bytes}-byte limit")
        chunks, size = [], 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > self.max_bytes:
                raise MediaError(f"media exceeds the {self.max_bytes}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def fetch_request_media(self, messages: list[Any]) -> list[Any]:
        """A copy of the messages with every http(s) image/video URL replaced by its bytes, fetched
        concurrently; an error names the part whose URL failed."""
        out, remote = _copy_with_remote_specs(messages)
        jobs = [self._fetch_part(spec["url"], param) for spec, param in remote]
        for (spec, _), data in zip(remote, await asyncio.gather(*jobs)):
            spec["url"] = data
        return out

    async def _fetch_part(self, url: str, param: str) -> bytes:
        try:
            return await self.fetch(url)
        except MediaError as e:
            if e.param is None:
                e.param = param
            raise


def _copy_with_remote_specs(
    messages: list[Any],
) -> tuple[list[Any], list[tuple[dict[str, Any], str]]]:
    """A copy of the messages (deep enough to replace URLs in) and each http(s) media spec in it,
    with the part's param."""
    out: list[Any] = []
    remote: list[tuple[dict[str, Any], str]] = []
    for i, msg in enumerate(messages):
        if isinstance(msg, dict) and isinstance(msg.get("content"), list):
            parts = [dict(p) if isinstance(p, dict) else p for p in msg["content"]]
            msg = dict(msg, content=parts)
            for j, part in enumerate(parts):
                spec = _remote_spec(part)
                if spec is not None:
                    remote.append((spec, f"messages[{i}].content[{j}].{part['type']}"))
        out.append(msg)
    return out, remote


def _remote_spec(part: Any) -> dict[str, Any] | None:
    """An image_url/video_url part's spec if its URL is http(s), copied into the part; else None."""
    key = part.get("type") if isinstance(part, dict) else None
    if key not in ("image_url", "video_url"):
        return None
    spec = part.get(key)
    if isinstance(spec, str):
        spec = {"url": spec}
    if not (
        isinstance(spec, dict)
        and isinstance(spec.get("url"), str)
        and spec["url"].lower().startswith(("http://", "https://"))
    ):
        return None
    spec = dict(spec)
    part[key] = spec
    return spec
