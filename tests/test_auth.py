"""--auth protects every page and API route, in a client and in a real browser, and the
login name is the annotator."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from apptools import chromium_browser, screenshot, seed_store, start_app
from rpo_app.netutil import gradio_client
from rpo_app.store import Store

pytestmark = pytest.mark.slow

# Every kind of route Gradio serves: the page, its config and API description, the queue
# and direct-call APIs, uploads, files, and the named endpoints of every tab.
ROUTES = [
    ("GET", "/"), ("GET", "/config"), ("GET", "/gradio_api/info"),
    ("GET", "/gradio_api/queue/data?session_hash=x"),
    ("POST", "/gradio_api/queue/join"), ("POST", "/gradio_api/upload"),
    ("GET", "/gradio_api/file=/etc/hostname"),
    *[(method, f"/gradio_api/{kind}/{name}") for name in (
        "next_item", "submit_judgment", "label_stats", "train_status", "train_start",
        "chat_send", "add_prompts", "export", "adapter_rename")
      for method, kind in (("POST", "call"), ("POST", "run"))],
]


def _status(url: str, method: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    body = json.dumps({"data": ["x", "paired"], "fn_index": 0, "session_hash": "x"}).encode()
    req = urllib.request.Request(url, data=body if method == "POST" else None, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with opener.open(req, timeout=10) as resp:  # noqa: S310 (localhost)
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def test_auth_refuses_strangers_everywhere_and_names_the_annotator(data_dir, tiny_model_dir):
    seed_store(data_dir, n_prompts=4, answers_per_prompt=2)
    app = start_app(data_dir, extra_args=("--model", str(tiny_model_dir), "--auth", "ada:s3cret"))
    try:
        open_routes = {f"{m} {r}": s for m, r in ROUTES
                       if (s := _status(app.url + r, m)) not in (401, 403)}
        # "/" answers 200 with the login page, never the app; everything else refuses.
        assert set(open_routes) <= {"GET /"}, open_routes
        with pytest.raises(Exception, match="(?i)login|credentials|auth"):
            gradio_client(app.url)
        with pytest.raises(Exception):
            gradio_client(app.url, auth=("ada", "wrong"))

        with chromium_browser() as browser:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(app.url, timeout=60_000)
            page.get_by_text("Login").first.wait_for(timeout=30_000)
            assert page.locator("#annotator-name").count() == 0  # the app is not rendered
            page.locator("input[type=text], input[name=username]").first.fill("ada")
            page.locator("input[type=password]").first.fill("wrong")
            page.locator("button", has_text="Login").first.click()
            page.get_by_text("Incorrect").first.wait_for(timeout=30_000)
            assert page.locator("#annotator-name").count() == 0
            screenshot(page, "auth-refused.png")
            page.locator("input[type=text], input[name=username]").first.fill("ada")
            page.locator("input[type=password]").first.fill("s3cret")
            page.locator("button", has_text="Login").first.click()
            page.locator("#annotator-name").wait_for(timeout=60_000)

        client = gradio_client(app.url, auth=("ada", "s3cret"))
        item = client.predict("mallory", "paired", api_name="/next_item")
        assert item["kind"] == "paired"
        out = client.predict(item["token"], "left", "mallory", "", -1.0,
                             api_name="/submit_judgment")
        assert out["created"]
    finally:
        app.stop()
    judgments = Store(data_dir).judgments()
    assert [j["annotator"] for j in judgments] == ["ada"]
