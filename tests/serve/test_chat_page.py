"""The chat page at `/`, end to end in headless Chromium: type a message, see the streamed reply and
its speed, and send a second message within the same conversation.

Needs Debian's `chromium` and `chromium-driver` (apt-get install chromium chromium-driver); the
test skips, saying so, where they are absent. Selenium drives the system's driver: nothing is
downloaded.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from live import LiveServer
from tiny_llama import write_tiny_llama

from smallmighty.serve.server import load_service

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="headless Chromium not installed (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="slm-chromium-")
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory):
    folder = write_tiny_llama(tmp_path_factory.mktemp("page") / "tiny-llama")
    server = LiveServer(load_service(str(folder), precision="int8", max_batch=2))
    yield server
    server.close()


def test_chat_page_streams_replies_and_keeps_the_conversation(browser, live: LiveServer) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(live.url + "/")
    assert "tiny" in browser.find_element(By.ID, "model").text
    # Watch the reply grow: record every text the assistant turn shows while it streams.
    browser.execute_script("""
        window.seen = [];
        new MutationObserver(() => {
          const turns = document.querySelectorAll('.assistant');
          if (turns.length) window.seen.push(turns[turns.length - 1].textContent);
        }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
        window.sent = [];
        const send = window.fetch;
        window.fetch = (url, options) => { window.sent.push(JSON.parse(options.body)); return send(url, options); };
    """)
    browser.find_element(By.TAG_NAME, "summary").click()  # open the settings
    browser.find_element(By.ID, "max_tokens").clear()
    browser.find_element(By.ID, "max_tokens").send_keys("40")
    box = browser.find_element(By.ID, "message")
    box.send_keys("Hello there! What is the capital of France?", Keys.ENTER)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "tokens/s" in d.find_element(By.ID, "status").text
               and "first token" in d.find_element(By.ID, "status").text)
    # textContent, not .text: Selenium's .text folds whitespace, and a random tiny model emits plenty.
    reply = browser.execute_script("const t = document.querySelectorAll('.assistant'); return t[t.length - 1].textContent")
    assert reply and "error" not in reply
    seen = [s for s in browser.execute_script("return window.seen") if s]
    assert len(set(seen)) > 2, "the reply should appear piece by piece"
    assert browser.execute_script("return history.length") == 2

    box.send_keys("And of Spain?", Keys.ENTER)
    wait.until(lambda d: d.execute_script("return history.length") == 4)
    users = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".user")]
    assert users == ["Hello there! What is the capital of France?", "And of Spain?"]
    # The second request carried the whole conversation.
    sent = browser.execute_script("return window.sent")
    assert [m["role"] for m in sent[1]["messages"]] == ["user", "assistant", "user"]
    assert sent[1]["messages"][1]["content"] == reply and sent[1]["stream"] is True
    status = browser.find_element(By.ID, "status").text
    assert "tokens in" in status and "tokens/s" in status
