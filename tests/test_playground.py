"""The playground page at / (server/static/playground.html): served by the app itself, with no
asset from elsewhere, the elements the browser tests drive, and an option that turns it off.
tests/test_playground_browser.py drives it in a real browser."""

from __future__ import annotations

import asyncio
import re
from html.parser import HTMLParser

import httpx

from server.app import PLAYGROUND, build_app
from server.config import ServerConfig
from server.state import ServerState

CONTRACT = {  # ids the page's script and the browser tests rely on
    "api-key", "system-prompt", "message", "file-input", "attachments", "cost", "send", "stop",
    "messages", "stats", "temperature", "top-p", "max-tokens", "seed", "json-schema", "error",
    "model",
}  # fmt: skip


def get(config: ServerConfig, path: str = "/") -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=build_app(ServerState(config)))
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return await client.get(path)

    return asyncio.run(go())


class _Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.refs: list[str] = []  # src and href values
        self.labelled: set[str] = set()  # ids some <label for> names
        self.controls: set[str] = set()  # ids of inputs, selects and textareas

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "label" and a.get("for"):
            self.labelled.add(a["for"])
        if tag in ("input", "select", "textarea") and "id" in a:
            self.controls.add(a["id"])


def test_the_page_is_served_at_the_root_without_a_key():
    r = get(ServerConfig(api_key="secret"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.content == PLAYGROUND.read_bytes()


def test_the_page_loads_nothing_from_elsewhere_and_has_its_elements():
    html = PLAYGROUND.read_text()
    page = _Elements()
    page.feed(html)
    assert CONTRACT <= page.ids, sorted(CONTRACT - page.ids)
    assert not [ref for ref in page.refs if re.match(r"(https?:)?//", ref)], page.refs
    script = html[html.index("<script>") :]
    # every fetch goes to this server's own paths
    assert set(re.findall(r'fetch\("([^"]+)"', script)) == {
        "/v1/models",
        "/tokenize",
        "/v1/chat/completions",
    }
    assert not re.search(r"https?://", script)
    # every form control has a visible label (keyboard and screen-reader use)
    assert page.controls and page.controls <= page.labelled, sorted(page.controls - page.labelled)


def test_an_option_turns_it_off():
    assert get(ServerConfig(playground=False)).status_code == 404
