"""The web page and thumbnails: over real HTTP, and in a real browser (headless Chromium driven by
Selenium). The browser test skips only outside CI when Chromium is missing; `.ci/run` installs it."""
import io
import os
from pathlib import Path

import pytest
from PIL import Image

from indexing.ids import id_from_path
from tests.conftest import WRITE_TOKEN, result_grid
from tests.images import picture

AUTH = {"authorization": f"Bearer {WRITE_TOKEN}"}


@pytest.fixture(scope="module")
def indexed(corpus_dir):
    """(path, id) of an indexed photo of the test corpus."""
    root, _ = corpus_dir
    path = next(p for p in sorted(root.rglob("*.jpg")) if p.parent.name != "broken")
    return path, id_from_path(str(path.relative_to(root)))


def test_page_and_assets(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'data-max-k="1000"' in page.text and "{{" not in page.text  # the service's limits filled in
    for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css")):
        asset = client.get(f"/ui/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(ctype)
    for name in ("index.html", "..%2Fingress.py", "nope.js"):
        r = client.get(f"/ui/{name}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_thumbnail_is_a_small_cached_jpeg(client, indexed):
    _, id_ = indexed
    r = client.get(f"/images/{id_}/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(r.content)).size) == 256
    assert "max-age=" in r.headers["cache-control"] and r.headers["etag"]
    again = client.get(f"/images/{id_}/thumbnail", headers={"if-none-match": r.headers["etag"]})
    assert again.status_code == 304 and not again.content
    small = client.get(f"/images/{id_}/thumbnail", params={"size": 64})
    assert max(Image.open(io.BytesIO(small.content)).size) == 64 and small.headers["etag"] != r.headers["etag"]


@pytest.mark.parametrize("size", ["5", "4096", "big", "1.5"])
def test_thumbnail_size_is_bounded(client, indexed, size):
    r = client.get(f"/images/{indexed[1]}/thumbnail", params={"size": size})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_size"


def test_no_thumbnail_for_unknown_private_or_unsafe_images(client, indexed):
    _, id_ = indexed
    assert client.get("/images/12345/thumbnail").status_code == 404
    for flag in ("private", "unsafe"):
        assert client.patch(f"/images/{id_}", json={flag: True}, headers=AUTH).status_code == 200
        try:
            r = client.get(f"/images/{id_}/thumbnail", headers={"if-none-match": "*"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        finally:
            assert client.patch(f"/images/{id_}", json={flag: False}, headers=AUTH).status_code == 200
    assert client.get(f"/images/{id_}/thumbnail").status_code == 200


def test_thumbnails_are_read_only_from_allowed_folders_and_indexed_bytes(client, tmp_path):
    """A writer may name a uri under serve.uri_roots (here: every test folder), which the service
    then reads for a thumbnail; a file swapped after the write is not served, and a uri outside
    the allowed folders is refused at the write."""
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(picture(901))
    r = client.put("/images/901", content=outside.read_bytes(), params={"uri": str(outside)},
                   headers={**AUTH, "content-type": "image/jpeg"})
    assert r.status_code in (200, 201), r.text
    try:
        assert client.get("/images/901/thumbnail").status_code == 200
        outside.write_bytes(picture(902))
        r = client.get("/images/901/thumbnail?size=64")
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_thumbnail"
        r = client.put("/images/901", content=picture(901), params={"uri": "/etc/passwd"},
                       headers={**AUTH, "content-type": "image/jpeg"})
        assert r.status_code == 422 and "deployments allow" in r.json()["error"]["message"]
    finally:
        client.delete("/images/901", headers=AUTH)


# ---------------------------------------------------------------------- in a browser


def _screenshot(driver, name: str, tmp_path: Path) -> None:
    out = Path(os.environ.get("SCREENSHOT_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(out / f"{name}.png"))


def test_search_in_a_browser(service, browser, indexed, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    path, id_ = indexed
    wait = WebDriverWait(browser, 60)
    browser.get(service + "/")
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    assert browser.switch_to.active_element.get_attribute("id") == "file"  # the first stop for a keyboard

    browser.find_element(By.ID, "file").send_keys(str(path))
    wait.until(lambda d: result_grid(d)[0] and result_grid(d)[1])
    ids, _ = result_grid(browser)
    assert ids[0] == str(id_)  # the uploaded photo itself, its 63-bit id intact
    assert "result" in browser.find_element(By.ID, "status").text and " ms" in browser.find_element(By.ID, "status").text
    _screenshot(browser, "results", tmp_path)

    # "More like this": a click searches with that result's image, which then comes first.
    clicked = ids[1]
    browser.find_element(By.CSS_SELECTOR, f'#results button[data-id="{clicked}"]').click()
    wait.until(lambda d: result_grid(d)[0] and result_grid(d)[0][0] == clicked and result_grid(d)[1])
    _screenshot(browser, "more-like-this", tmp_path)

    # A phone-width screen: one narrow grid, nothing wider than the screen.
    browser.set_window_size(390, 844)
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    _screenshot(browser, "phone", tmp_path)
    browser.set_window_size(1280, 900)

    # Not an image: the API's own message is shown, and the grid is cleared.
    text = tmp_path / "notes.txt"
    text.write_text("this is not a photo\n")
    browser.find_element(By.ID, "file").send_keys(str(text))
    error = browser.find_element(By.ID, "error")
    wait.until(lambda d: error.is_displayed())
    assert "not a recognised image format" in error.text
    assert not result_grid(browser)[0]
    _screenshot(browser, "error", tmp_path)
