"""The web page at ``/`` in a real browser: headless Chromium (the OS's package, driven through its chromedriver
by selenium) uploads the astronaut, generates through the jobs API against the real local Ray Serve app, sees the
progress bar move before the job completes, and sees a result image load (presigned S3 URL or the API's image
route).

Skipped when selenium, Chromium or chromedriver is missing, unless ``INSTANTID_TEST_REQUIRE`` lists ``chromium``
(CI): then it fails. The screenshot goes to ``INSTANTID_SCREENSHOT`` when set, else into the test's tmp_path.
"""

from __future__ import annotations

import base64
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import astronaut_jpeg, skip_unless_required

pytestmark = pytest.mark.slow

STEPS = 10
PAGE_TIMEOUT_S = 420  # upload to loaded image; on tiny weights this takes seconds, the rest is a slow CI host

# Records, in DOM mutation order, every change of #progress's value attribute (with the value it replaced) and
# every insertion into #results, so that the test sees each step the page showed however fast they came.
RECORD_MUTATIONS = """
window.__mutations = [];
const progress = document.getElementById("progress");
const results = document.getElementById("results");
new MutationObserver((records) => {
  for (const record of records) {
    if (record.type === "attributes" && record.target === progress) {
      window.__mutations.push({ old: record.oldValue });
    } else if (record.type === "childList" && record.target === results && record.addedNodes.length) {
      window.__mutations.push({ results: record.addedNodes.length });
    }
  }
}).observe(document.body, {
  subtree: true, childList: true, attributes: true, attributeFilter: ["value"], attributeOldValue: true,
});
"""

PAGE_STATE = """
const images = [...document.querySelectorAll("#results img.result-image")];
return {
  error: document.getElementById("error").textContent.trim(),
  loaded: images.filter((img) => img.complete && img.naturalWidth > 0).length,
  mutations: window.__mutations,
  value: document.getElementById("progress").getAttribute("value"),
  max: document.getElementById("progress").max,
};
"""


@dataclass(frozen=True)
class Chromium:
    browser: str
    driver: str


@pytest.fixture(scope="session")
def chromium() -> Chromium:
    """Where headless Chromium and its chromedriver are (checked before the serve stack starts)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        skip_unless_required("chromium", "selenium is not installed (pip install -e '.[test]')")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        missing = " and ".join(name for name, path in (("chromium", browser), ("chromedriver", driver)) if not path)
        skip_unless_required("chromium", f"{missing} not found (apt-get install chromium chromium-driver)")
    return Chromium(browser, driver)


def start_browser(chromium: Chromium, width: int = 1280, height: int = 900) -> Any:
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = chromium.browser
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in CI containers
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromium.driver))


def progress_before_results(mutations: list[dict[str, Any]], final_value: str | None) -> list[float]:
    """The values #progress took before the first result was inserted (None, indeterminate, left out)."""
    changes = [i for i, m in enumerate(mutations) if "old" in m]
    first_result = next((i for i, m in enumerate(mutations) if "results" in m), len(mutations))
    values = []
    for n, index in enumerate(changes):
        new = mutations[changes[n + 1]]["old"] if n + 1 < len(changes) else final_value
        if index < first_result and new is not None:
            values.append(float(new))
    return values


def generate_through_page(driver: Any, url: str, photo: Path, timeout_s: float = PAGE_TIMEOUT_S) -> dict[str, Any]:
    """Fill the form (photo, prompt, STEPS steps), click Generate and wait for a result image to load.

    Returns the page's final state (see PAGE_STATE) with ``progress_seen``: the progress values before completion.
    """
    from selenium.webdriver.common.by import By

    driver.get(url)
    driver.execute_script(RECORD_MUTATIONS)
    driver.find_element(By.ID, "face_image").send_keys(str(photo))
    driver.find_element(By.ID, "prompt").send_keys("a portrait of an astronaut")
    steps = driver.find_element(By.ID, "num_inference_steps")
    driver.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input', {bubbles: true}));",
        steps,
        str(STEPS),
    )
    assert steps.get_attribute("value") == str(STEPS)
    driver.find_element(By.ID, "generate").click()

    deadline = time.monotonic() + timeout_s
    while True:
        state = driver.execute_script(PAGE_STATE)
        if state["error"]:
            pytest.fail(f"the page shows an error: {state['error']!r}")
        if state["loaded"]:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"no result image loaded within {timeout_s:.0f} s (progress {state['value']}/{state['max']})")
        time.sleep(0.2)
    state["progress_seen"] = progress_before_results(state["mutations"], state["value"])
    return state


def result_generation_id(driver: Any, timeout_s: float = PAGE_TIMEOUT_S) -> str:
    """Wait until a result image has loaded (failing on an error the page shows); the id of its generation, read
    from its download link."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout_s
    while not driver.execute_script(PAGE_STATE.replace("window.__mutations", "[]"))["loaded"]:
        error = driver.find_element(By.ID, "error").text
        assert not error, f"the page shows an error: {error!r}"
        assert time.monotonic() < deadline, "no result image loaded"
        time.sleep(0.2)
    route = driver.find_element(By.CSS_SELECTOR, "#results a.download").get_attribute("href")
    return route.split("/v1/generations/")[1].split("/")[0]


def script_errors(driver: Any) -> list[str]:
    """Console errors other than failed loads (a presigned URL may fail before the API route serves the image)."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and entry.get("source") != "network"
    ]


def save_full_page_screenshot(driver: Any, path: Path) -> None:
    """The whole page (not only the window), through the DevTools protocol."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 8000), "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


def test_the_page_generates_an_image_with_live_progress(chromium: Chromium, serve_stack, tmp_path: Path) -> None:
    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(astronaut_jpeg())
    driver = start_browser(chromium)
    try:
        state = generate_through_page(driver, f"{serve_stack.url}/", photo)

        seen = state["progress_seen"]
        assert any(0 < value < STEPS for value in seen), f"the bar showed no step before completion: {seen}"
        assert seen == sorted(seen), f"the progress bar went backwards: {seen}"
        assert state["max"] == STEPS, "the bar's maximum is the requested number of steps"
        assert driver.find_element("id", "error").text == ""
        card = driver.find_element("css selector", "#results .card").text
        assert "Seed " in card
        assert "Identity " in card or "No face found" in card, card
        assert script_errors(driver) == []

        screenshot = Path(os.environ.get("INSTANTID_SCREENSHOT") or tmp_path / "web-page.png")
        save_full_page_screenshot(driver, screenshot)
        assert screenshot.stat().st_size > 0
    finally:
        driver.quit()


def test_the_history_shows_a_made_picture_reuses_its_settings_and_deletes_it(
    chromium: Chromium, serve_stack, tmp_path: Path
) -> None:
    """After a generation the gallery lists it first (thumbnail, settings); "Use these settings" puts its prompt
    and seed back in the form; Delete removes it from the gallery and from the service."""
    import httpx
    from selenium.webdriver.common.by import By

    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(astronaut_jpeg())
    driver = start_browser(chromium)
    try:
        generate_through_page(driver, f"{serve_stack.url}/", photo)
        generation_id = result_generation_id(driver)
        selector = f'#history_list .entry[data-id="{generation_id}"]'
        deadline = time.monotonic() + 60
        while not driver.find_elements(By.CSS_SELECTOR, selector):
            assert time.monotonic() < deadline, "the history does not show the picture just made"
            time.sleep(0.2)
        first = driver.find_element(By.CSS_SELECTOR, selector)
        stored = httpx.get(f"{serve_stack.url}/v1/generations/{generation_id}", timeout=30).json()
        assert stored["parameters"]["prompt"] == "a portrait of an astronaut"
        thumb = first.find_element(By.CSS_SELECTOR, "img.thumb")
        deadline = time.monotonic() + 60
        while not driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", thumb):
            assert time.monotonic() < deadline, "the thumbnail did not load"
            time.sleep(0.2)

        for field in ("prompt", "seed"):  # the seed is in the folded advanced settings: emptied as a script would
            driver.execute_script("arguments[0].value = '';", driver.find_element(By.ID, field))
        first.find_element(By.XPATH, ".//button[text()='Use these settings']").click()
        assert driver.find_element(By.ID, "prompt").get_attribute("value") == "a portrait of an astronaut"
        assert driver.find_element(By.ID, "seed").get_attribute("value") == str(stored["parameters"]["seed"])
        assert driver.find_element(By.ID, "num_inference_steps").get_attribute("value") == str(STEPS)

        first.find_element(By.XPATH, ".//button[text()='Delete']").click()
        deadline = time.monotonic() + 30
        while driver.find_elements(By.CSS_SELECTOR, selector):
            assert time.monotonic() < deadline, "the deleted picture stayed in the gallery"
            time.sleep(0.2)
        assert httpx.get(f"{serve_stack.url}/v1/generations/{generation_id}", timeout=30).status_code == 404
        assert driver.find_element(By.ID, "error").text == ""
        assert script_errors(driver) == []
    finally:
        driver.quit()


def test_the_model_and_control_groups_give_the_image_the_client_gets(
    chromium: Chromium, serve_stack, tmp_path: Path
) -> None:
    """A fast mode, a LoRA with its scale and the canny ControlNet with its strength, chosen on the page from
    /v1/models: the stored image equals the one the Python client gets for the same request (within 2/255)."""
    import httpx
    import numpy as np
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from deployments.instantid.images import decode_image
    from serve.client import InstantIDClient
    from tests.support import stored_pixels

    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(astronaut_jpeg())
    driver = start_browser(chromium)
    try:
        driver.get(f"{serve_stack.url}/")
        deadline = time.monotonic() + 60
        while not driver.find_elements(By.ID, "lora_style-peft"):
            assert time.monotonic() < deadline, "the LoRA choices did not appear"
            time.sleep(0.2)
        driver.find_element(By.CSS_SELECTOR, "#how summary").click()
        Select(driver.find_element(By.ID, "mode")).select_by_value("lcm")
        driver.find_element(By.ID, "lora_style-peft").click()
        set_value = "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'));"
        driver.execute_script(set_value, driver.find_element(By.ID, "lora_style-peft_scale"), "0.8")
        driver.find_element(By.CSS_SELECTOR, "#control summary").click()
        driver.find_element(By.ID, "controlnet_canny").click()
        driver.execute_script(set_value, driver.find_element(By.ID, "controlnet_canny_strength"), "0.6")
        driver.find_element(By.ID, "face_image").send_keys(str(photo))
        driver.find_element(By.ID, "prompt").send_keys("a portrait of an astronaut")
        driver.find_element(By.ID, "generate").click()
        generation_id = result_generation_id(driver)
        assert script_errors(driver) == []
    finally:
        driver.quit()

    stored = httpx.get(f"{serve_stack.url}/v1/generations/{generation_id}", timeout=30).json()
    used = stored["parameters"]
    assert (used["mode"], used["scheduler"], used["num_inference_steps"]) == ("lcm", "lcm", 10)  # the preset's
    assert used["loras"] == [{"name": "style-peft", "scale": 0.8}]
    assert [(c["name"], c["strength"]) for c in used["controlnets"]] == [("canny", 0.6)]
    page_image = stored_pixels(serve_stack.s3.client(), stored["images"][0]["uri"])
    with InstantIDClient(serve_stack.url) as client:
        result = client.generate(
            face=photo,
            prompt="a portrait of an astronaut",
            mode="lcm",
            loras=[{"name": "style-peft", "scale": 0.8}],
            controlnets=[{"name": "canny", "strength": 0.6}],
            seed=used["seed"],
            output_format=used["output_format"],
        )
        client_image = decode_image(client.image(result.id))
    assert page_image.shape == client_image.shape
    assert np.abs(page_image.astype(int) - client_image.astype(int)).max() <= 2


def test_an_edit_with_a_brushed_mask_repaints_only_what_was_painted(
    chromium: Chromium, serve_stack, tmp_path: Path
) -> None:
    """The photo to edit appears under a brush; a stroke across its middle becomes the mask: the stored image is
    the photo, bit for bit, away from the stroke, and repainted on it."""
    import httpx
    import numpy as np
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from tests.support import astronaut_rgb, encode_image, stored_pixels

    photo, target = tmp_path / "astronaut.jpg", tmp_path / "target.png"
    photo.write_bytes(astronaut_jpeg())
    target.write_bytes(encode_image(astronaut_rgb(), "PNG"))
    driver = start_browser(chromium)
    try:
        driver.get(f"{serve_stack.url}/")
        driver.find_element(By.CSS_SELECTOR, "#edit summary").click()
        driver.find_element(By.ID, "target_image").send_keys(str(target))
        canvas = driver.find_element(By.ID, "brush_canvas")
        deadline = time.monotonic() + 30
        while not canvas.is_displayed() or canvas.size["width"] == 0:
            assert time.monotonic() < deadline, "the brush did not appear"
            time.sleep(0.2)
        width = canvas.size["width"]
        chain = ActionChains(driver).move_to_element_with_offset(canvas, -width // 4, 0).click_and_hold()
        for _ in range(10):  # a horizontal stroke across the middle half, in small moves
            chain.move_by_offset(width // 20, 0)
        chain.release().perform()
        driver.find_element(By.CSS_SELECTOR, "#advanced summary").click()
        steps = driver.find_element(By.ID, "num_inference_steps")
        driver.execute_script("arguments[0].value = '4'; arguments[0].dispatchEvent(new Event('input'));", steps)
        Select(driver.find_element(By.ID, "output_format")).select_by_value("png")  # lossless: pixels compared
        driver.find_element(By.ID, "face_image").send_keys(str(photo))
        driver.find_element(By.ID, "prompt").send_keys("an astronaut")
        driver.find_element(By.ID, "generate").click()
        generation_id = result_generation_id(driver)
    finally:
        driver.quit()
    stored = httpx.get(f"{serve_stack.url}/v1/generations/{generation_id}", timeout=30).json()
    image = stored_pixels(serve_stack.s3.client(), stored["images"][0]["uri"])
    original = astronaut_rgb()
    assert image.shape == original.shape
    changed = np.any(image != original, axis=-1)
    rows = np.nonzero(changed.any(axis=1))[0]
    assert changed[230:282, 160:352].mean() > 0.5, "the stroke across the middle was not repainted"
    assert rows.min() > 150 and rows.max() < 362, (
        f"pixels changed away from the stroke (rows {rows.min()}-{rows.max()})"
    )
    assert not changed[:, :60].any() and not changed[:, 452:].any()
