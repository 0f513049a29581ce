"""Which answer stream may still write into a browser session's chat.

Clear, and switching blind mode (or its rule), start a new conversation. An answer still
streaming into the old one must not write into the new one: its chunks carry the whole
old conversation, so a later blind vote would compare two different histories. Gradio's
`cancels=` did not stop that (CI and a loaded machine both saw the old conversation come
back), because it cancels from the browser in parallel with the new conversation's
update, in no guaranteed order.

So each session has a conversation number, kept here and in a hidden field of the page.
A stream records the number its event was triggered with; before each chunk it checks
that the number is still the session's, and stops otherwise. Starting a new conversation
bumps the number and then waits until the session's older streams have stopped, so
every chunk they sent reaches the browser before the emptied chat does. An event queued
before the new conversation (the page sent the old number) starts, sees it is stale and
writes nothing.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator

log = logging.getLogger(__name__)


class ChatStreams:
    def __init__(self, wait_s: float = 30.0):
        self.wait_s = wait_s  # how long a new conversation waits for an old stream to stop
        self._cond = threading.Condition()
        self._current: dict[str, int] = {}  # session -> its conversation number
        self._live: Counter = Counter()  # (session, number) -> streams running

    def is_current(self, session: str | None, number) -> bool:
        with self._cond:
            return self._current.setdefault(session, int(number or 0)) == int(number or 0)

    @contextmanager
    def streaming(self, session: str | None, number) -> Iterator[Callable[[], bool]]:
        """Around one stream: yields `live()`, true while the stream's conversation is
        still the session's."""
        key = (session, int(number or 0))
        with self._cond:
            self._live[key] += 1
        try:
            yield lambda: self.is_current(session, key[1])
        finally:
            with self._cond:
                self._live[key] -= 1
                if not self._live[key]:
                    del self._live[key]
                self._cond.notify_all()

    def start_new(self, session: str | None, number) -> int:
        """A new conversation for the session: its number, once the older streams stopped
        (or after `wait_s`, logged: a stream stuck in a long prefill)."""
        with self._cond:
            new = max(self._current.get(session, 0), int(number or 0)) + 1
            self._current[session] = new
            deadline = time.monotonic() + self.wait_s

            def old_ones() -> bool:
                return any(s == session and n != new for s, n in self._live)

            while old_ones():
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("a chat stream of the old conversation has not stopped after "
                                "%.0f s; starting the new one anyway", self.wait_s)
                    break
                self._cond.wait(left)
            return new


def session_of(request) -> str | None:
    """The browser session a Gradio request comes from (None for direct calls)."""
    return getattr(request, "session_hash", None)
