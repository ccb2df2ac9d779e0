"""The playground in a real browser: Debian's chromium driven by Playwright against the real server (uvicorn, the
built-in model; a tiny random SAM where clicks are tested). The page must draw boxes as outlined numbered masks,
caption them, stream a chat answer, take SAM clicks, load mask files, download COCO JSON, and never request
anything from a host other than the server. `OSPREY_UPDATE_SCREENSHOTS=1` also writes docs/images/playground.png.

Skips (with the reason) only where chromium or Playwright is missing; `.ci/run` installs both."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from osprey import BUILTIN_MODEL_DIR, EXAMPLE_DIR
from osprey import masks as mask_codecs
from osprey.segment import PromptSegmenter, Segmenters
from serve.background import BackgroundServer
from serve.config import ServeConfig

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (the dev extra)")
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)"),
              pytest.mark.slow]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "playground.png"
IMAGE = EXAMPLE_DIR / "image.png"  # a generated image (osprey data synth) shipped with the package, 256 x 256
# Three objects of the example image (COCO boxes, from its sam_masks.json) and a word each caption must hold.
BOXES = {"triangle": (150, 65, 59, 61), "house": (113, 113, 61, 65), "flower": (89, 172, 43, 60)}
RED = (230, 25, 75)  # region 1's colour (osprey.overlay.PALETTE[0])


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tiny_sam_dir):
    config = ServeConfig(model=str(BUILTIN_MODEL_DIR), served_model_name="builtin", max_batch_size=8,
                         request_timeout_s=120)
    segmenters = Segmenters(prompt=PromptSegmenter.from_folder(tiny_sam_dir))
    with BackgroundServer(config, segmenters=segmenters) as srv:
        yield srv


@pytest.fixture(scope="module")
def bare_server():
    with BackgroundServer(ServeConfig(model=str(BUILTIN_MODEL_DIR), request_timeout_s=120)) as srv:
        yield srv


class Page:
    """A page of the playground, with the log of every URL it requested."""

    def __init__(self, browser, url: str) -> None:
        self.url = url
        self.page = browser.new_page(viewport={"width": 1360, "height": 860}, accept_downloads=True)
        self.requests: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.goto(url + "/")
        # the start-up probe sets the model name, then the SAM capabilities and the tools they enable: wait for its
        # end (a full random-order run under load read the SAM notice before the second request had answered)
        self.page.wait_for_function("document.body.dataset.ready === 'true'")

    def open_image(self, path: Path) -> None:
        self.page.set_input_files("#image-file", str(path))
        self.page.wait_for_selector("#canvas:not([hidden])")

    def to_screen(self, x: float, y: float) -> tuple[float, float]:
        """Image pixel -> page coordinates (the canvas is scaled to fit)."""
        box = self.page.locator("#canvas").bounding_box()
        width, height = self.page.evaluate("[canvas.width, canvas.height]")
        return box["x"] + x * box["width"] / width, box["y"] + y * box["height"] / height

    def drag_box(self, x: float, y: float, w: float, h: float) -> None:
        mouse = self.page.mouse
        mouse.move(*self.to_screen(x, y))
        mouse.down()
        mouse.move(*self.to_screen(x + w / 2, y + h / 2), steps=4)
        mouse.move(*self.to_screen(x + w, y + h), steps=4)
        mouse.up()

    def wait_answers(self, count: int) -> list[str]:
        self.page.wait_for_function(
            f"[...document.querySelectorAll('#regions .answer')].filter(e => e.textContent !== '...').length >= {count}",
            timeout=60_000)
        return self.page.locator("#regions .answer").all_inner_texts()

    def pixel(self, x: int, y: int) -> list[int]:
        return self.page.evaluate(f"[...ctx.getImageData({x}, {y}, 1, 1).data.slice(0, 3)]")

    def foreign_requests(self) -> list[str]:
        return [u for u in self.requests if not u.startswith((self.url + "/", "data:", "blob:"))]


def test_boxes_captions_chat_and_screenshot(browser, server, tmp_path):
    page = Page(browser, server.url)
    page.open_image(IMAGE)
    for x, y, w, h in BOXES.values():
        page.drag_box(x, y, w, h)
        page.wait_answers(1)
    answers = page.wait_answers(len(BOXES))
    for word, answer in zip(BOXES, answers, strict=True):
        assert word in answer, answers  # each caption is about the object its box holds
    x, y, w, h = BOXES["triangle"]
    assert page.pixel(x + w // 2, y) == list(RED)  # region 1's outline on its top edge
    assert page.pixel(x + w // 2, y + h // 2) != list(RED)  # inside: tinted, not outlined

    page.page.locator("#regions .badge").first.click()  # clicking a region's number puts it in the chat
    assert page.page.input_value("#chat-input") == "<region1>"
    page.page.fill("#chat-input", "What is <region1>?")
    with page.page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as chat:
        page.page.click("#chat-send")
    assert chat.value.headers["content-type"].startswith("text/event-stream")
    page.page.wait_for_selector(".msg.assistant.done", timeout=60_000)
    reply = page.page.locator(".msg.assistant").inner_text()
    assert "triangle" in reply, reply
    page.page.locator("#regions .badge").first.click()  # unselect, so the screenshot shows every region alike

    with page.page.expect_download() as download:
        page.page.click("#download-coco")
    coco = json.loads(Path(download.value.path()).read_text())
    assert [a["osprey"]["answer"] for a in coco["annotations"]] == answers
    assert coco["chat"][-1] == {"role": "assistant", "content": reply.strip()}

    page.page.screenshot(path=str(tmp_path / "playground.png"))
    if os.environ.get("OSPREY_UPDATE_SCREENSHOTS"):
        page.page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert page.foreign_requests() == []


def test_sam_click_becomes_a_region(browser, server):
    page = Page(browser, server.url)
    assert page.page.locator("#sam-status").inner_text().startswith("text concepts are off")
    page.open_image(IMAGE)
    page.page.check('input[name="tool"][value="points"]')
    with page.page.expect_response(lambda r: r.url.endswith("/v1/segment") and r.request.method == "POST") as seg:
        page.page.mouse.click(*page.to_screen(180, 100))
    assert seg.value.status == 200
    page.page.wait_for_function("state.pending && state.pending.segment")
    page.page.click("#accept-pending")
    page.wait_answers(1)
    assert "SAM points" in page.page.locator("#regions .region-meta").inner_text()
    assert page.foreign_requests() == []


def test_without_sam_the_page_says_why_and_masks_upload(browser, bare_server, tmp_path):
    page = Page(browser, bare_server.url)
    notice = page.page.locator("#sam-status").inner_text()
    assert "--sam PATH" in notice and "Boxes as masks and uploaded masks work" in notice
    assert page.page.is_disabled('input[name="tool"][value="points"]')
    assert page.page.is_disabled("#everything")
    page.open_image(IMAGE)
    page.page.set_input_files("#mask-files", str(EXAMPLE_DIR / "sam_masks.json"))
    answers = page.wait_answers(6)
    assert len(answers) == 6 and all(answers)
    x, y, w, h = BOXES["house"]
    house = np.zeros((256, 256), dtype=bool)
    house[y:y + h, x:x + w] = True
    (tmp_path / "house.png").write_bytes(mask_codecs.encode_png(house))
    page.page.set_input_files("#mask-files", str(tmp_path / "house.png"))
    answers = page.wait_answers(7)
    assert "house" in answers[6], answers
    with page.page.expect_download() as download:
        page.page.click("#download-jsonl")
    lines = [json.loads(line) for line in Path(download.value.path()).read_text().splitlines()]
    assert [line["answer"] for line in lines] == answers
    assert np.array_equal(mask_codecs.decode_rle(lines[6]["segmentation"], 256, 256), house)
    assert page.foreign_requests() == []


def test_docs_render_offline(browser, bare_server):
    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(bare_server.url + "/docs")
    page.locator(".opblock-summary-path", has_text="/v1/segment/everything").first.wait_for(timeout=30_000)
    assert [u for u in requests if not u.startswith((bare_server.url + "/", "data:"))] == []
