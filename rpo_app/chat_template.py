"""How text becomes model tokens and where a turn ends: the model's own chat template.

The one home of the end-of-turn rule. Training appends the template's end-of-turn
token to every response, and every generator (candidates, chat, training previews)
stops on it, so a tuned model learns to stop exactly where generation stops it.
"""
from __future__ import annotations


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template closes an assistant turn with.

    Llama-3-style templates end a turn with a token that is not ``eos`` (<|eot_id|>);
    a model trained to end with eos would never stop in chat. Render a one-turn chat
    and take the special token right after the answer; fall back to eos.
    """
    marker = "Zq7"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], tokenize=False)
    pos = text.rfind(marker)
    if pos >= 0:
        tail = tokenizer(text[pos + len(marker):], add_special_tokens=False)["input_ids"]
        if tail and (tail[0] in set(tokenizer.all_special_ids) or tail[0] == tokenizer.eos_token_id):
            return int(tail[0])
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token and its chat template shows no end-of-turn token")
    return int(tokenizer.eos_token_id)


def stop_token_ids(tokenizer, model=None) -> set[int]:
    """Where generation stops: the template's end of turn, and any end of sequence
    (the tokenizer's eos and the model's generation_config eos, which may be a list)."""
    ids = {end_of_turn_id(tokenizer)}
    sources = [tokenizer.eos_token_id,
               getattr(getattr(model, "generation_config", None), "eos_token_id", None)]
    for source in sources:
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return ids


def chat_ids(tokenizer, messages: list[dict], system_prompt: str | None = None) -> list[int]:
    """A conversation plus the assistant header, in the model's template."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system_prompt and not (msgs and msgs[0]["role"] == "system"):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    # The template already wrote any BOS; do not let the tokenizer add a second.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, prompt, system_prompt: str | None = None) -> list[int]:
    """The prompt plus the assistant header: a text is one user turn; a conversation (a
    list of messages, or of (role, content) pairs; rpo_app.conversation) is templated
    whole, so the answer that follows is its final assistant turn."""
    if isinstance(prompt, str):
        return chat_ids(tokenizer, [{"role": "user", "content": prompt}], system_prompt)
    return chat_ids(tokenizer, [m if isinstance(m, dict) else {"role": m[0], "content": m[1]}
                                for m in prompt], system_prompt)


def response_ids(tokenizer, response: str, eot_id: int, ended: bool = True) -> list[int]:
    """A response's tokens, closed with the end-of-turn token when it ended. An answer
    cut at its token limit did not end: closing it would score a token the model never
    wrote there (the bundled model gives an end-of-turn mid-sentence about -22 nats, a
    tenth of a whole answer's log-prob) and teach it to stop mid-sentence."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [eot_id] if ended else ids
