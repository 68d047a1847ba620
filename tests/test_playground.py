"""The web playground (serve/static/, served at `/`) in headless Chromium against the real app on 127.0.0.1.

The app is started as tests/test_serve.py starts it (serve/config.yaml, the small offline stack, a store this module
publishes into, the bearer token on), and Debian's `chromium` is driven with Playwright for Python. The page must:
ask for the token (401: a wrong one is refused, the right one is kept), draw strokes with a mouse and with a finger
and show a label that is one of the served classes, with the top-k, the text, the version and rule that answered,
classify an uploaded and a dropped file, show a description when asked, and follow a hot swap to the next version
("now serving version N, K classes") with that version's classes.

Skipped, with the reason, where Chromium or Playwright is missing (`make install` installs both).
Set GMM_CIL_PLAYGROUND_SCREENSHOT=path to keep a screenshot of the page at the end.
"""
from __future__ import annotations

import base64
import os
import shutil

import pytest

# checked before the app's modules (torch, Ray) are imported, so a machine without a browser skips at once
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (make install)")
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium executable (Debian: apt-get install chromium, or `make browser`; or set CHROMIUM=/path)",
                allow_module_level=True)

from cil_platform.storage.store import ProjectionStore  # noqa: E402
from tests.test_serve import CLASSES, IMAGES, POLL_S, TOKEN, publish, serving  # noqa: E402

pytestmark = pytest.mark.e2e

WAIT_MS = 120_000  # a classification on the shared 2-core box, with the first request's warm-up


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    store = ProjectionStore(str(tmp_path_factory.mktemp("playground") / "store"))
    publish(store, 0)
    with serving(store, deployments={"Watcher": {"user_config": {"poll_interval_s": POLL_S}}}) as url:
        yield url, store


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(app, browser):
    context = browser.new_context(has_touch=True, viewport={"width": 1000, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    sync_api.expect.set_options(timeout=WAIT_MS)  # a hot swap, like a classification, may take a while here
    page.goto(f"{app[0]}/")
    yield page
    screenshot = os.environ.get("GMM_CIL_PLAYGROUND_SCREENSHOT")
    if screenshot:
        page.screenshot(path=screenshot, full_page=True)
    context.close()


def stroke(page, points: list[tuple[float, float]]) -> None:
    """A mouse stroke through `points` (fractions of the pad's size)."""
    box = page.locator("#pad").bounding_box()
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for x, y in xy[1:]:
        page.mouse.move(x, y, steps=4)
    page.mouse.up()


def finger_stroke(page, points: list[tuple[float, float]]) -> None:
    """The same with a finger: real touch events through the DevTools protocol (the page sees pointer events of
    type touch, as on a phone)."""
    box = page.locator("#pad").bounding_box()
    xy = [{"x": box["x"] + fx * box["width"], "y": box["y"] + fy * box["height"]} for fx, fy in points]
    cdp = page.context.new_cdp_session(page)
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [xy[0]]})
    for point in xy[1:]:
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [point]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    cdp.detach()


def ink(page) -> int:
    """Dark pixels on the pad."""
    return page.evaluate("""() => {
        const pad = document.getElementById('pad');
        const data = pad.getContext('2d').getImageData(0, 0, pad.width, pad.height).data;
        let dark = 0;
        for (let i = 0; i < data.length; i += 4) { if (data[i] < 128) dark++; }
        return dark;
    }""")


def answered(page, action) -> dict:
    """Run `action`, wait for the page's classify request, check the page shows what the API answered."""
    with page.expect_response(lambda r: "/v1/classify" in r.url and r.request.method == "POST") as reply:
        action()
    response = reply.value
    assert response.status == 200, response.text()
    body = response.json()
    sync_api.expect(page.locator("#answered-by")).to_have_text(
        f"answered by version {body['version']} (task {body['task']}), rule {body['rule']}")
    sync_api.expect(page.locator("#label")).to_have_text(body["label"])
    sync_api.expect(page.locator("#text")).to_have_text(body["text"])
    sync_api.expect(page.locator("#topk-list li .name")).to_have_text([e["label"] for e in body["top_k"]])
    return body


def shown_classes(page) -> list[str]:
    return page.locator("#classes li").all_inner_texts()


def test_the_page_asks_for_the_token_and_refuses_a_wrong_one(page):
    sync_api.expect(page.locator("#auth")).to_be_visible()
    sync_api.expect(page.locator("#serving")).to_have_text("a token is needed")
    page.fill("#token", "not-the-token")
    with page.expect_response(lambda r: "/v1/model" in r.url) as reply:
        page.click("#token-save")
    assert reply.value.status == 401
    sync_api.expect(page.locator("#auth-error")).to_have_text("that token was refused")
    sync_api.expect(page.locator("#auth")).to_be_visible()

    page.fill("#token", TOKEN)
    page.click("#token-save")
    sync_api.expect(page.locator("#auth")).to_be_hidden()
    sync_api.expect(page.locator("#serving")).to_have_text(f"now serving version 0, {len(CLASSES[0])} classes")
    assert shown_classes(page) == CLASSES[0]


def test_drawn_strokes_get_a_seen_class(page):
    assert ink(page) == 0
    square = [(0.3, 0.3), (0.7, 0.3), (0.7, 0.7), (0.3, 0.7), (0.3, 0.3)]
    by_mouse = answered(page, lambda: stroke(page, square))  # classified once the stroke ends
    assert by_mouse["label"] in CLASSES[0] and by_mouse["version"] == 0
    assert len(by_mouse["top_k"]) == 5 and "description" not in by_mouse
    sync_api.expect(page.locator("#classes li.hit")).to_have_text(by_mouse["label"])

    before = ink(page)
    by_finger = answered(page, lambda: finger_stroke(page, [(0.2, 0.8), (0.5, 0.5), (0.8, 0.2)]))
    assert before > 500 and ink(page) > before  # the finger's stroke is on the pad too
    assert by_finger["label"] in CLASSES[0] and by_finger["version"] == 0


def test_upload_and_drop_a_file(page):
    upload = answered(page, lambda: page.set_input_files(
        "#file", files=[{"name": "drawing.png", "mimeType": "image/png", "buffer": IMAGES[0]}]))
    assert upload["label"] in CLASSES[0]

    def drop():
        page.evaluate("""(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
            document.getElementById('drop').dispatchEvent(
                new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
        }""", base64.b64encode(IMAGES[1]).decode())

    dropped = answered(page, drop)
    assert dropped["label"] in CLASSES[0]
    sync_api.expect(page.locator("#error")).to_have_text("")


def test_the_describe_toggle_shows_the_description(page):
    page.check("#describe")
    body = answered(page, lambda: page.click("#classify"))
    assert body["label"] in CLASSES[0] and isinstance(body["description"], str)
    sync_api.expect(page.locator("#description-line")).to_be_visible()
    sync_api.expect(page.locator("#description")).to_have_text(body["description"])
    page.uncheck("#describe")


def test_a_published_version_reaches_the_page(page, app):
    _, store = app
    publish(store, 1)  # the Watcher polls the store; the page polls /v1/model
    sync_api.expect(page.locator("#serving")).to_have_text(f"now serving version 1, {len(CLASSES[1])} classes")
    sync_api.expect(page.locator("#classes li")).to_have_text(CLASSES[1])
    page.click("#clear")
    body = answered(page, lambda: stroke(page, [(0.5, 0.2), (0.8, 0.8), (0.2, 0.8), (0.5, 0.2)]))  # a triangle
    assert body["version"] == 1 and body["label"] in CLASSES[1]


def test_the_page_and_its_files_need_no_token_but_the_api_does(app):
    import httpx

    url, _ = app
    for path in ("/", "/static/playground.js", "/static/playground.css"):
        response = httpx.get(f"{url}{path}", timeout=30)
        assert response.status_code == 200 and response.content, path
    assert "text/html" in httpx.get(f"{url}/", timeout=30).headers["content-type"]
    assert httpx.get(f"{url}/static/nothing-here.js", timeout=30).status_code == 404
    assert httpx.get(f"{url}/static/../ingress.py", timeout=30).status_code in (400, 401, 404)
    assert httpx.get(f"{url}/v1/model", timeout=30).status_code == 401
