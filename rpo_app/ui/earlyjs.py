"""A script the page runs before Gradio's own, and the middleware that puts it there.

Gradio 6.31's status tracker (the elapsed-time counter beside a pending event) runs a
requestAnimationFrame loop while its event is pending, and one of its trackers never
leaves that state: every page of every Gradio app, a single Markdown included, draws 60
frames a second for as long as it is open. Measured with chromium on a 2-core Xeon: an
idle one-Markdown page took 0.063-0.071 cores, 0.003-0.005 with the loop slowed as below;
the app's idle Chat tab 0.067. The app shares those cores with its model and a training
run.

The tracker takes `window.requestAnimationFrame` when its module loads, before the page
runs the `head` given to launch(), so the script has to be in the HTML itself: the
middleware writes it at the top of the page's <head>. It sends the tracker's frame
requests, and only those (the caller one frame up the stack is the tracker's module), to
a 100 ms timer: its counter still moves ten times a second, and a tracker that should
have stopped costs nothing visible. Other frame requests (charts, Gradio's own
animations) are untouched. A Gradio whose tracker module has another name gets the
script too, and it then changes nothing.
"""
from __future__ import annotations

from starlette.datastructures import MutableHeaders

TRACKER_MODULE = "/statustracker-"
TRACKER_FRAME_MS = 100

FRAME_LOOP_JS = f"""<script>
(() => {{
  const frame = window.requestAnimationFrame.bind(window);
  window.requestAnimationFrame = (callback) => {{
    const caller = (new Error().stack || '').split('\\n')[2] || '';
    if (!caller.includes('{TRACKER_MODULE}')) return frame(callback);
    return setTimeout(() => callback(performance.now()), {TRACKER_FRAME_MS});
  }};
}})();
</script>"""


class EarlyScript:
    """ASGI middleware: `script` right after <head> in the HTML that GET `paths` answer.
    Everything else (the API, the event streams, assets) passes through untouched."""

    def __init__(self, app, script: str = FRAME_LOOP_JS, paths: tuple[str, ...] = ("/",)):
        self.app = app
        self.tag = script.encode()
        self.paths = paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        start: dict = {}
        parts: list[bytes] = []

        async def rewrite(message):
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            parts.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(parts)
            headers = MutableHeaders(raw=list(start.get("headers", [])))
            if headers.get("content-type", "").startswith("text/html") and b"<head>" in body \
                    and "content-encoding" not in headers:
                body = body.replace(b"<head>", b"<head>" + self.tag, 1)
                headers["content-length"] = str(len(body))
            await send({**start, "headers": headers.raw})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)
