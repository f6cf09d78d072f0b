"""The Swagger UI at ``/``, driven in headless Chromium (Debian's ``chromium``, installed
by ``make browser-deps``) as a person would: its header names the service and its
version, with no broken image, and the page asks no other host for anything; it
documents ``predict`` with its example answer and the TF Serving routes; uploading
``cat.jpg`` there, as the preselected ``image/jpeg``, shows the in-process label."""

from __future__ import annotations

import json
import typing as t
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import CAT_JPEG

if t.TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.servers, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PREDICT = "#operations-Service_APIs-inception_v3__predict"
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def outside_requests() -> list[str]:
    """What the page asked of hosts other than the server (refused: nothing leaves this machine)."""
    return []


@pytest.fixture(scope="module")
def page(http_address: str, tmp_path_factory: pytest.TempPathFactory, outside_requests: list[str]) -> Iterator[Page]:
    from playwright.sync_api import Route, sync_playwright

    assert CHROMIUM.exists(), "no /usr/bin/chromium: run `make browser-deps`"
    host = urlsplit(f"http://{http_address}").hostname

    def local_only(route: Route) -> None:
        if urlsplit(route.request.url).hostname == host:
            route.continue_()
        else:
            outside_requests.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            user_data_dir=tmp_path_factory.mktemp("chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_FLAGS,
        )
        try:
            context.set_default_timeout(TIMEOUT_MS)
            context.route("**/*", local_only)
            page = context.new_page()
            page.goto(f"http://{http_address}/")
            page.locator(PREDICT).wait_for()
            yield page
        finally:
            context.close()


def test_header_names_the_service_and_its_version(page: Page, saved_model: str) -> None:
    info = page.locator(".information-container .info")
    assert "inception_v3" in info.locator(".title").inner_text()
    version = info.locator(".title .version").first.inner_text()
    assert saved_model in version and "None" not in version
    assert "ImageNet Inception v3" in info.inner_text()
    broken = page.evaluate("Array.from(document.images).filter(i => !i.complete || !i.naturalWidth).map(i => i.src)")
    assert broken == []


def test_the_page_asks_no_other_host(page: Page, outside_requests: list[str]) -> None:
    """BentoML's page loads Google Tag Manager, its description badges from outside hosts; neither is served here."""
    page.wait_for_load_state("networkidle")
    assert outside_requests == []


def test_tf_serving_routes_are_listed(page: Page) -> None:
    section = page.locator("#operations-tag-TensorFlow_Serving_REST").locator("xpath=..")
    assert "/v1/models/{model_name}:predict" in section.inner_text()


def test_predict_is_documented_with_its_example_answer(page: Page) -> None:
    operation = page.locator(PREDICT)
    operation.locator(".opblock-summary").click()
    operation.locator(".opblock-body").wait_for()  # the UI renders the opened operation after the click
    text = operation.inner_text()
    assert "Classify one image" in text
    assert "Siamese cat" in text  # the pydantic example of the answer, not an empty schema
    assert "top_k" in text  # the query parameter


def test_upload_shows_the_label(
    page: Page, reference_classify: Callable[..., dict], tmp_path_factory: pytest.TempPathFactory
) -> None:
    operation = page.locator(PREDICT)
    if not operation.locator("button.try-out__btn").is_visible():
        operation.locator(".opblock-summary").click()
    operation.locator("button.try-out__btn").click()
    assert operation.locator(".opblock-section-request-body select").input_value() == "image/jpeg"
    operation.locator("input[type=file]").set_input_files(str(CAT_JPEG))
    operation.locator("button.execute").click()
    status = operation.locator(".live-responses-table tr.response td.response-col_status")
    status.wait_for()
    body = operation.locator(".live-responses-table .response-col_description pre").first.inner_text()
    screenshot = tmp_path_factory.mktemp("swagger") / "predict.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"\nscreenshot: {screenshot}")
    assert status.inner_text().strip() == "200", body
    assert json.loads(body)["label"] == reference_classify(CAT_JPEG.read_bytes())["label"]
