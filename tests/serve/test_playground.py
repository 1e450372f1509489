"""The playground page (serve/web/) in a real Chromium against real servers: what a person sees is what
the APIs say. Generate's text and colours equal gRPC Generate's text and logprobs; Stop frees the stream
on the server; the seed lesson's page shows 'ihello' over a 6 x 5 heatmap of the model's own values; the
neuron view shades the text; errors are words on the page. No test sees a console error or a request
to another origin (tests/browser.py has the browser and where screenshots go).
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser import DESKTOP, PHONE, launch, screenshots, sync_playwright
from live import LiveServer, post, scrape, serve_model
from support import strip_hidden

from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb

PROMPT = "it was the "


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def text_live(text_model: Path) -> Iterator[LiveServer]:
    """Long generations allowed (for Stop), and the metrics endpoint (for charrnn_active_streams). The
    model is the suite's tiny one, or $CHARRNN_PLAYGROUND_MODEL (`make screenshots`: the demo model, so
    that the pictures show text a person can read)."""
    model = Path(os.environ.get("CHARRNN_PLAYGROUND_MODEL") or text_model)
    yield from serve_model(model, max_chars=100_000, metrics_port=0)


class Page:
    """A page on one server, recording console errors and every request it makes."""

    def __init__(self, browser: Any, server: LiveServer, viewport: dict[str, int] = DESKTOP) -> None:
        self.server = server
        self.context = browser.new_context(viewport=viewport)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def open(self, view: str = "generate") -> Any:
        self.page.goto(f"{self.server.http_url}/#{view}")
        return self.page

    def by(self, testid: str) -> Any:
        return self.page.get_by_test_id(testid)

    def status(self, begins: str, timeout: float = 30_000) -> None:
        """Waits until the status line begins with `begins`."""
        from playwright.sync_api import expect  # imported late: without playwright the module still skips
        expect(self.by("status")).to_have_text(re.compile("^" + re.escape(begins)), timeout=timeout)

    def shoot(self, name: str) -> Path:
        path = screenshots() / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def check_clean(self, allowed: tuple[str, ...] = ()) -> None:
        """No console errors (but those `allowed` name), no request leaving the server's origin."""
        errors = [e for e in self.errors if not any(a in e for a in allowed)]
        assert not errors, errors
        origin = self.server.http_url + "/"
        assert self.requests and all(u.startswith((origin, "data:")) for u in self.requests), \
            self.requests

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def pages(browser) -> Iterator[Any]:
    opened: list[Page] = []

    def make(server: LiveServer, viewport: dict[str, int] = DESKTOP) -> Page:
        opened.append(Page(browser, server, viewport))
        return opened[-1]

    yield make
    for page in opened:
        page.close()


def api_trace(server: LiveServer, text: str) -> np.ndarray:
    status, _, raw = post(server, "/v1/trace", {"text": text})
    assert status == 200, raw
    hidden = json.loads(raw)["hidden"]
    return np.frombuffer(base64.b64decode(hidden["data"]), dtype="<f4").reshape(hidden["shape"])


def test_generate_streams_the_same_text_and_probabilities_as_grpc(pages, text_live):
    p = pages(text_live)
    p.open()
    p.by("prompt").fill(PROMPT)
    p.by("seed").fill("7")
    p.by("temperature").fill("0.9")
    p.by("max-chars").fill("120")
    p.by("generate").click()
    p.status("Done")
    chars = p.by("output").get_by_test_id("char")
    got = chars.evaluate_all("els => els.map(e => [e.textContent, Number(e.dataset.p)])")
    want = list(text_live.stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_chars=120, temperature=0.9, seed=7),
                                        timeout=60))
    assert "".join(c for c, _ in got) == "".join(r.text for r in want)
    for (_, shown), r in zip(got, want, strict=True):
        assert math.isclose(shown, math.exp(r.logprob), rel_tol=1e-5), (shown, r.logprob)
    colours = chars.evaluate_all("els => new Set(els.map(e => e.style.backgroundColor)).size")
    assert colours > 1  # coloured by probability, not all alike

    fifth = chars.nth(5)
    fifth.hover()
    box = p.by("alternatives")
    box.wait_for(state="visible")
    alternatives = box.get_by_test_id("alternative").evaluate_all(
        "els => els.map(e => [e.dataset.char, Number(e.dataset.p)])")
    assert 5 <= len(alternatives) <= 6  # the top 5, and the chosen one where it is not among them
    assert [q for _, q in alternatives] == sorted((q for _, q in alternatives), reverse=True)
    chosen = dict(alternatives)[got[5][0]]
    assert math.isclose(chosen, got[5][1], rel_tol=1e-6)
    p.shoot("playground-generate")

    # the neuron view shades the whole text: the prompt and what was generated
    p.by("view-neurons").click()
    p.by("neurons-trace").click()
    activations = p.by("activation")
    activations.nth(len(PROMPT) + 119).wait_for()
    assert "".join(activations.all_text_contents()) == PROMPT + "".join(c for c, _ in got)
    assert activations.nth(0).get_attribute("data-value") is not None
    p.shoot("playground-neurons-text")
    p.check_clean()


def test_stop_ends_the_stream_on_the_page_and_the_server(pages, text_live):
    p = pages(text_live)
    page = p.open()
    p.by("prompt").fill(PROMPT)
    p.by("max-chars").fill("100000")
    p.by("generate").click()
    chars = p.by("output").get_by_test_id("char")
    chars.nth(50).wait_for()
    assert scrape(text_live)[("charrnn_active_streams", ())] >= 1
    p.by("stop").click()
    p.status("Stopped")
    stopped = chars.count()
    assert stopped < 100_000
    deadline = time.monotonic() + 10
    while scrape(text_live)[("charrnn_active_streams", ())] != 0:
        assert time.monotonic() < deadline, "the server still holds the stream 10 s after Stop"
        time.sleep(0.05)
    page.wait_for_timeout(300)
    assert chars.count() == stopped  # nothing more arrives
    assert p.by("generate").is_enabled() and not p.by("stop").is_enabled()
    assert not p.by("error").is_visible()
    p.check_clean()


def test_the_lesson_shows_ihello_and_the_hidden_state(pages, hihell_server):
    for viewport, name in ((DESKTOP, "playground-lesson"), (PHONE, "playground-lesson-phone")):
        p = pages(hihell_server, viewport)
        p.open("lesson")
        p.by("prompt").fill("hihell")
        p.by("trace").click()
        cells = p.by("heatmap").get_by_test_id("cell")
        cells.nth(29).wait_for()
        assert cells.count() == 30  # 6 characters x 5 units of the one layer
        nexts = p.by("next").evaluate_all("els => els.map(e => e.querySelector('.c').textContent)")
        assert "".join(nexts) == "ihello"
        values = cells.evaluate_all("els => els.map(e => [Number(e.dataset.char), Number(e.dataset.unit), "
                                    "Number(e.dataset.value)])")
        hidden = api_trace(hihell_server, "hihell")
        for t, unit, value in values:
            assert np.float32(value) == hidden[t, 0, unit], (t, unit)  # the model's float32, not rounded
        p.shoot(name)
        p.check_clean()


def test_the_neuron_view_shades_the_text_by_one_unit(pages, hihell_server):
    p = pages(hihell_server)
    p.open("neurons")
    p.by("prompt").fill("hihell")
    p.by("neurons-trace").click()
    activations = p.by("activation")
    activations.nth(5).wait_for()
    assert activations.count() == 6
    units = p.by("units").locator("option")
    assert units.count() == 5
    hidden = api_trace(hihell_server, "hihell")[:, 0, :]
    order = [int(v) for v in units.evaluate_all("els => els.map(e => e.value)")]
    spread = hidden.astype(np.float64).var(axis=0)  # in double precision, as the page computes it
    assert order[0] == int(np.argmax(spread)) and sorted(spread[order].tolist(), reverse=True) == spread[order].tolist()
    for unit in (order[0], order[-1]):
        p.by("units").select_option(str(unit))
        shades = activations.evaluate_all("els => els.map(e => [Number(e.dataset.value), e.style.backgroundColor])")
        assert [np.float32(v) for v, _ in shades] == hidden[:, unit].tolist()
        assert all(colour for _, colour in shades)
    p.shoot("playground-neurons")
    p.check_clean()


def test_the_model_card_and_phone_width(pages, text_live):
    info = text_live.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    p = pages(text_live, PHONE)
    p.open("model")
    card = p.by("model-card")
    card.get_by_text(info.model_sha256).wait_for()
    assert info.cell in card.inner_text() and info.val_loss in card.inner_text()
    p.shoot("playground-model-phone")
    p.by("view-generate").click()
    p.by("prompt").fill(PROMPT)
    p.by("seed").fill("3")
    p.by("max-chars").fill("200")
    p.by("generate").click()
    p.status("Done")
    p.by("output").get_by_test_id("char").nth(3).click()  # a tap shows the alternatives
    p.by("alternatives").wait_for(state="visible")
    width = p.page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], "the page scrolls sideways on a phone"
    p.shoot("playground-generate-phone")
    p.check_clean()


def test_errors_are_words_on_the_page(pages, hihell_model):
    for server in serve_model(hihell_model, auth_token="s3cret"):
        p = pages(server)
        p.open("model")
        error = p.by("error")
        error.wait_for(state="visible")
        assert "needs a token" in error.inner_text() and "401" in error.inner_text()
        p.by("token").fill("s3cret")
        p.by("token").dispatch_event("change")
        p.by("model-card").get_by_text("rnn").first.wait_for()
        assert not error.is_visible()
        p.by("view-generate").click()
        p.by("prompt").fill("hi€")
        p.by("generate").click()
        error.wait_for(state="visible")
        assert "outside the model's vocabulary: '€'" in error.inner_text()
        p.check_clean(allowed=("status of 401", "status of 400"))  # the browser's own note of each refusal


def test_a_server_that_went_away_is_said_in_words(pages, hihell_model):
    servers = serve_model(hihell_model)
    server = next(servers)
    p = pages(server)
    p.open("model")
    p.by("model-card").get_by_text("rnn").first.wait_for()
    servers.close()  # the server stops; the page stays open
    p.by("view-generate").click()
    p.by("generate").click()
    error = p.by("error")
    error.wait_for(state="visible")
    assert "Cannot reach the server" in error.inner_text() and "is it running?" in error.inner_text()
    p.check_clean(allowed=("ERR_CONNECTION_REFUSED", "Failed to load resource"))


def test_a_model_without_hidden_says_to_export_again(pages, hihell_model, tmp_path):
    for server in serve_model(strip_hidden(hihell_model, tmp_path / "old.onnx")):
        p = pages(server)
        p.open("lesson")
        p.by("prompt").fill("hihell")
        p.by("trace").click()
        error = p.by("error")
        error.wait_for(state="visible")
        assert "export it again" in error.inner_text()
        assert p.by("heatmap").count() == 0
        p.by("view-model").click()
        assert "export the model again" in p.by("model-card").inner_text()
        p.by("view-generate").click()
        p.by("max-chars").fill("6")
        p.by("seed").fill("1")
        p.by("generate").click()  # Generate still works on such a file
        p.status("Done")
        assert p.by("output").get_by_test_id("char").count() == 6
        p.check_clean()


def test_large_models_show_the_units_that_vary_most_and_more_on_request(pages, text_live, text_model):
    """2 layers x 32 units = 64 rows; the page shows the 48 that vary most until asked for more."""
    text = "it was the best of times"
    p = pages(text_live)
    p.open("lesson")
    p.by("prompt").fill(text)
    p.by("trace").click()
    cells = p.by("heatmap").get_by_test_id("cell")
    cells.nth(48 * len(text) - 1).wait_for()
    assert cells.count() == 48 * len(text)
    hidden = api_trace(text_live, text).reshape(len(text), -1).astype(np.float64)  # as JavaScript's numbers
    shown = sorted(set(cells.evaluate_all("els => els.map(e => Number(e.dataset.unit))")))
    assert shown == sorted(np.argsort(-hidden.var(axis=0), kind="stable")[:48].tolist())
    p.by("heatmap-units").fill("64")
    p.by("heatmap-units").dispatch_event("change")
    cells.nth(64 * len(text) - 1).wait_for()
    assert cells.count() == 64 * len(text)
    p.check_clean()


def test_units_most_active_in_a_selected_span(pages, hihell_server):
    p = pages(hihell_server)
    p.open("neurons")
    p.by("prompt").fill("hihell")
    p.by("neurons-trace").click()
    p.by("activation").nth(5).wait_for()
    p.page.evaluate("""() => {
        const spans = document.querySelectorAll('[data-testid=activation]');
        const range = document.createRange();
        range.setStartBefore(spans[2]);
        range.setEndAfter(spans[3]);
        getSelection().removeAllRanges();
        getSelection().addRange(range);
    }""")
    p.by("units-in-selection").click()
    labels = p.by("units").locator("option").all_text_contents()
    assert all("Δ" in label for label in labels)
    hidden = api_trace(hihell_server, "hihell")[:, 0, :]
    inside = hidden[2:4].mean(axis=0) - np.concatenate([hidden[:2], hidden[4:]]).mean(axis=0)
    order = [int(v) for v in p.by("units").locator("option").evaluate_all("els => els.map(e => e.value)")]
    assert order[0] == int(np.argmax(np.abs(inside)))
    p.check_clean()


def test_a_busy_server_is_said_in_words(pages, text_model):
    """--max-streams 1: while the page's Generate holds the one slot, a trace is refused with 429."""
    for server in serve_model(text_model, max_chars=100_000, max_streams=1):
        p = pages(server)
        p.open()
        p.by("prompt").fill(PROMPT)
        p.by("max-chars").fill("100000")
        p.by("generate").click()
        p.by("output").get_by_test_id("char").nth(20).wait_for()
        p.by("view-lesson").click()
        p.by("trace").click()
        error = p.by("error")
        error.wait_for(state="visible")
        assert "busy (429" in error.inner_text()
        p.by("view-generate").click()
        p.by("stop").click()
        p.status("Stopped")
        p.check_clean(allowed=("status of 429",))
