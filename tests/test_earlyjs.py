"""The early script's middleware: the page's HTML gets it first thing in <head>; nothing
else the app serves changes."""
from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from rpo_app.ui.earlyjs import FRAME_LOOP_JS, TRACKER_MODULE, EarlyScript

PAGE = "<!doctype html><html><head><title>t</title></head><body><head>not this</head></body></html>"


def _client() -> TestClient:
    async def page(request):
        return HTMLResponse(PAGE)

    async def api(request):
        return JSONResponse({"html": "<head>"})

    app = Starlette(routes=[Route("/", page, methods=["GET", "POST"]), Route("/api", api)])
    return TestClient(EarlyScript(app))


def test_the_page_gets_the_script_first_in_its_head():
    response = _client().get("/")
    assert response.status_code == 200
    assert response.text.startswith("<!doctype html><html><head>" + FRAME_LOOP_JS + "<title>")
    assert response.text.count(FRAME_LOOP_JS) == 1  # the first <head> only
    assert int(response.headers["content-length"]) == len(response.content)


def test_everything_else_passes_untouched():
    client = _client()
    assert client.get("/api").json() == {"html": "<head>"}
    assert client.post("/").text == PAGE
    assert client.get("/?__theme=dark").text.count(FRAME_LOOP_JS) == 1  # a query is the page


def test_the_installed_gradio_still_has_the_tracker_module_the_script_looks_for():
    """The script slows the frame requests whose caller is Gradio's status tracker module;
    a Gradio that renamed it would leave the 60-frames-a-second loop running unnoticed."""
    import gradio

    assets = Path(gradio.__file__).parent / "templates" / "frontend" / "assets"
    assert any(TRACKER_MODULE in "/" + p.name for p in assets.glob("*.js"))
