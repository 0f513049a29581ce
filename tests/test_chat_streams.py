"""A new conversation (Clear, blind mode switched) and answers still streaming into the
old one: the old stream stops before the chats are emptied, and an answer asked for
before the new conversation writes nothing. CI saw the old conversation come back into
an emptied chat, and the next blind vote stored as cross-prompt."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import gradio as gr
import pytest

from rpo_app.adapters import BASE_LABEL
from rpo_app.ui import chat
from rpo_app.ui.chat_streams import ChatStreams

LONG = (0.7, 0.95, 64, 0, "")  # temperature, top-p, max new tokens, seed, system prompt
ADA, BOB = SimpleNamespace(session_hash="ada"), SimpleNamespace(session_hash="bob")


def test_a_stream_is_live_until_its_session_starts_a_new_conversation():
    streams = ChatStreams()
    with streams.streaming("ada", 0) as ada_live, streams.streaming("bob", 0) as bob_live:
        assert ada_live() and bob_live()
        done = []
        waiter = threading.Thread(target=lambda: done.append(streams.start_new("ada", 0)))
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive()  # the new conversation waits for ada's old stream
        assert not ada_live() and bob_live()  # bob's conversation is his own
    waiter.join(5)
    assert done == [1]
    assert streams.is_current("ada", 1) and not streams.is_current("ada", 0)
    assert streams.is_current("bob", 0)
    # A page that sends a number this process never gave (the app restarted) is taken as is.
    assert streams.is_current("carol", 7)


def test_a_new_conversation_goes_ahead_when_an_old_stream_never_stops():
    streams = ChatStreams(wait_s=0.2)
    with streams.streaming("ada", 0):
        assert streams.start_new("ada", 0) == 1


def test_clear_waits_for_the_streaming_answer_which_then_writes_nothing(model_ctx):
    stream = chat.submit(model_ctx, "Tell me a long story.", [], [], BASE_LABEL, BASE_LABEL,
                         False, None, chat.NEWEST, *LONG, 0, ADA)
    next(stream)  # the message shown
    first = next(stream)  # the first chunk of both answers
    assert first[0][-1]["role"] == "assistant"
    cleared = []
    clearing = threading.Thread(target=lambda: cleared.append(
        chat.clear_all(model_ctx, False, chat.NEWEST, BASE_LABEL, BASE_LABEL, 0, ADA)))
    clearing.start()
    clearing.join(0.5)
    assert clearing.is_alive()  # it waits while the old answer still streams
    assert list(stream) == []  # the old answer writes nothing more
    clearing.join(10)
    assert not clearing.is_alive()
    assert cleared[0][:2] == ([], []) and cleared[0][-1] == 1

    # A message sent before the Clear (the page still had conversation 0) writes nothing;
    # one sent after it (conversation 1) is answered.
    assert list(chat.submit(model_ctx, "Hi", [], [], BASE_LABEL, BASE_LABEL, False, None,
                            chat.NEWEST, *LONG, 0, ADA)) == [chat._SKIP_ALL]
    assert list(chat.regenerate(model_ctx, first[0], first[1], BASE_LABEL, BASE_LABEL, False,
                                None, chat.NEWEST, *LONG, 0, ADA)) == [chat._SKIP_ALL]
    outs = list(chat.submit(model_ctx, "Hi", [], [], BASE_LABEL, BASE_LABEL, False, None,
                            chat.NEWEST, 0.7, 0.95, 4, 0, "", 1, ADA))
    assert outs[-1][0][-1]["role"] == "assistant" and outs[-1][0][0]["content"] == "Hi"
    # Another session's conversation 0 is not affected by ada's Clear.
    assert list(chat.submit(model_ctx, "Hi", [], [], BASE_LABEL, BASE_LABEL, False, None,
                            chat.NEWEST, 0.7, 0.95, 4, 0, "", 0, BOB))[-1][0][0]["content"] == "Hi"


def test_switching_blind_mode_is_a_new_conversation_too(model_ctx):
    with pytest.raises(gr.Error, match="trained adapter"):  # nothing started: no adapter
        chat.toggle_blind(model_ctx, True, chat.NEWEST, BASE_LABEL, BASE_LABEL, 0, ADA)
    assert model_ctx.chat_streams.is_current("ada", 0)
    out = chat.toggle_blind(model_ctx, False, chat.NEWEST, BASE_LABEL, BASE_LABEL, 0, ADA)
    assert out[5:7] == ([], []) and out[-1] == 1
    assert not model_ctx.chat_streams.is_current("ada", 0)
