"""--auth protects the page and the API, and the login name is the annotator."""
from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from apptools import seed_store, start_app
from rpo_app.store import Store

pytestmark = pytest.mark.slow


def test_auth_refuses_strangers_and_names_the_annotator(data_dir, tiny_model_dir):
    from gradio_client import Client

    seed_store(data_dir, n_prompts=4, answers_per_prompt=2)
    app = start_app(data_dir, extra_args=("--model", str(tiny_model_dir), "--auth", "ada:s3cret"))
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(app.url + "/config", timeout=10)  # noqa: S310 (localhost)
        assert refused.value.code == 401
        with pytest.raises(Exception, match="(?i)login|credentials|auth"):
            Client(app.url, verbose=False)
        with pytest.raises(Exception):
            Client(app.url, auth=("ada", "wrong"), verbose=False)

        client = Client(app.url, auth=("ada", "s3cret"), verbose=False)
        item = client.predict("mallory", "paired", api_name="/next_item")
        assert item["kind"] == "paired"
        out = client.predict(item["token"], "left", "mallory", "", -1.0,
                             api_name="/submit_judgment")
        assert out["created"]
    finally:
        app.stop()
    judgments = Store(data_dir).judgments()
    assert [j["annotator"] for j in judgments] == ["ada"]
