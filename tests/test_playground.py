"""The web playground (GET /) in a real browser: Debian's chromium, headless, driven by Playwright.

Two servers on 127.0.0.1, both on the tiny trained checkpoint:
- `python -m server` with an API key, as a user starts it: the page's errors (401, 400), a generation typed
  and started with Enter, the masked count of every frame, the final text against POST /generate, copy,
  and the page on a phone-sized screen.
- the same app under uvicorn in a thread, its steps slowed down (a tiny model on CPU finishes 90 steps
  faster than a click), one slot and one queue place: a screenshot mid-denoise, 429 in words, and Stop
  freeing the slot.

Screenshots go to artifacts/ (gitignored). Needs /usr/bin/chromium and playwright: `bash tests/browser_deps.sh`.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.config import ServerConfig
from tests.server_utils import ROOT, ServerProcess, ThreadServer, metrics, wait_for, wait_healthy

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists() or importlib.util.find_spec("playwright") is None:
    pytest.skip(f"the browser test needs {CHROMIUM} and playwright (run `bash tests/browser_deps.sh`)",
                allow_module_level=True)

from playwright.sync_api import BrowserContext, Page, sync_playwright  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "artifacts"
KEY = "playground-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "ROMEO:\nBut soft, what light"
STEP_DELAY = 0.15  # seconds added to every step of the slowed-down server

# Installed before the page's own script: records the canvas at every animation frame and after every change
# to it (a MutationObserver sees each step's update even when two land in one frame).
RECORDER = """
window.__tzd = {frames: [], changes: []};
function __tzdSnap(list) {
  const c = document.getElementById("canvas");
  if (!c) return;
  const r = c.getBoundingClientRect(), s = document.querySelector(".stats").getBoundingClientRect();
  list.push({state: document.body.dataset.state, cells: c.children.length,
             masked: c.querySelectorAll(".cell.mask").length, fresh: c.querySelectorAll(".cell.new").length,
             top: r.top + window.scrollY, height: r.height, statsHeight: s.height});
}
function __tzdFrame() { __tzdSnap(window.__tzd.frames); requestAnimationFrame(__tzdFrame); }
document.addEventListener("DOMContentLoaded", () => {
  new MutationObserver(() => __tzdSnap(window.__tzd.changes)).observe(
    document.getElementById("canvas"), {childList: true, subtree: true, attributes: true, characterData: true});
  requestAnimationFrame(__tzdFrame);
});
"""


@pytest.fixture(scope="module")
def srv(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tiny_checkpoint, "--dtype", "float32", "--api-key", KEY, "--max-batch-size", "4",
                       log_dir=tmp_path_factory.mktemp("srvlog")) as s:
        yield s


@pytest.fixture(scope="module")
def slow(tiny_checkpoint: Path) -> Iterator[ThreadServer]:
    app = create_app(ServerConfig(checkpoint=tiny_checkpoint, dtype="float32", max_batch_size=1, max_queue=1))
    with ThreadServer(app) as ts:
        wait_healthy(ts.url)
        batch = app.state.serving.engine.batch
        real_step = batch.step

        def slow_step():  # noqa: ANN202 - the batch's own result
            time.sleep(STEP_DELAY)
            return real_step()

        batch.step = slow_step
        yield ts


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1100, "height": 900})
        ctx.add_init_script(RECORDER)
        yield ctx
        ctx.close()


def open_page(ctx: BrowserContext, url: str, requests: list[str]) -> Page:
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(f"{url}/")
    page.wait_for_function("() => document.getElementById('m-status').dataset.status === 'ok'")
    assert not errors, errors
    return page


def fill(page: Page, **fields: object) -> None:
    for name, value in fields.items():
        if name == "cache":
            page.select_option("#cache", str(value))
        else:
            page.fill(f"#{name}", "" if value is None else str(value))


def wait_state(page: Page, *states: str, timeout: float = 60_000) -> str:
    page.wait_for_function("(s) => s.includes(document.body.dataset.state)", arg=list(states), timeout=timeout)
    return page.evaluate("() => document.body.dataset.state")


def run_frames(page: Page, kind: str, cells: int) -> list[dict]:
    """The recorded snapshots of the run whose canvas has `cells` positions."""
    return [f for f in page.evaluate(f"() => window.__tzd.{kind}") if f["cells"] == cells]


def test_page_and_its_files_are_served_with_nothing_from_outside(srv: ServerProcess) -> None:
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "connect-src 'self'" in page.text  # the page's CSP forbids fetching from anywhere else
        for path, kind in [("/playground/app.js", "javascript"), ("/playground/style.css", "text/css")]:
            r = c.get(path)
            assert r.status_code == 200 and kind in r.headers["content-type"], path
            assert r.headers["cache-control"] == "no-cache"  # revalidated: never a stale script with a new page
            assert "http://" not in r.text and "https://" not in r.text and "@import" not in r.text, path
        status = c.get("/playground/status").json()  # open, like /health: the page needs it to show the key field
        assert status["status"] == "ok" and status["auth"] is True and status["context"] == 96
        assert status["running"] == 0 and status["max_batch_size"] == 4
        assert c.get("/playground/nope.js").status_code == 404


def test_generate_in_the_browser(srv: ServerProcess, browser: BrowserContext) -> None:
    requests: list[str] = []
    page = open_page(browser, srv.url, requests)
    # every control has a label; the key field shows because this server has a key
    unlabeled = page.evaluate("() => [...document.querySelectorAll('input, select, textarea')]"
                              ".filter(e => !e.labels.length).map(e => e.id)")
    assert unlabeled == []
    assert page.is_visible("#api_key")

    body = {"max_tokens": 40, "steps": 20, "block_length": 8, "temperature": 0.8, "seed": 11}
    page.fill("#prompt", PROMPT)
    fill(page, **body)
    page.press("#prompt", "Enter")  # no key yet: 401, said in words
    assert wait_state(page, "error", "done") == "error"
    msg = page.inner_text("#message")
    assert msg.startswith("401 Unauthorized") and "API key" in msg, msg
    assert page.get_attribute("#message", "role") == "alert"

    page.fill("#api_key", KEY)
    fill(page, steps=2)  # fewer steps than blocks (40 / 8 = 5): 400 naming the field
    page.press("#steps", "Enter")
    assert wait_state(page, "error", "done") == "error"
    msg = page.inner_text("#message")
    assert msg.startswith("400 Bad request: steps:") and "blocks" in msg, msg
    assert page.get_attribute("#steps", "aria-invalid") == "true"
    assert page.evaluate("() => document.activeElement.id") == "steps"

    fill(page, steps=body["steps"])
    page.evaluate("() => { window.__tzd.frames = []; window.__tzd.changes = []; }")
    page.press("#prompt", "Enter")
    assert wait_state(page, "done", "error", "stopped") == "done", page.inner_text("#message")
    page.wait_for_timeout(100)  # a few more frames after the end

    n = body["max_tokens"]
    changes, frames = run_frames(page, "changes", n), run_frames(page, "frames", n)
    masked = [f["masked"] for f in changes]
    assert masked[0] == n and masked[-1] == 0, masked
    assert all(a >= b for a, b in zip(masked, masked[1:], strict=False)), masked  # never rises
    assert len(set(masked)) > body["steps"] // 2  # the steps were drawn one by one, not just the end
    assert max(f["fresh"] for f in changes) > 0  # committed-this-step cells were highlighted
    frame_masked = [f["masked"] for f in frames]
    assert frame_masked and frame_masked[-1] == 0, frame_masked
    assert all(a >= b for a, b in zip(frame_masked, frame_masked[1:], strict=False)), frame_masked
    # no layout jump: the canvas and the stats above it kept their place and size while tokens arrived
    assert len({(f["top"], f["height"], f["statsHeight"]) for f in changes + frames}) == 1

    want = httpx.post(f"{srv.url}/generate", json={"prompt": PROMPT, **body}, headers=AUTH, timeout=60).json()
    assert page.text_content("#text") == want["text"]
    assert page.inner_text("#stat-step") == f"{want['steps']} / {body['steps']}"
    assert page.inner_text("#stat-nfe") == str(want["nfe"]) and page.inner_text("#stat-seed") == "11"
    assert page.inner_text("#stat-masked") == "0" and page.inner_text("#stat-tps") not in ("", "–")
    assert page.inner_text("#message").startswith(f"Done: {want['usage']['completion_tokens']} tokens")

    big = {"max_tokens": 8, "steps": 4, "block_length": 8, "temperature": 1.0, "seed": 2**53 + 1}
    fill(page, **big)  # a seed past JavaScript's exact integers goes and comes back digit for digit
    page.press("#prompt", "Enter")
    assert wait_state(page, "done", "error", "stopped") == "done", page.inner_text("#message")
    assert page.inner_text("#stat-seed") == str(big["seed"])
    want_big = httpx.post(f"{srv.url}/generate", json={"prompt": PROMPT, **big}, headers=AUTH, timeout=60).json()
    assert want_big["seed"] == big["seed"] and page.text_content("#text") == want_big["text"]
    fill(page, **body)
    page.press("#prompt", "Enter")
    assert wait_state(page, "done", "error", "stopped") == "done", page.inner_text("#message")
    assert page.text_content("#text") == want["text"]  # the same seed again: the same text

    browser.grant_permissions(["clipboard-read", "clipboard-write"], origin=srv.url)
    page.click("#copy")
    assert page.evaluate("() => navigator.clipboard.readText()") == want["text"]

    page.focus("#api_key")  # keyboard focus is visible
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.id") == "generate"
    assert page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle") != "none"
    page.screenshot(path=str(ARTIFACTS / "playground-end.png"), full_page=True)

    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    page.wait_for_timeout(100)
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=str(ARTIFACTS / "playground-phone.png"), full_page=True)
    assert all(u.startswith(srv.url + "/") or u.startswith("data:") for u in requests), requests
    page.close()


def test_stop_frees_the_slot_and_a_full_queue_is_said_in_words(slow: ThreadServer,
                                                                browser: BrowserContext) -> None:
    requests: list[str] = []
    page = open_page(browser, slow.url, requests)
    assert not page.is_visible("#api_key")  # no key on this server
    n = 90  # every step commits one position: about 90 * STEP_DELAY s unless stopped
    page.fill("#prompt", "ROMEO:")
    fill(page, max_tokens=n, steps=n, block_length=n, temperature=0, threshold=None, seed=1)
    page.click("#generate")
    page.wait_for_function("() => document.querySelectorAll('#canvas .cell:not(.mask)').length >= 4")
    page.screenshot(path=str(ARTIFACTS / "playground-mid.png"), full_page=True)
    assert page.evaluate("() => document.body.dataset.state") == "running"  # the screenshot is mid-denoise
    assert 0 < int(page.inner_text("#stat-masked")) < n
    assert metrics(slow.url)["tzd_requests_running"] == 1
    page.wait_for_function("() => document.getElementById('m-running').textContent.startsWith('1 ')")

    # the slot is taken; one more request fills the queue; the next one is refused with 429
    waiting = threading.Thread(target=httpx.post, args=(f"{slow.url}/generate",),
                               kwargs={"json": {"prompt": "x", "max_tokens": 2, "steps": 2}, "timeout": 120})
    waiting.start()
    assert wait_for(lambda: metrics(slow.url)["tzd_requests_waiting"] == 1)
    other = open_page(browser, slow.url, requests)
    fill(other, max_tokens=4)
    other.click("#generate")
    assert wait_state(other, "error", "done") == "error"
    msg = other.inner_text("#message")
    assert msg.startswith("429 Too many requests:") and "queue is full" in msg and "Try again in" in msg, msg
    other.close()

    before = metrics(slow.url)
    assert page.evaluate("() => document.body.dataset.state") == "running"
    page.click("#stop")
    assert wait_state(page, "stopped", "done", "error") == "stopped"
    stopped_masked = int(page.inner_text("#stat-masked"))
    assert stopped_masked > 0 and page.inner_text("#message").startswith("Stopped after")
    assert not page.is_disabled("#generate") and page.is_disabled("#stop")
    waiting.join(timeout=60)
    assert wait_for(lambda: metrics(slow.url)["tzd_requests_running"] == 0, timeout=30)
    after = metrics(slow.url)
    key = 'tzd_requests_total{endpoint="generate",status="499"}'
    assert after.get(key, 0) == before.get(key, 0) + 1  # the server saw the client go
    # the stopped request's remaining steps never ran: the steps after Stop (the queued request's 2, and any
    # that ran before the server saw the disconnect) are fewer than the stopped one still needed
    ran = after["tzd_batch_size_count"] - before["tzd_batch_size_count"]
    assert ran <= 12 < stopped_masked, (ran, stopped_masked)
    page.wait_for_function("() => document.getElementById('m-running').textContent.startsWith('0 ')")
    assert int(page.inner_text("#stat-masked")) == stopped_masked  # the canvas stays as it was stopped
    assert all(u.startswith(slow.url + "/") or u.startswith("data:") for u in requests), requests
    page.close()


def test_chat_mode_on_a_model_with_a_chat_template(browser: BrowserContext, tmp_path: Path) -> None:
    """A LLaDA-layout model with a template: the page starts in chat mode and keeps the conversation."""
    from tests.hf_checkpoints import write_llada

    body = {"max_tokens": 8, "steps": 8, "block_length": 8, "seed": 4}
    with ServerProcess(write_llada(tmp_path / "llada"), "--dtype", "float32", log_dir=tmp_path) as chat_srv:
        page = open_page(browser, chat_srv.url, [])
        page.wait_for_function("() => !document.getElementById('chat-field').hidden")
        assert page.is_checked("#chat")
        fill(page, prompt="To be, or not?", **body)
        page.press("#prompt", "Enter")
        assert wait_state(page, "done", "error", "stopped") == "done", page.inner_text("#message")
        first = [{"role": "user", "content": "To be, or not?"}]
        want = httpx.post(f"{chat_srv.url}/generate", json={"messages": first, **body}, timeout=60).json()
        assert page.text_content("#text") == want["text"]
        assert page.eval_on_selector_all("#history .turn", "els => els.map(e => e.className)") == [
            "turn user", "turn assistant"]

        fill(page, prompt="And then?")  # the second turn is sent with the first
        page.press("#prompt", "Enter")
        assert wait_state(page, "done", "error", "stopped") == "done", page.inner_text("#message")
        second = [*first, {"role": "assistant", "content": want["text"]}, {"role": "user", "content": "And then?"}]
        want2 = httpx.post(f"{chat_srv.url}/generate", json={"messages": second, **body}, timeout=60).json()
        assert page.text_content("#text") == want2["text"]
        assert page.eval_on_selector_all("#history .turn", "els => els.length") == 4
        page.screenshot(path=str(ARTIFACTS / "playground-chat.png"))
        page.click("#chat-clear")
        assert page.is_hidden("#history")
        page.close()


def test_infill_mode_fills_a_gap_between_prompt_and_suffix(srv: ServerProcess, browser: BrowserContext,
                                                           tmp_path: Path) -> None:
    """The infill mode sends prompt + suffix; the canvas is the gap, the suffix comes back verbatim around
    the text; on a block-causal model the mode is not offered and a forced suffix is a 400 naming it."""
    page = open_page(browser, srv.url, [])
    page.fill("#api_key", KEY)
    page.wait_for_function("() => !document.getElementById('infill-field').hidden")
    assert page.is_hidden("#suffix")
    page.check("#infill")
    assert page.is_visible("#suffix") and page.inner_text("#max_tokens-label") == "Gap (tokens)"
    body = {"max_tokens": 12, "steps": 12, "block_length": 12, "seed": 3}
    prompt, suffix = "ROMEO:\nBut soft, what light through yonder", " window breaks?\nIt is the east."
    page.fill("#prompt", prompt)
    page.fill("#suffix", suffix)
    fill(page, **body)
    page.press("#prompt", "Enter")
    assert wait_state(page, "done", "error", "stopped") == "done", page.inner_text("#message")
    want = httpx.post(f"{srv.url}/generate", json={"prompt": prompt, "suffix": suffix, **body}, headers=AUTH,
                      timeout=60).json()
    assert page.text_content("#text") == prompt + want["text"] + suffix
    assert page.eval_on_selector_all("#text .fixed", "els => els.map(e => e.textContent)") == [prompt, suffix]
    assert page.eval_on_selector_all("#canvas .cell", "els => els.length") == body["max_tokens"]
    assert page.eval_on_selector_all("#canvas .cell", "els => els.every(e => / p 0?\\.\\d+|p 1\\.0+/.test(e.title))")
    browser.grant_permissions(["clipboard-read", "clipboard-write"], origin=srv.url)
    page.click("#copy")
    assert page.evaluate("() => navigator.clipboard.readText()") == prompt + want["text"] + suffix
    page.screenshot(path=str(ARTIFACTS / "playground-infill.png"), full_page=True)
    page.close()

    with ServerProcess(ROOT / "models" / "shakespeare-small-bd", "--dtype", "float32", log_dir=tmp_path) as bd:
        page = open_page(browser, bd.url, [])
        page.wait_for_timeout(300)  # a status poll has answered (the page waited for it): no infill offered
        assert page.is_hidden("#infill-field")
        page.evaluate("() => { document.getElementById('infill-field').hidden = false; }")
        page.check("#infill")
        page.fill("#prompt", "ROMEO:")
        fill(page, max_tokens=8, steps=8, block_length=None)
        page.press("#prompt", "Enter")
        assert wait_state(page, "error", "done") == "error"
        msg = page.inner_text("#message")
        assert msg.startswith("400 Bad request: suffix:") and "bidirectional" in msg, msg
        assert page.get_attribute("#suffix", "aria-invalid") == "true"
        page.close()
