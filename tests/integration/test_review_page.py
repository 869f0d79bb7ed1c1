"""Issue 15, item 4, in a real browser: mosquitto, a real agent on the demo bundle, ``yugami-fleet serve`` as a
subprocess and Debian's headless Chromium through selenium. The page shows the agent's anomaly with its heat
map; "false alarm" sends cmd/feedback and the card shows the agent's feedback event.

``YUGAMI_SCREENSHOT=docs/img/review_page.png`` saves the README's screenshot of the page (unset in CI, so a
test run never rewrites a tracked file).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import ROOT, Recorder, base_config, free_port, wait_until, write_images

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DEMO_BUNDLE = ROOT / "models" / "demo"
DEVICE = "line1-cam"
PREFIX = "yugami"
SCREENSHOT_ENV = "YUGAMI_SCREENSHOT"


def anomalous_bundle(out: Path) -> Path:
    """The demo bundle with its threshold under every normal score it was calibrated on (held-out min 0.0051),
    so every frame is an anomaly: false alarms to review."""
    shutil.copytree(DEMO_BUNDLE, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["threshold"]["value"] = 0.004
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def part_frames() -> list[np.ndarray]:
    from demo.synthetic import defective_part, normal_part

    rng = np.random.default_rng(7)
    return [normal_part(rng, 256), defective_part(rng, 256, "scratch"), normal_part(rng, 256)]


class Server:
    """``yugami-fleet serve`` as a child process on a free port."""

    def __init__(self, broker_port: int, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fleet.cli", "serve", "--broker", f"127.0.0.1:{broker_port}",
                 "--prefix", PREFIX, "--port", str(self.port)],
                cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=f, stderr=subprocess.STDOUT)

    def state(self) -> dict | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"yugami-fleet serve exited with {self.proc.returncode}:\n{self.logs()}")
        try:
            with urllib.request.urlopen(f"{self.url}/api/state", timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            return None

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)


@pytest.fixture()
def browser() -> Iterator[object]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.skip(f"{' and '.join(missing)} missing: apt-get install chromium chromium-driver (.ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[dev]'")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # CI runs as root: Chromium's sandbox needs a user namespace it cannot get there; /dev/shm is small in containers.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def test_review_page_shows_a_real_anomaly_and_sends_a_false_alarm(tmp_path: Path, mosquitto, agents,
                                                                   browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    bundle = anomalous_bundle(tmp_path / "bundle")
    folder = tmp_path / "in"
    folder.mkdir()
    rec = Recorder(mosquitto.port, [f"{PREFIX}/{DEVICE}/cmd/#", f"{PREFIX}/{DEVICE}/event"])
    # The page listens before the agent starts: verdicts are live messages, not retained.
    server = Server(mosquitto.port, tmp_path / "serve.log")
    try:
        wait_until(lambda: (server.state() or {}).get("connected"), 30, "the review page and its broker link")
        agent = agents(base_config(tmp_path, bundle, mosquitto.port, str(folder), device=DEVICE))
        wait_until(lambda: any(b["device"] == DEVICE and b["online"] for b in (server.state() or {}).get("boxes", []))
                   or not agent.alive(), 90, "the agent online on the page")
        assert agent.alive(), agent.logs()
        write_images(folder, part_frames(), prefix="part")

        def all_with_heatmaps() -> list[dict]:
            cards = (server.state() or {}).get("anomalies", [])
            return cards if len(cards) == 3 and all(c["heatmap"] for c in cards) else []

        try:
            cards = wait_until(all_with_heatmaps, 90, "three anomaly cards with heat maps")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the page has {server.state()}\n{agent.logs()}") from None
        assert all(c["device"] == DEVICE and c["score"] > c["threshold"] for c in cards)

        browser.get(server.url)
        wait = WebDriverWait(browser, 60)
        newest = cards[0]["frame_id"]
        card_css = f'article.card[data-frame="{newest}"]'
        card = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, card_css)))
        image = card.find_element(By.CSS_SELECTOR, "img.heatmap")
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image))
        assert DEVICE in card.find_element(By.CSS_SELECTOR, ".device").text
        assert "threshold" in card.find_element(By.CSS_SELECTOR, ".numbers").text
        browser.find_element(By.CSS_SELECTOR, f'li.box[data-device="{DEVICE}"] svg.rate rect.bin.hot')

        card.find_element(By.CSS_SELECTOR, 'button[data-label="good"]').click()
        answer = wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, f'{card_css} li.answer[data-state="ok"], {card_css} li.answer[data-state="error"]')))
        assert answer.get_attribute("data-state") == "ok", answer.text
        event = wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, f'{card_css} li.event[data-event="feedback_added"]')))
        assert "good" in event.text

        # What went over the wire: cmd/feedback with label good for that frame, and the agent's event.
        sent = rec.wait_json(f"{PREFIX}/{DEVICE}/cmd/feedback", lambda b: b.get("frame_id") == newest)
        assert sent["label"] == "good" and sent["id"].startswith("review-")
        rec.wait_json(f"{PREFIX}/{DEVICE}/event",
                      lambda e: e.get("event") == "feedback_added" and e.get("frame_id") == newest)

        shot = os.environ.get(SCREENSHOT_ENV)
        if shot:
            wait.until(lambda d: d.execute_script(
                "return [...document.querySelectorAll('img.heatmap')].every(i => i.complete && i.naturalWidth > 0)"
                " && document.querySelectorAll('img.heatmap').length === 3"))
            Path(shot).parent.mkdir(parents=True, exist_ok=True)
            assert browser.save_screenshot(str(ROOT / shot if not Path(shot).is_absolute() else shot))
        assert agent.alive(), agent.logs()
    finally:
        rc = server.stop()
        rec.close()
    assert rc == 0, server.logs()


def test_review_page_takes_its_subscriptions_again_after_a_broker_restart(tmp_path: Path, mosquitto,
                                                                          agents) -> None:
    server = Server(mosquitto.port, tmp_path / "serve.log")
    try:
        wait_until(lambda: (server.state() or {}).get("connected"), 30, "the review page and its broker link")
        mosquitto.restart()  # a clean session: the subscriptions are gone with the old connection
        wait_until(lambda: (server.state() or {}).get("connects", 0) >= 2, 60,
                   "the page connected and subscribed again")
        folder = tmp_path / "in"
        agent = agents(base_config(tmp_path, anomalous_bundle(tmp_path / "bundle"), mosquitto.port, str(folder),
                                   device=DEVICE))
        write_images(folder, part_frames()[:1], prefix="part")

        def card() -> dict | None:
            return next((c for c in (server.state() or {}).get("anomalies", []) if c["heatmap"]), None)

        wait_until(lambda: card() or not agent.alive(), 90, "an anomaly with its heat map after the restart")
        assert agent.alive(), agent.logs()
    finally:
        rc = server.stop()
    assert rc == 0, server.logs()
