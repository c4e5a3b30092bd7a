"""`python -m pipeline preview`: the sheet shows what the pipeline changed and nothing else, the HTML page
renders every image in a real browser, and the quarantined rows are listed with their reasons."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import cli, dataset_rows
from PIL import Image

from mfpo.masks import decode_mask
from mfpo.publish.preview import RESAMPLE

pytestmark = pytest.mark.slow  # the CLI in subprocesses, Ray or model builds: not in `make test-fast`


@pytest.fixture(scope="module")
def run(published: tuple[Path, Path]) -> tuple[Path, Path]:
    return published


def _panel(sheet: Image.Image, box: list[int]) -> np.ndarray:
    x, y, w, h = box
    return np.asarray(sheet.crop((x, y, x + w, y + h)))


def test_sheet_has_a_row_per_sample_and_m_prime_differs_only_inside_the_mask(run):
    config, out = run
    proc = cli("preview", str(config), "--n", "5", "--seed", "3", check=True)
    folder = out / "preview"
    assert f"open {(folder / 'index.html').as_uri()}" in proc.stdout
    sheet = Image.open(folder / "sheet.png").convert("RGB")
    layout = json.loads((folder / "sheet.json").read_text())
    rows = {r["sample_id"]: r for r in dataset_rows(out)}
    assert len(layout["rows"]) == 5 and len({r["sample_id"] for r in layout["rows"]}) == 5
    assert sheet.height >= 5 * layout["panel_size"]
    changed_rows = 0
    for entry in layout["rows"]:
        row = rows[entry["sample_id"]]
        panels = entry["panels"]
        original, dispreferred = _panel(sheet, panels["original"]), _panel(sheet, panels["dispreferred"])
        w, h = panels["original"][2:]
        # The original panel is the original image, scaled.
        expected = np.asarray(row["images"][0].convert("RGB").resize((w, h), RESAMPLE))
        assert np.array_equal(original, expected)
        # m' differs from the original only where the scaled mask touches (float scaling: any footprint > 0).
        mask = decode_mask(row["mask"]).astype(np.float32)
        allowed = np.asarray(Image.fromarray(mask, mode="F").resize((w, h), RESAMPLE)) > 0
        differs = np.any(original != dispreferred, axis=-1)
        assert not np.any(differs & ~allowed), entry["sample_id"]
        changed_rows += int(differs.any())
    assert changed_rows == 5  # and inside, the noise is visible


def test_preview_is_deterministic_and_takes_its_options(run, tmp_path):
    config, _ = run
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        cli("preview", str(config), "--n", "3", "--seed", "7", "--size", "96", "--out", str(folder), check=True)
    for name in ("sheet.png", "sheet.json", "index.html", "mask_area.png", "boxes_per_image.png", "key_phrases.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    layout = json.loads((a / "sheet.json").read_text())
    assert layout["panel_size"] == 96 and len(layout["rows"]) == 3
    other = json.loads(
        (lambda d: (cli("preview", str(config), "--n", "3", "--seed", "8", "--out", str(d), check=True), d)[1])(
            tmp_path / "c"
        )
        .joinpath("sheet.json")
        .read_text()
    )
    assert [r["sample_id"] for r in other["rows"]] != [r["sample_id"] for r in layout["rows"]]
    bad = cli("preview", str(config), "--bucket", "hard")
    assert bad.returncode == 1 and "no `bucket` column" in bad.stderr and "Traceback" not in bad.stderr


def test_index_lists_samples_and_quarantined_rows(run):
    config, out = run
    cli("preview", str(config), "--n", "4", check=True)
    page = (out / "preview" / "index.html").read_text(encoding="utf-8")
    assert page.count('class="sample"') == 4
    assert (
        "<td>ingest</td><td>900</td><td>image: corrupt header" in page
        and "<td>perturb</td><td>901</td><td>no region" in page
    )
    assert "http://" not in page and "https://" not in page  # self-contained: nothing to fetch
    # Three panels per sample; a thumbnail for the row quarantined at perturb (its image is fine), none for the
    # corrupt file.
    assert page.count("data:image/") == 4 * 3 + 1


def _browser() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def test_index_renders_every_image_in_headless_chromium(run, tmp_path):
    found = _browser()
    if found is None:
        pytest.skip("no chromium + chromedriver on PATH (make test installs them where apt-get can)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import Select

    config, out = run
    cli("preview", str(config), "--n", "6", check=True)
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(found[1]), options=options)
    try:
        browser.get((out / "preview" / "index.html").as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);"
        )
        assert len(images) == 6 * 3 + 1
        assert all(done and w > 0 and h > 0 for done, w, h in images), images
        shot = tmp_path / "index.png"
        browser.save_screenshot(str(shot))
        # The first panel is drawn where the page says: the screenshot there is the photo, not a blank box.
        rect = browser.execute_script(
            "const r = document.images[0].getBoundingClientRect(); return [r.x, r.y, r.width, r.height];"
        )
        ratio = browser.execute_script("return window.devicePixelRatio;")
        x, y, w, h = (int(v * ratio) for v in rect)
        seen = np.asarray(Image.open(shot).convert("RGB").crop((x, y, x + w, y + h)), dtype=np.float32)
        assert seen.std() > 10  # a photo, not a flat placeholder
        # Filtering by text hides the other samples.
        question = browser.execute_script(
            "return [...document.querySelectorAll('.sample dt')].find(d => d.textContent === 'question')"
            ".nextElementSibling.textContent;"
        )
        browser.find_element("id", "search").send_keys(question)
        visible = browser.execute_script("return document.querySelectorAll('.sample:not(.hidden)').length;")
        assert visible == 1
        Select(browser.find_element("id", "sort")).select_by_value("id")
        assert browser.execute_script("return document.getElementById('count').textContent;") == f"{visible} shown"
    finally:
        browser.quit()
    if os.environ.get("MFPO_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["MFPO_KEEP_SCREENSHOT"])
