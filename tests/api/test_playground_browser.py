"""The playground page at ``/``, end to end in a real headless Chromium
(Debian's ``chromium``, driven by Playwright's Python package; no browser
download): type, send, watch masked boxes turn into tokens, and get exactly
the API's answer for the same seed. Without the browser these tests FAIL:
.ci/run installs it.

The engine is held at chosen steps (the server runs in this process) so the
page can be checked while the answer is still being denoised. On the bundled
demo model (what ``llada-serve`` with no arguments serves) the page's
example prompts are clicked and answered, and the README's pictures are taken
there: re-taken only with LLADA_UPDATE_SCREENSHOTS=1, otherwise checked."""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import httpx
import pytest

from server.config import ServerConfig
from tests.api.conftest import start_server
from tools import apng

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
# The README's pictures, of the bundled demo model; re-taken only when asked
# (LLADA_UPDATE_SCREENSHOTS=1), so a test run leaves the working tree as it was.
REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "playground.png"  # mid-denoising
ANIMATION = REPO / "docs" / "playground-denoising.png"  # one whole answer, step by step (animated PNG)
UPDATE_SCREENSHOTS = os.environ.get("LLADA_UPDATE_SCREENSHOTS") == "1"
KNOBS = {"max_tokens": 24, "steps": 24, "block_length": 8, "temperature": 0.7}
FIELD_IDS = {"max_tokens": "#max-tokens", "steps": "#steps", "block_length": "#block-length",
             "temperature": "#temperature", "seed": "#seed"}


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playground browser test needs Playwright's Python package: pip install playwright")
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"the playground browser test needs Chromium at {CHROMIUM}: apt-get install -y chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class StepGate:
    """Holds the engine loop before chosen engine steps until released."""

    def __init__(self, engine, holds: list[int]):
        self.engine, self.real = engine, engine.step
        self.count = 0
        self.reached = {k: threading.Event() for k in holds}
        self.go = {k: threading.Event() for k in holds}
        engine.step = self.step

    def step(self):
        if self.count in self.reached:
            self.reached[self.count].set()
            self.go[self.count].wait(60)
        self.count += 1
        return self.real()

    def wait(self, k: int) -> None:
        assert self.reached[k].wait(60), f"the engine never reached step {k}"

    def release(self, k: int) -> None:
        self.go[k].set()

    def remove(self) -> None:
        for go in self.go.values():
            go.set()
        del self.engine.step  # back to the class's method


def chat(live, messages: list[dict], seed: int, stream: bool = False):
    body = {**KNOBS, "messages": messages, "seed": seed}
    if not stream:
        r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    body.update(stream=True, stream_options={"include_denoising": True})
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return [e for e in events if e.get("object") == "denoising.step"]


def counts(page) -> tuple[int, int]:
    """(masked, committed) boxes on the canvas now."""
    return tuple(page.evaluate("[document.querySelectorAll('#canvas .tok.masked').length,"
                               " document.querySelectorAll('#canvas .tok.committed').length]"))


def test_page_and_assets_are_served(live):
    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'src="/playground/app.js"' in page.text and "http" not in page.text.split("<body>")[1]
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = httpx.get(f"{live.url}/playground/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert "http://" not in r.text and "https://" not in r.text  # nothing from elsewhere: works offline
    assert httpx.get(live.url + "/playground/../app.py").status_code == 404
    assert httpx.get(live.url + "/playground/index.html").status_code == 404
    assert "/" not in httpx.get(live.url + "/openapi.json").json()["paths"]


def test_no_playground(text_ckpt, monkeypatch):
    from server.__main__ import build_parser

    assert build_parser().parse_args(["serve", "--model", "m", "--no-playground"]).no_playground
    assert not build_parser().parse_args(["serve", "--model", "m"]).no_playground
    monkeypatch.setenv("LLADA_SERVE_NO_PLAYGROUND", "1")
    assert build_parser().parse_args(["serve", "--model", "m"]).no_playground
    srv = start_server(text_ckpt, ServerConfig(playground=False))
    try:
        r = httpx.get(srv.url + "/")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        assert httpx.get(srv.url + "/playground/app.js").status_code == 404
        assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        srv.stop()


def test_chat_in_the_browser_shows_the_denoising_and_equals_the_api(live, browser, tmp_path):
    # A seed whose answer is not empty, and how many steps it takes.
    prompt = "in the beginning"
    seed = next(s for s in range(20) if chat(live, [{"role": "user", "content": prompt}], s).strip())
    expected = chat(live, [{"role": "user", "content": prompt}], seed)
    num_steps = len(chat(live, [{"role": "user", "content": prompt}], seed, stream=True))
    middle = num_steps // 2
    assert 2 <= middle < num_steps

    page = browser.new_page(viewport={"width": 1100, "height": 820})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(live.url + "/")
    page.wait_for_function("() => document.body.dataset.state === 'idle'")
    page.wait_for_function("() => document.getElementById('model').textContent.includes('llada-test')")
    # Not the bundled demo, and its card offers no examples: neither shows.
    assert page.locator("#demo-note").is_hidden() and page.locator("#examples").is_hidden()
    unlabelled = page.evaluate("""[...document.querySelectorAll('input, select, textarea')]
        .filter(el => !(el.labels && el.labels.length)).map(el => el.id)""")
    assert unlabelled == []
    for field, value in {**KNOBS, "seed": seed}.items():
        page.fill(FIELD_IDS[field], str(value))

    gate = StepGate(live.engine.engine, [0, middle])
    try:
        page.fill("#prompt", prompt)
        page.press("#prompt", "Enter")  # the keyboard sends
        gate.wait(0)  # the request is in the engine, nothing committed yet
        page.wait_for_function("() => document.body.dataset.state === 'running'")
        assert counts(page) == (24, 0)
        assert page.locator("#canvas .block").count() == 3
        gate.release(0)
        gate.wait(middle)  # `middle` steps done, the rest held
        page.wait_for_function(f"() => document.querySelectorAll('#canvas .tok.committed').length === {middle}")
        masked, committed = counts(page)
        assert masked == 24 - middle and committed == middle
        assert page.locator("#canvas .tok.newest").count() == 1  # one token a step: the newest is highlighted
        assert page.locator("#canvas .block.current").count() == 1
        assert page.locator("#stop").is_enabled() and page.locator("#send").is_disabled()
        shot = tmp_path / "playground.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000  # a real picture of the page
        gate.release(middle)
        page.wait_for_function("() => document.body.dataset.state === 'done'", timeout=60_000)
    finally:
        gate.remove()

    assert page.inner_text("#answer") == expected
    assert page.locator("#log .msg.assistant .text").last.inner_text() == expected
    stats = page.inner_text("#stats")
    assert f"{num_steps} steps" in stats and "tokens/s" in stats
    assert counts(page) == (24 - num_steps, num_steps)  # one token a step
    # Replay: back to before the first step with the keyboard, then forward again.
    slider = page.locator("#replay")
    assert slider.is_enabled() and slider.get_attribute("max") == str(num_steps)
    slider.focus()
    page.keyboard.press("Home")
    assert counts(page) == (24, 0) and page.inner_text("#replay-out") == f"step 0 of {num_steps}"
    page.keyboard.press("ArrowRight")
    assert counts(page) == (23, 1) and page.inner_text("#replay-out") == f"step 1 of {num_steps}"
    assert page.locator("#canvas .tok.newest").count() == 1
    page.keyboard.press("End")
    assert counts(page)[1] == num_steps

    # A second turn carries the history.
    second = "and the earth"
    expected2 = chat(live, [{"role": "user", "content": prompt}, {"role": "assistant", "content": expected},
                            {"role": "user", "content": second}], seed)
    page.fill("#prompt", second)
    page.click("#send")
    page.wait_for_function("() => document.body.dataset.state === 'done' && "
                           "document.querySelectorAll('#log .msg.assistant:not(.pending)').length === 2",
                           timeout=60_000)
    assert page.inner_text("#answer") == expected2
    assert page.locator("#log .msg").count() == 4

    # Phone width: nothing wider than the screen.
    page.set_viewport_size({"width": 375, "height": 740})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert errors == []
    page.close()


def test_errors_are_shown(live, browser):
    page = browser.new_page()
    page.goto(live.url + "/")
    page.fill("#max-tokens", "100000")
    page.fill("#steps", "")
    page.fill("#prompt", "hello")
    page.click("#send")
    page.wait_for_function("() => document.body.dataset.state === 'error'")
    assert "max_tokens" in page.inner_text("#error") and "exceeds" in page.inner_text("#error")
    assert page.locator("#log .msg.failed").count() == 1
    page.close()


def test_knobs_follow_the_servers_schema(live, browser):
    page = browser.new_page()
    page.goto(live.url + "/")
    remasking = httpx.get(live.url + "/openapi.json").json()["components"]["schemas"]["ChatCompletionRequest"][
        "properties"]["remasking"]["description"].split(" | ")
    page.wait_for_function(f"() => document.querySelectorAll('#remasking option').length === {len(remasking)}")
    assert page.eval_on_selector_all("#remasking option", "os => os.map(o => o.value)") == remasking
    assert page.locator("#threshold").is_hidden()
    page.select_option("#remasking", "threshold")
    assert page.locator("#threshold").is_visible() and page.locator("#factor").is_hidden()
    page.close()


def test_playground_shows_the_served_architecture_and_its_decoding(browser, tmp_path):
    """On an LLaDA2 checkpoint the page names the architecture and the
    family's decoding defaults, and its knobs start from them: a message
    sent untouched decodes as the API does by default."""
    from tests.family_checkpoints import write_family_checkpoint

    ck = write_family_checkpoint("llada2", tmp_path / "llada2")
    srv = start_server(ck.path, ServerConfig(default_max_tokens=16))
    try:
        page = browser.new_page()
        page.goto(srv.url + "/")
        page.wait_for_function("() => document.getElementById('model').textContent.includes('LLaDA2MoeModelLM')")
        text = page.text_content("#model")
        for part in ("llada2_moe", "llada2 decoding", "steps 32", "block 32", "remasking threshold_quota",
                     "threshold 0.95", f"mask id {ck.mask_id}", "max length 512"):
            assert part in text, (part, text)
        assert page.input_value("#remasking") == "threshold_quota" and page.input_value("#steps") == ""
        assert page.input_value("#block-length") == "32"
        page.fill("#max-tokens", "16")
        page.fill("#seed", "4")
        page.fill("#prompt", "the earth")
        page.click("#send")
        page.wait_for_function("() => document.body.dataset.state === 'done' && "
                               "document.querySelectorAll('#log .msg.assistant:not(.pending)').length === 1",
                               timeout=60_000)
        api = httpx.post(srv.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "the earth"}], "max_tokens": 16, "seed": 4,
            "temperature": 0}).json()
        assert api["choices"][0]["message"]["content"]
        assert page.locator("#log .msg.assistant .text").last.inner_text() == api["choices"][0]["message"]["content"]
        page.close()
    finally:
        srv.stop()


# -- the bundled demo model -----------------------------------------------------------
def reverse_words(prompt: str) -> str:
    return " ".join(reversed(prompt.removeprefix("reverse:").split()))


@pytest.fixture(scope="module")
def demo():
    """The server ``llada-serve`` runs with no arguments: the bundled demo model."""
    from server.__main__ import build_parser, bundled_model
    from server.api.launch import build_configs

    _, _, config = build_configs(build_parser().parse_args(["serve"]))
    assert config.bundled_demo and config.served_model_name == "llada-demo"
    srv = start_server(Path(bundled_model()), config)
    yield srv
    srv.stop()


def open_demo(demo, browser):
    page = browser.new_page(viewport={"width": 1100, "height": 860})
    page.goto(demo.url + "/")
    page.wait_for_function("() => document.querySelectorAll('#examples .example').length > 0")
    return page


def test_the_demo_says_what_it_is_and_its_examples_are_answered(demo, browser):
    card = httpx.get(demo.url + "/v1/models").json()["data"][0]
    assert card["bundled_demo"] is True and 3_000_000 < card["num_parameters"] < 4_000_000
    titles = [e["title"] for e in card["examples"]]
    assert titles == ["Reverse words", "Continue a verse"]  # from the model card's widget
    page = open_demo(demo, browser)
    note = page.inner_text("#demo-note")
    assert page.locator("#demo-note").is_visible()
    assert "3.3M-parameter demo" in note and "llada-demo" in note and "--model" in note
    # The knobs start from the model's own decoding, so a click decodes as the API does by default.
    assert page.input_value("#max-tokens") == str(card["decoding"]["max_tokens"])
    assert page.input_value("#block-length") == str(card["decoding"]["block_length"])
    buttons = page.locator("#examples .example")
    assert buttons.count() == 2
    reversal = card["examples"][0]["prompt"]
    buttons.nth(0).click()  # one click sends it
    page.wait_for_function("() => document.body.dataset.state === 'done'", timeout=60_000)
    assert page.locator("#log .msg.user .text").last.inner_text() == reversal
    assert page.inner_text("#answer") == reverse_words(reversal)  # the right answer, not just an answer
    buttons.nth(1).click()
    page.wait_for_function("() => document.body.dataset.state === 'done' && "
                           "document.querySelectorAll('#log .msg.assistant:not(.pending)').length === 2",
                           timeout=60_000)
    api = httpx.post(demo.url + "/v1/chat/completions", timeout=60, json={"messages": [
        {"role": "user", "content": reversal}, {"role": "assistant", "content": reverse_words(reversal)},
        {"role": "user", "content": card["examples"][1]["prompt"]}]}).json()
    verse = page.inner_text("#answer")
    assert verse == api["choices"][0]["message"]["content"] and len(verse.split()) >= 3
    page.set_viewport_size({"width": 375, "height": 740})  # the note and examples fit a phone
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.close()


HOLES = """() => {  // masked boxes before the last committed word: the canvas filling out of order
  const boxes = [...document.querySelectorAll('#canvas .tok')];
  const last = boxes.map((b) => b.classList.contains('committed') && !b.classList.contains('special')).lastIndexOf(true);
  return last < 0 ? 0 : boxes.slice(0, last).filter((b) => b.classList.contains('masked')).length;
}"""


def test_readme_pictures_are_of_the_demo_model(demo, browser, tmp_path):
    """With LLADA_UPDATE_SCREENSHOTS=1: click the reversal example on the
    demo model, photograph the page at every denoising step; the step where
    the most boxes are still masked before a committed word (the canvas
    filling out of order) is the README's picture, and the denoising panel
    at every step makes the animation. Otherwise: the pictures the README
    shows are there, a page and an animation of several frames."""
    readme = (REPO / "README.md").read_text()
    for image in (SCREENSHOT, ANIMATION):
        assert f"](docs/{image.name})" in readme
    if not UPDATE_SCREENSHOTS:
        assert SCREENSHOT.stat().st_size > 20_000 and apng.chunks(SCREENSHOT.read_bytes())[0][0] == b"IHDR"
        width, height, delays = apng.read_frames(ANIMATION)
        assert len(delays) >= 8 and width >= 300 and height >= 200
        assert ANIMATION.stat().st_size < 1_200_000
        return
    card = httpx.get(demo.url + "/v1/models").json()["data"][0]
    prompt = card["examples"][0]["prompt"]
    body = {"messages": [{"role": "user", "content": prompt}], "stream": True,
            "stream_options": {"include_denoising": True}}
    with httpx.stream("POST", demo.url + "/v1/chat/completions", json=body, timeout=60) as r:
        num_steps = sum(1 for line in r.iter_lines() if '"denoising.step"' in line)
    assert num_steps >= 8
    page = open_demo(demo, browser)
    gate = StepGate(demo.engine.engine, list(range(num_steps)))
    pages, frames, holes = [], [], []
    try:
        page.locator("#examples .example").nth(0).click()
        for k in range(num_steps):
            gate.wait(k)
            page.wait_for_function(f"() => document.querySelectorAll('#canvas .tok.committed').length === {k}")
            if k == 0:
                box = page.locator(".denoise").bounding_box()
                clip = {"x": box["x"], "y": box["y"], "width": box["width"], "height": box["height"] + 120}
            holes.append(page.evaluate(HOLES))
            pages.append(page.screenshot())
            frames.append(page.screenshot(clip=clip))
            gate.release(k)
        page.wait_for_function("() => document.body.dataset.state === 'done'", timeout=60_000)
    finally:
        gate.remove()
    assert page.inner_text("#answer") == reverse_words(prompt)
    frames.append(page.screenshot(clip=clip))
    best = max(range(len(holes)), key=lambda k: (holes[k], k))
    assert holes[best] >= 2, holes  # out of order: later positions committed before earlier ones
    SCREENSHOT.write_bytes(pages[best])
    apng.write_apng(ANIMATION, frames, [450] * (len(frames) - 1) + [2500])
    assert apng.read_frames(ANIMATION)[2] == [450] * (len(frames) - 1) + [2500]
    page.close()
