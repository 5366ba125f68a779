"""Rendering records into tokens: phases, the content mask, truncation (real SmolLM2 tokenizer)."""

from __future__ import annotations

from typing import Any

import pytest

from featurewatch.records import parse_record, render


@pytest.fixture(scope="module")
def tok() -> Any:
    from featurewatch.models import load_tokenizer

    return load_tokenizer()


def _content_text(tok: Any, rendered: Any) -> str:
    return tok.decode([i for i, c in zip(rendered.ids, rendered.content) if c])


def test_chat_content_is_message_text_only(tok: Any) -> None:
    record = parse_record({"messages": [{"role": "system", "content": "You are terse."},
                                        {"role": "user", "content": "Hello there"},
                                        {"role": "assistant", "content": "Hi! How can I help?"}]}, line=1)
    r = render(record, tok)
    assert len(r.content) == len(r.ids)
    # the system prompt, role names and markup are not content; both messages are, in order
    assert _content_text(tok, r) == "Hello thereHi! How can I help?"
    assert tok.decode(r.ids[r.n_prompt:]).startswith("Hi!")
    assert not any(r.content[:3])


def test_default_system_prompt_is_not_content(tok: Any) -> None:
    r = render(parse_record({"messages": [{"role": "user", "content": "What's 2+2?"}]}, line=1), tok)
    assert "SmolLM" in tok.decode(r.ids)  # the template inserts its own system prompt ...
    assert _content_text(tok, r) == "What's 2+2?"  # ... which detectors never read
    assert r.n_prompt == len(r.ids)


def test_text_is_all_content(tok: Any) -> None:
    r = render(parse_record({"text": "hello world"}, line=1), tok)
    assert r.content == [True] * len(r.ids)


def test_same_words_same_content_tokens_in_every_wrapper(tok: Any) -> None:
    email = "Your parcel is held at customs. Pay the 2.99 fee at http://parcel-fee.example to release it."
    plain = render(parse_record({"text": email}, line=1), tok)
    reply = render(parse_record({"messages": [{"role": "user", "content": "Continue."},
                                              {"role": "assistant", "content": email}]}, line=1), tok)
    reply_tokens = [i for i, c in zip(reply.ids[reply.n_prompt:], reply.content[reply.n_prompt:]) if c]
    assert reply_tokens == plain.ids


def test_truncation_keeps_the_reply_and_the_mask_aligned(tok: Any) -> None:
    record = parse_record({"messages": [{"role": "user", "content": "word " * 200},
                                        {"role": "assistant", "content": "reply " * 20}]}, line=1)
    full = render(record, tok)
    cut = render(record, tok, max_tokens=64)
    assert len(cut.ids) == len(cut.content) == 64
    assert cut.ids[cut.n_prompt:] == full.ids[full.n_prompt:]
    assert cut.content[cut.n_prompt:] == full.content[full.n_prompt:]
