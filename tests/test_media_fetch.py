"""MediaFetcher in process, against loopback servers with a fake resolver.

The SSRF guard holds on every redirect hop and the connection goes to the address that was checked
(no DNS-rebinding window); a fetch error names the part whose URL failed.

127.0.0.2 plays a public host (the guard is told so); 127.0.0.1 plays an internal service, which
must record 0 hits. No traffic leaves loopback.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from media_http import MediaServer

from plm_core.media.errors import MediaError
from server import media_fetch
from server.media_fetch import MediaFetcher

PUBLIC, INTERNAL = "127.0.0.2", "127.0.0.1"


@pytest.fixture
def hosts(monkeypatch):
    """A fake DNS ({name: [addresses]}, answers consumed in order, last one repeats) and a guard
    that treats PUBLIC as public."""
    dns: dict[str, list[str]] = {}
    lookups: list[str] = []
    real = asyncio.BaseEventLoop.getaddrinfo

    async def fake_getaddrinfo(self, host, port, *args, **kwargs):
        if isinstance(host, bytes):  # anyio (under httpx) passes IDNA-encoded bytes
            host = host.decode()
        if host in dns:
            lookups.append(host)
            answers = dns[host]
            addr = answers.pop(0) if len(answers) > 1 else answers[0]
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr, port))]
        return await real(self, host, port, *args, **kwargs)

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", fake_getaddrinfo)
    real_public = media_fetch.is_public_address
    monkeypatch.setattr(media_fetch, "is_public_address", lambda a: a == PUBLIC or real_public(a))
    return dns, lookups


@pytest.fixture
def servers():
    public, internal = MediaServer(PUBLIC), MediaServer(INTERNAL)
    public.files["a.png"] = internal.files["a.png"] = b"\x89PNG\r\n\x1a\n-bytes"
    yield public, internal
    public.close()
    internal.close()


def fetch(url: str, **kw) -> bytes:
    async def run():
        fetcher = MediaFetcher(**kw)
        try:
            return await fetcher.fetch(url)
        finally:
            await fetcher.client.aclose()

    return asyncio.run(run())


def test_connects_to_the_checked_address_keeping_the_name(hosts, servers):
    dns, _ = hosts
    public, _ = servers
    dns["media.example"] = [PUBLIC]
    # media.example exists only in the fake resolver: this works only if the fetch connects to the
    # address the guard checked instead of resolving the name again
    assert fetch(f"http://media.example:{public.port}/file/a.png") == public.files["a.png"]
    assert public.host_headers == [f"media.example:{public.port}"]


def test_dns_rebinding_cannot_reach_internal_service(hosts, servers):
    dns, lookups = hosts
    public, internal = servers
    dns["rebind.example"] = [PUBLIC, INTERNAL]  # first answer public, every later one internal
    with pytest.raises(MediaError):  # the checked address (PUBLIC) has nothing on internal's port
        fetch(f"http://rebind.example:{internal.port}/file/a.png")
    assert lookups == ["rebind.example"]  # resolved once, by the guard
    assert internal.hits == 0


@pytest.mark.parametrize(
    "target",
    [
        "http://{internal}:{port}/file/a.png",
        "http://localhost:{port}/file/a.png",
        "http://internal.example:{port}/file/a.png",
        "http://[::1]:{port}/file/a.png",
    ],
)
def test_redirect_to_internal_targets_is_refused(hosts, servers, target):
    dns, _ = hosts
    public, internal = servers
    dns["internal.example"] = [INTERNAL]
    to = target.format(internal=INTERNAL, port=internal.port)
    with pytest.raises(MediaError, match="private or reserved") as e:
        fetch(f"{public.base}/redirect?to={to}")
    assert "--allow-private-media-hosts" in str(e.value)  # the refusal names the way out
    assert public.hits == 1 and internal.hits == 0


def test_redirect_chain_is_capped(hosts, servers):
    public, _ = servers
    hop = "/redirect?to=/file/a.png"
    for _ in range(3):
        hop = f"/redirect?to={hop}"
    with pytest.raises(MediaError, match="redirected more than 2 times"):
        fetch(public.base + hop, max_redirects=2)
    assert fetch(public.base + hop, max_redirects=4) == public.files["a.png"]


def test_allowed_domains_apply_to_redirect_targets(hosts, servers):
    dns, _ = hosts
    public, _ = servers
    dns["media.example"] = [PUBLIC]
    dns["other.example"] = [PUBLIC]
    url = f"http://media.example:{public.port}/redirect?to=http://other.example:{public.port}/file/a.png"
    with pytest.raises(MediaError, match="not in the allowed media domains"):
        fetch(url, allowed_domains=["media.example"])
    assert fetch(url, allowed_domains=["example"]) == public.files["a.png"]


def test_request_media_is_fetched_and_errors_name_the_part(hosts, servers):
    public, internal = servers

    async def run(messages):
        fetcher = MediaFetcher()
        try:
            return await fetcher.fetch_request_media(messages)
        finally:
            await fetcher.client.aclose()

    good = {"type": "image_url", "image_url": f"{public.base}/file/a.png"}
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "x"}, good]},
    ]
    out = asyncio.run(run(messages))
    assert out[1]["content"][1]["image_url"] == {"url": public.files["a.png"]}
    assert messages[1]["content"][1] is good  # the request's own messages are left as they were
    missing = {"type": "video_url", "video_url": {"url": f"{public.base}/file/none.mp4"}}
    messages[1]["content"].append(missing)
    with pytest.raises(MediaError, match="HTTP 404") as e:
        asyncio.run(run(messages))
    assert e.value.param == "messages[1].content[2].video_url"
    to_internal = {"type": "image_url", "image_url": {"url": f"http://{INTERNAL}:{internal.port}/"}}
    with pytest.raises(MediaError, match="private or reserved") as e:
        asyncio.run(run([{"role": "user", "content": [to_internal]}]))
    assert e.value.param == "messages[0].content[0].image_url"
    assert internal.hits == 0
