"""Prompts that are conversations: the one home of what a valid one is and how it reads.

A prompt is either a single user message (stored as its text, as always) or a
conversation: a list of {"role", "content"} messages, an optional system message first,
then user and assistant turns in turn, ending with a user turn (the answer to judge is
the next assistant turn). Training applies the chat template to the whole history and
scores only that final assistant turn; generation answers it the same way.

Stored conversations keep their messages (JSON) next to a transcript text, which is the
prompt's text everywhere a text is needed: uniqueness in the store, the Label tab,
held-out splits. The embedder sees `embed_text`: the final user turn first, then the
turns before it, newest first, so the words that decide what the answer should be are
the ones the embedder's length limit keeps.

Pure functions: no store, no model.
"""
from __future__ import annotations

import json

ROLES = ("system", "user", "assistant")
_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


class ConversationError(ValueError):
    """A conversation that cannot be a prompt; the message names the problem."""


def check(messages) -> list[dict]:
    """The messages as plain {"role", "content"} dicts with stripped text, or raise."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConversationError("a conversation is a non-empty list of messages")
    out = []
    for n, m in enumerate(messages, 1):
        if isinstance(m, (list, tuple)) and len(m) == 2:
            m = {"role": m[0], "content": m[1]}
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m \
                or "content" not in m:
            raise ConversationError(f"message {n} must have exactly 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ConversationError(f"message {n} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise ConversationError(f"message {n} ({role}) has no text")
        out.append({"role": role, "content": content.strip()})
    turns = out[1:] if out[0]["role"] == "system" else out
    if not turns:
        raise ConversationError("a conversation needs a user turn after the system message")
    for n, m in enumerate(turns):
        want = "user" if n % 2 == 0 else "assistant"
        if m["role"] != want:
            where = n + 1 + (len(out) - len(turns))
            raise ConversationError(f"message {where} is {_a(m['role'])} turn where "
                                    f"{_a(want)} turn belongs (after an optional system message, turns "
                                    "alternate user, assistant, user, ...)")
    if turns[-1]["role"] != "user":
        raise ConversationError("a conversation must end with a user turn (the answer to "
                                "judge is the assistant turn that follows)")
    return out


def _a(role: str) -> str:
    return ("an " if role == "assistant" else "a ") + role


def is_single_turn(messages: list[dict]) -> bool:
    return len(messages) == 1 and messages[0]["role"] == "user"


def transcript(messages: list[dict]) -> str:
    """The conversation as one readable text: 'User: …\\n\\nAssistant: …\\n\\nUser: …'."""
    return "\n\n".join(f"{_NAMES[m['role']]}: {m['content']}" for m in messages)


def embed_text(messages: list[dict]) -> str:
    """What the embedder reads: the final user turn, then earlier turns newest first."""
    return "\n\n".join(m["content"] for m in reversed(messages))


def as_messages(prompt: str, messages=None) -> list[dict]:
    """A stored prompt (its text, and its messages when it is a conversation) as the
    messages the chat template takes."""
    if messages:
        return [dict(m) for m in (json.loads(messages) if isinstance(messages, str) else messages)]
    return [{"role": "user", "content": prompt}]


def frozen(messages) -> tuple | None:
    """A hashable copy (tuples of (role, content)), or None for a single-turn prompt."""
    if not messages:
        return None
    if isinstance(messages, str):
        messages = json.loads(messages)
    return tuple((m["role"], m["content"]) if isinstance(m, dict) else tuple(m)
                 for m in messages)
