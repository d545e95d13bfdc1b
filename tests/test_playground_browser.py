"""The playground page (`GET /`) driven in a real headless Chromium through Selenium, against the
real server process on the tiny checkpoint: no external requests, images and videos with their
token-cost preview, a streamed answer with its stats, stop, the API key, and the server's errors.

Needs Debian's `chromium` and `chromium-driver` (scripts/test.sh installs them as root) and the
`selenium` package; skips without them. Screenshots go to $PLM_SCREENSHOT_DIR (default: the test's
tmp_path).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from server_proc import server_output, start_server, stop_server
from video_files import write_video

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
INSTALL_HINT = "install chromium and chromium-driver (scripts/test.sh does as root)"
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(f"no Chromium or chromedriver: {INSTALL_HINT}", allow_module_level=True)
pytest.importorskip(
    "selenium", reason=f"selenium is not installed (pip install selenium); {INSTALL_HINT}"
)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

MODEL = "plm-test"
WAIT_S = 60  # the CPU is slow and shared with the server: generous everywhere
STOP_MAX_TOKENS = 8000  # ~40 s of generation on a 2-core CPU: a stop must end it long before
STOP_WAIT_S = 15  # the server is idle this soon after a stop (measured: well under a second)


# -- fixtures --------------------------------------------------------------------------------------


SERVERS: dict[str, Any] = {}  # base URL -> its process (for the server's output on failures)


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    proc, url = start_server()
    SERVERS[url] = proc
    try:
        yield url
    finally:
        stop_server(proc)


@pytest.fixture
def keyed_base() -> Iterator[str]:
    proc, url = start_server("--api-key", "secret")
    try:
        yield url
    finally:
        stop_server(proc)


@pytest.fixture
def driver() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000"):
        options.add_argument(flag)
    # every request the page makes, failed ones included (resource timing lists only some)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield drv
        # an uncaught exception in the page's script fails the test (the server's 4xx answers are
        # logged as failed loads: expected where a test provokes them)
        severe = [e["message"] for e in drv.get_log("browser") if e.get("level") == "SEVERE"]
        errors = [m for m in severe if "Failed to load resource" not in m]
        assert errors == [], f"errors in the browser console: {errors}"
    finally:
        drv.quit()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    where = Path(os.environ.get("PLM_SCREENSHOT_DIR") or tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    return where


def png_file(path: Path, size=(320, 240)) -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (30, 90, 160))
    draw = ImageDraw.Draw(img)
    draw.ellipse((40, 30, 200, 190), fill=(240, 200, 40))
    draw.rectangle((180, 120, 300, 220), fill=(200, 40, 60))
    img.save(path)
    return path


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


# -- page helpers ----------------------------------------------------------------------------------


def wait_for(drv, cond: Callable[[Any], Any], what: str, timeout: float = WAIT_S) -> Any:
    try:
        return WebDriverWait(drv, timeout, poll_frequency=0.05).until(cond)
    except TimeoutException:
        now = drv.execute_script("return document.body && document.body.dataset.state")
        error = drv.execute_script(
            "const e = document.getElementById('error'); return e ? e.textContent : null"
        )
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what} (page state {now!r}, #error {error!r})"
        ) from None


def state(drv) -> str | None:
    return drv.execute_script("return document.body.dataset.state")


def text_of(drv, css: str) -> str:
    """textContent of the first match ('' when none): works for hidden elements too."""
    return drv.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : ''", css
    )


def texts_of(drv, css: str) -> list[str]:
    return drv.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)", css
    )


def assistant_text(drv) -> str:
    return drv.execute_script(
        "const m = document.querySelectorAll('#messages .msg.assistant');"
        "return m.length ? m[m.length - 1].textContent : ''"
    )


def assistant_count(drv) -> int:
    return len(drv.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant"))


def open_page(drv, base: str, *, expect_model: bool = True) -> None:
    drv.get(base + "/")
    wait_for(drv, lambda d: state(d) in ("idle", "error"), "the page to set body[data-state]")
    if expect_model:
        wait_for(drv, lambda d: MODEL in text_of(d, "#model"), f"#model to show {MODEL!r}")
        assert state(drv) == "idle", text_of(drv, "#error")


def fill(el: WebElement, value: str, *, leave: bool = True) -> None:
    """Type `value` over the field's content (and Tab out, so change handlers run)."""
    el.clear()
    el.send_keys(value)
    if leave:
        el.send_keys(Keys.TAB)


def field(drv, css: str) -> WebElement:
    return drv.find_element(By.CSS_SELECTOR, css)


def send(drv) -> None:
    button = field(drv, "#send")
    wait_for(drv, lambda d: button.is_enabled(), "#send to be enabled")
    button.click()


def number(text: str) -> str:
    """Digits of a formatted number kept together: '1,234' / '1 234' -> '1234'."""
    return re.sub(r"(?<=\d)[,\u202f\u00a0 ](?=\d{3}\b)", "", text)


def mentions(text: str, count: int, unit: str) -> bool:
    """'4 frames', '4frames', 'frames: 4' or 'frames 4'."""
    pattern = rf"(?<![\d.]){count}\s*{unit}|{unit}\W{{0,3}}{count}(?![\d.])"
    return re.search(pattern, number(text)) is not None


def tokenize(base: str, content: list[dict], headers=None) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    r = httpx.post(f"{base}/tokenize", json=body, headers=headers, timeout=WAIT_S)
    assert r.status_code == 200, r.text
    return r.json()


def metrics(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith("plm:"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def wait_for_reply(drv, *, after: int) -> str:
    """Waits until a reply after `after` assistant messages has finished; its text."""
    wait_for(drv, lambda d: assistant_count(d) > after, "an assistant message")
    wait_for(
        drv,
        lambda d: state(d) != "streaming" and d.find_element(By.ID, "send").is_enabled(),
        "the reply to finish",
        timeout=WAIT_S * 2,
    )
    assert state(drv) == "idle", f"state {state(drv)!r}, #error {text_of(drv, '#error')!r}"
    return assistant_text(drv)


# -- tests -----------------------------------------------------------------------------------------


def expect_error(driver, message: str) -> None:
    """#error shows `message` (the server's own words) and the page is in its error state."""
    wait_for(
        driver,
        lambda d: message in text_of(d, "#error"),
        f"#error to show the server's message {message!r}",
    )
    assert field(driver, "#error").is_displayed()
    wait_for(driver, lambda d: state(d) == "error", "body[data-state=error]")


def test_the_page_loads_from_the_server_with_no_external_request(driver, base):
    r = httpx.get(base + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    # no src/href (nor CSS url() or @import) pointing anywhere but this server
    refs = re.findall(
        r"""(?:\b(?:src|href|action)\s*=\s*["']?|url\(\s*["']?|@import\s+["'])"""
        r"""((?:https?:)?//[^"'\s)>]+)""",
        html,
        re.I,
    )
    assert refs == [], f"the page references other hosts: {refs}"
    scripts = re.findall(r"<script\b[^>]*\bsrc\s*=", html, re.I)
    links = re.findall(r"<link\b[^>]*\brel\s*=\s*[\"']?stylesheet", html, re.I)
    assert scripts == [] and links == [], "the page should be self-contained (inline CSS and JS)"

    open_page(driver, base)
    resources = driver.execute_script(
        "return performance.getEntriesByType('navigation').concat("
        "performance.getEntriesByType('resource')).map(e => e.name)"
    )
    assert resources, "no performance entries at all"
    outside = [u for u in resources if not u.startswith(base + "/")]
    assert outside == [], f"requests outside the server: {outside}"
    # the page asked the server for the model name
    assert any(u.startswith(base + "/v1/models") for u in resources), resources

    # every request Chromium sent, failed ones included
    sent = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            sent.append(msg["params"]["request"]["url"])
    network = [u for u in sent if urlsplit(u).scheme not in ("data", "blob", "about")]
    assert network, "the performance log recorded no request"
    ours = urlsplit(base).netloc
    outside = [u for u in network if urlsplit(u).netloc != ours]
    assert outside == [], f"requests outside the server: {outside}"


def test_an_image_gets_a_thumbnail_a_cost_preview_and_a_streamed_answer(
    driver, base, tmp_path, shots
):
    picture = png_file(tmp_path / "picture.png")
    question = "What is in this picture?"
    image_part = {"type": "image_url", "image_url": {"url": data_url(picture, "image/png")}}
    (item,) = tokenize(base, [image_part])["items"]
    # the whole prompt once the question is typed: the preview's total must come to this
    prompt_tokens = tokenize(base, [image_part, {"type": "text", "text": question}])["count"]
    assert item["kind"] == "image" and item["tiles"] >= 1 and item["tokens"] > 0

    open_page(driver, base)
    field(driver, "#file-input").send_keys(str(picture))
    wait_for(
        driver,
        lambda d: d.execute_script(
            "const t = document.querySelector('#attachments .attachment img.thumb');"
            "return t !== null && t.complete && t.naturalWidth > 0"
        ),
        "the image's thumbnail (#attachments .attachment img.thumb) to render",
    )
    attachment = field(driver, "#attachments .attachment")
    detail = attachment.find_element(By.CSS_SELECTOR, "select.detail")
    options = [o.get_attribute("value") for o in detail.find_elements(By.TAG_NAME, "option")]
    assert set(options) == {"auto", "low", "high"}, options
    assert attachment.find_elements(By.CSS_SELECTOR, "button.remove")

    # the preview shows what /tokenize says the picture costs
    wait_for(
        driver,
        lambda d: (
            mentions(text_of(d, "#cost .cost-item"), item["tiles"], "tiles")
            and mentions(text_of(d, "#cost .cost-item"), item["tokens"], "tokens")
        ),
        f"#cost .cost-item to show {item['tiles']} tiles and {item['tokens']} tokens",
    )
    assert len(driver.find_elements(By.CSS_SELECTOR, "#cost .cost-item")) == 1
    assert re.search(r"\d+\s*tokens", number(text_of(driver, "#cost")))

    fill(field(driver, "#message"), question, leave=False)
    wait_for(
        driver,
        lambda d: mentions(text_of(d, "#cost"), prompt_tokens, "tokens"),
        f"#cost to total the prompt with the question: {prompt_tokens} tokens",
    )
    fill(field(driver, "#max-tokens"), "1500")
    driver.execute_script("document.activeElement.blur()")  # no focus ring in the picture
    driver.save_screenshot(str(shots / "token-cost-preview.png"))

    before = assistant_count(driver)
    send(driver)
    wait_for(
        driver,
        lambda d: question in "".join(texts_of(d, "#messages .msg.user")),
        "the question in the chat log (#messages .msg.user)",
    )
    # the answer streams: its text grows across polls while the page says it is streaming
    lengths: list[int] = []

    def grew(d) -> bool:
        if state(d) != "streaming":
            raise AssertionError(f"the reply ended before it was seen growing: lengths {lengths}")
        n = len(assistant_text(d)) if assistant_count(d) > before else 0
        if n and (not lengths or n > lengths[-1]):
            lengths.append(n)
        return len(lengths) >= 3

    wait_for(driver, lambda d: state(d) == "streaming", "body[data-state=streaming]")
    assert field(driver, "#stop").is_enabled(), "#stop should be enabled while a reply streams"
    wait_for(driver, grew, "the answer's text to grow")
    driver.save_screenshot(str(shots / "chat-with-image.png"))

    answer = wait_for_reply(driver, after=before)
    assert len(answer) >= lengths[-1]
    assert not field(driver, "#stop").is_enabled(), "#stop should be disabled after the reply"
    wait_for(
        driver,
        lambda d: all(w in text_of(d, "#stats") for w in ("TTFT", "tok/s", "cached")),
        "#stats to show TTFT, tok/s and cached",
    )
    stats = text_of(driver, "#stats")
    assert re.search(r"\d", stats), stats
    assert text_of(driver, "#error").strip() == ""
    # the picture shows the turn from its start: the question, the answer's beginning, the stats
    driver.execute_script("document.getElementById('messages').scrollTop = 0")
    driver.save_screenshot(str(shots / "streamed-answer.png"))
    print(f"\nscreenshots in {shots}; stats: {stats.strip()}")


def test_a_video_with_its_frames_setting_is_costed_and_answered(driver, base, tmp_path):
    video = write_video(tmp_path / "clip.mp4", n=16, size=(64, 48), fps=8)
    part = {
        "type": "video_url",
        "video_url": {"url": data_url(video, "video/mp4"), "num_frames": 4},
    }
    (item,) = tokenize(base, [part])["items"]
    assert item["kind"] == "video" and item["frames"] == 4 and item["tokens"] > 0

    open_page(driver, base)
    field(driver, "#file-input").send_keys(str(video))
    wait_for(
        driver,
        lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments .attachment video.thumb"),
        "the video's thumbnail (#attachments .attachment video.thumb)",
    )
    attachment = field(driver, "#attachments .attachment")
    assert attachment.find_elements(By.CSS_SELECTOR, "input.fps")
    wait_for(
        driver,
        lambda d: "frames" in text_of(d, "#cost .cost-item"),
        "#cost .cost-item to mention frames",
    )
    fill(attachment.find_element(By.CSS_SELECTOR, "input.num-frames"), "4")
    wait_for(
        driver,
        lambda d: (
            mentions(text_of(d, "#cost .cost-item"), 4, "frames")
            and mentions(text_of(d, "#cost .cost-item"), item["tokens"], "tokens")
        ),
        f"#cost .cost-item to show 4 frames and {item['tokens']} tokens",
    )

    fill(field(driver, "#message"), "What happens in this video?", leave=False)
    fill(field(driver, "#max-tokens"), "20")
    before = assistant_count(driver)
    send(driver)
    answer = wait_for_reply(driver, after=before)
    assert answer.strip(), "empty answer"
    assert text_of(driver, "#error").strip() == ""


def test_stop_ends_the_stream_and_aborts_the_request_on_the_server(driver, base):
    open_page(driver, base)
    wait_for(driver, lambda d: metrics(base)["plm:num_requests_running"] == 0, "an idle server")
    generated_before = metrics(base)["plm:generation_tokens_total"]
    fill(field(driver, "#message"), "Tell me a very long story.", leave=False)
    fill(field(driver, "#max-tokens"), str(STOP_MAX_TOKENS))
    before = assistant_count(driver)
    send(driver)
    wait_for(
        driver,
        lambda d: assistant_count(d) > before and assistant_text(d).strip(),
        "the first text of the answer",
    )
    assert state(driver) == "streaming"
    stop = field(driver, "#stop")
    assert stop.is_enabled()
    stop.click()
    clicked = time.monotonic()

    wait_for(
        driver,
        lambda d: state(d) != "streaming",
        "the page to leave the streaming state",
        timeout=STOP_WAIT_S,
    )
    assert not stop.is_enabled(), "#stop should be disabled once stopped"
    stopped_text = assistant_text(driver)

    # the server aborted the request long before it could generate all its tokens
    try:
        wait_for(
            driver,
            lambda d: metrics(base)["plm:num_requests_running"] == 0,
            "plm:num_requests_running to drop to 0 after stop",
            timeout=STOP_WAIT_S,
        )
    except AssertionError as e:
        figures = {k: v for k, v in metrics(base).items() if "request" in k or "generation" in k}
        log = server_output(SERVERS[base])[-2000:]
        raise AssertionError(f"{e}\nmetrics: {figures}\nserver output: {log}") from None
    took = time.monotonic() - clicked
    generated = metrics(base)["plm:generation_tokens_total"] - generated_before
    assert generated < STOP_MAX_TOKENS / 2, f"{generated} tokens generated: the request ran on"
    # and the answer stopped growing
    assert assistant_text(driver) == stopped_text
    assert field(driver, "#send").is_enabled()
    print(f"\nstopped after {generated:.0f} tokens; server idle {took:.2f}s after the click")


def test_the_page_asks_for_the_api_key_and_shows_the_servers_refusal(driver, keyed_base):
    r = httpx.get(f"{keyed_base}/v1/models", timeout=10)
    assert r.status_code == 401
    message = r.json()["error"]["message"]
    assert "API key" in message

    open_page(driver, keyed_base, expect_model=False)
    key = field(driver, "#api-key")
    assert key.is_displayed(), "the #api-key field should be shown"
    assert key.get_attribute("type") == "password"

    fill(field(driver, "#message"), "Hi", leave=False)
    fill(field(driver, "#max-tokens"), "5")
    send(driver)
    expect_error(driver, message)

    fill(key, "secret")
    wait_for(driver, lambda d: MODEL in text_of(d, "#model"), f"#model to show {MODEL!r}")
    before = assistant_count(driver)
    if not field(driver, "#message").get_attribute("value"):
        fill(field(driver, "#message"), "Hi", leave=False)
    send(driver)
    answer = wait_for_reply(driver, after=before)
    assert answer.strip(), "empty answer"
    assert text_of(driver, "#error").strip() == "" or not field(driver, "#error").is_displayed()
    # the key lives in page memory only
    stored = driver.execute_script(
        "return JSON.stringify(localStorage) + JSON.stringify(sessionStorage) + document.cookie"
    )
    assert "secret" not in stored, "the API key must not be stored by the page"


def test_a_bad_image_shows_the_servers_message(driver, base, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"this is plain text, not a picture\n" * 4)
    part = {"type": "image_url", "image_url": {"url": data_url(fake, "image/png")}}
    body = {"model": MODEL, "messages": [{"role": "user", "content": [part]}]}
    r = httpx.post(f"{base}/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=WAIT_S)
    assert r.status_code == 400
    message = r.json()["error"]["message"]

    open_page(driver, base)
    field(driver, "#file-input").send_keys(str(fake))
    wait_for(
        driver,
        lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments .attachment"),
        "the attachment",
    )
    fill(field(driver, "#message"), "What is this?", leave=False)
    send(driver)
    expect_error(driver, message)


def test_a_schema_the_server_rejects_shows_its_message(driver, base):
    schema = {"type": "nonsense"}
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=WAIT_S)
    assert r.status_code == 400
    message = r.json()["error"]["message"]

    open_page(driver, base)
    fill(field(driver, "#message"), "Hi", leave=False)
    fill(field(driver, "#json-schema"), json.dumps(schema), leave=False)
    send(driver)
    wait_for(
        driver,
        lambda d: message in text_of(d, "#error"),
        f"#error to show the server's message {message!r}",
    )
    assert field(driver, "#error").is_displayed()
    assert state(driver) == "error"

    # a box that is not JSON at all is refused with a message too, and a valid schema then works
    # (the message box is typed again: a failed send may have consumed it)
    fill(field(driver, "#message"), "Hi", leave=False)
    fill(field(driver, "#json-schema"), "{not json", leave=False)
    send(driver)
    wait_for(
        driver,
        lambda d: text_of(d, "#error").strip() and message not in text_of(d, "#error"),
        "#error to show why the schema box is not JSON",
    )

    answer_schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    fill(field(driver, "#message"), "Yes or no?", leave=False)
    fill(field(driver, "#json-schema"), json.dumps(answer_schema), leave=False)
    fill(field(driver, "#max-tokens"), "60")
    before = assistant_count(driver)
    send(driver)
    answer = wait_for_reply(driver, after=before)
    assert json.loads(answer.strip()) in ({"answer": "yes"}, {"answer": "no"}), answer
