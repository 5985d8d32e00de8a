"""End to end in headless Chromium: a scripted rater answers three comparisons, the export holds them."""

from __future__ import annotations

import csv
import io
import shutil
import sqlite3
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from userstudy import CRITERION_KEYS, CSV_COLUMNS
from userstudy.build import build_site, load_side
from userstudy.server import StudyConfig, make_study_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TOKEN = "browser-token"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file() or shutil.which(str(CHROMEDRIVER)) is None,
                       reason="needs Debian's chromium and chromium-driver "
                              "(apt-get install -y chromium chromium-driver)"),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PROMPTS = ("a panda dancing", "a goat drinking beer", "a space shuttle launching")
# Which method the scripted rater votes for, per prompt and criterion (AQ, SQ, MQ, TA, Overall).
PLAN = {
    "a panda dancing": ("ours", "ours", "base", "ours", "ours"),
    "a goat drinking beer": ("base", "ours", "base", "base", "ours"),
    "a space shuttle launching": ("ours", "base", "ours", "base", "base"),
}


def write_video(path: Path, seed: int) -> None:
    """A tiny H.264 mp4 (8 frames, 64x64) with a moving bar, distinct per seed."""
    import imageio.v2 as iio

    rng = np.random.default_rng(seed)
    colour = rng.integers(40, 220, size=3, dtype=np.uint8)
    frames = np.empty((8, 64, 64, 3), dtype=np.uint8)
    frames[:] = colour
    for t in range(8):
        frames[t, :, t * 8:(t + 1) * 8] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.mimwrite(path, frames, fps=8, macro_block_size=16)


@pytest.fixture()
def live(tmp_path: Path) -> Iterator[dict]:
    for i, prompt in enumerate(PROMPTS):
        write_video(tmp_path / "ours" / f"{prompt.replace(' ', '_')}.mp4", 10 + i)
        write_video(tmp_path / "base" / f"{prompt.capitalize().replace(' ', '_')}.mp4", 20 + i)
    manifest = build_site(load_side(tmp_path / "ours"), [load_side(tmp_path / "base")], tmp_path / "site",
                          seed=2)
    db = tmp_path / "answers.sqlite"
    server = make_study_server(StudyConfig(site=tmp_path / "site", db=db, export_token=TOKEN, secret_key="k"),
                               "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"http://127.0.0.1:{server.server_port}", "db": db, "manifest": manifest}
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture()
def driver() -> Iterator[webdriver.Chrome]:
    profile = tempfile.mkdtemp(prefix="userstudy-chromium-")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 f"--user-data-dir={profile}", "--window-size=1280,1100"):
        options.add_argument(flag)
    drv = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    drv.set_page_load_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def answer_page(drv: webdriver.Chrome, choices: dict[str, str]) -> None:
    for key, side in choices.items():
        drv.find_element(By.CSS_SELECTOR, f'input[name="{key}"][value="{side}"]').click()


def submit_and_wait(drv: webdriver.Chrome, wait: WebDriverWait, next_page: str) -> None:
    drv.find_element(By.ID, "submit").click()
    wait.until(ec.url_contains(next_page))


def test_scripted_rater_answers_three_comparisons(live: dict, driver: webdriver.Chrome) -> None:
    wait = WebDriverWait(driver, 30)
    comps = live["manifest"]["comparisons"]
    assert len(comps) == 3
    driver.get(live["url"] + "/")
    assert "Appearance Quality" in driver.page_source

    # Consent is required before starting.
    driver.find_element(By.ID, "start").click()
    error = driver.find_element(By.ID, "consent-error")
    assert error.is_displayed() and "consent" in error.text
    driver.find_element(By.ID, "consent").click()
    driver.find_element(By.ID, "participant-code").send_keys("browser_rater")
    driver.find_element(By.ID, "start").click()
    ids = list(comps)
    wait.until(ec.url_contains(comps[ids[0]]["page"]))

    expected: dict[tuple[str, str], str] = {}
    for n, cid in enumerate(ids, start=1):
        comp = comps[cid]
        assert driver.find_element(By.ID, "prompt-text").text == comp["prompt"]
        assert f"Comparison {n} of 3" in driver.find_element(By.CLASS_NAME, "progress-text").text
        # Both videos decode and play (muted autoplay) in this browser.
        for side in ("left", "right"):
            wait.until(lambda d, s=side: d.execute_script(
                f"const v = document.getElementById('video-{s}');"
                "return v.readyState >= 2 && v.videoWidth > 0;"))
        attrs = driver.execute_script(
            "const v = document.getElementById('video-left');"
            "return [v.muted, v.loop, v.autoplay, v.playsInline, v.src];")
        assert attrs[:4] == [True, True, True, True] and attrs[4].endswith(comp["left"]["video"])

        # An incomplete page is refused in the browser and nothing reaches the database.
        answer_page(driver, {"AQ": "left"})
        driver.find_element(By.ID, "submit").click()
        form_error = driver.find_element(By.ID, "form-error")
        wait.until(lambda d, e=form_error: e.is_displayed())
        assert "Please answer" in form_error.text
        with sqlite3.connect(live["db"]) as conn:
            stored = conn.execute("SELECT COUNT(*) FROM answers WHERE comparison_id = ?", (cid,)).fetchone()
        assert stored[0] == 0

        # Vote for the planned method on each criterion: find which side it is on from the manifest.
        ours_side = "left" if comp["left"]["method"] == "ours" else "right"
        base_side = "right" if ours_side == "left" else "left"
        choices = {}
        for key, who in zip(CRITERION_KEYS, PLAN[comp["prompt"]], strict=True):
            choices[key] = ours_side if who == "ours" else base_side
            expected[(cid, key)] = who
        answer_page(driver, choices)
        submit_and_wait(driver, wait, comps[ids[n]]["page"] if n < 3 else "done.html")

    assert "Thank you" in driver.find_element(By.ID, "thanks").text
    assert driver.find_element(By.ID, "rater-code").text == "browser_rater"

    # Go back to the last comparison: the earlier answers are restored; change one and resubmit.
    driver.get(live["url"] + "/" + comps[ids[-1]]["page"])
    checked = driver.execute_script(
        "return Array.from(document.querySelectorAll('input:checked')).map(i => i.name + '=' + i.value);")
    assert len(checked) == 5
    last = comps[ids[-1]]
    flip_to = "right" if driver.find_element(By.CSS_SELECTOR, 'input[name="MQ"]:checked').get_attribute(
        "value") == "left" else "left"
    driver.find_element(By.CSS_SELECTOR, f'input[name="MQ"][value="{flip_to}"]').click()
    submit_and_wait(driver, wait, "done.html")
    expected[(ids[-1], "MQ")] = "ours" if last[flip_to]["method"] == "ours" else "base"

    with urllib.request.urlopen(f"{live['url']}/export.csv?token={TOKEN}", timeout=10) as resp:
        table = list(csv.DictReader(io.StringIO(resp.read().decode())))
    assert len(table) == 15
    assert list(table[0]) == list(CSV_COLUMNS)
    got = {}
    for row in table:
        assert row["rater_id"] == "browser_rater"
        comp = comps[row["comparison_id"]]
        assert (row["prompt"], row["left_method"], row["right_method"]) == (
            comp["prompt"], comp["left"]["method"], comp["right"]["method"])
        got[(row["comparison_id"], row["criterion"])] = row[f"{row['choice']}_method"]
    assert got == expected
