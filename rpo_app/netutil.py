"""Talking to an app on this machine, for the benchmarks and tests: a free port, and
HTTP and gradio_client that never leave 127.0.0.1."""
from __future__ import annotations

import logging
import os
import socket
import urllib.request

_LOCAL_HOSTS = ("127.0.0.1", "localhost")


def local_only() -> None:
    """Keep traffic to this machine off any proxy the environment names (urllib and the
    httpx inside gradio_client both read NO_PROXY); idempotent."""
    for var in ("NO_PROXY", "no_proxy"):
        have = [h for h in os.environ.get(var, "").split(",") if h]
        os.environ[var] = ",".join(have + [h for h in _LOCAL_HOSTS if h not in have])


def local_opener() -> urllib.request.OpenerDirector:
    """A urllib opener with no proxies at all, whatever NO_PROXY says."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now. Another process may take
    it before the caller binds it; good enough for test and benchmark servers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gradio_client(url: str, auth: tuple[str, str] | None = None):
    """A gradio_client.Client for the app at `url`: quiet, no analytics, and files in
    answers are left on the server rather than downloaded."""
    from gradio_client import Client

    local_only()
    # httpx logs a line per request at INFO: noise in test output, and it skews timings.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # A browser waits for the queue to take a request; httpx's default 5 s read limit on
    # that POST failed one of 20 simulated annotators on a loaded 2-core machine
    # (ReadTimeout) though the server answered. The event streams send a heartbeat every
    # 15 s, so 60 s also bounds a stream that went silent.
    import httpx

    return Client(url, auth=auth, verbose=False, download_files=False, analytics_enabled=False,
                  httpx_kwargs={"timeout": httpx.Timeout(60.0)})
