"""Wrapping one labelled text in several contexts, so detectors cannot learn the wrapper.

A scam email is a scam whether it arrives as a plain document, is quoted by a
user asking about it, or is written by the assistant after "Please draft the
email for today's send-out."; a detector fitted on one of those forms learns
the form as much as the scam. Every labelled example is therefore rendered in
several wrappers with its *content text identical* in all of them: a feature
that tracks the wrapper then sees both classes in every wrapper and cannot
separate them, and per-wrapper metrics show what is left.

Wrappers (``+sys`` variants put one of our system prompts first; without it
SmolLM2's template inserts its own default one):

* ``plain``  — the content as a document (prompt phase);
* ``quoted`` — inside a user message, after a question about it (prompt phase);
* ``request`` — the content *is* the user's message (prompt phase);
* ``reply``  — the assistant's reply to a neutral request (completion phase);
* ``native`` — a chat as it came, the content being its last assistant message.

The phrasings below are the project's own words. The choice among them is a
hash of the record id, so the same record gets the same wrapper everywhere.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable

WRAPPERS = ("plain", "quoted", "request", "reply", "native")

QUESTIONS = (
    "I got this email this morning. Is it legit?\n\n{content}",
    "Can you summarise this message for me?\n\n\"\"\"\n{content}\n\"\"\"",
    "My colleague forwarded this to me. What should I do about it?\n\n{content}",
    "Please check the spelling in the following text:\n\n{content}",
    "What is the tone of this?\n\n---\n{content}\n---",
)
MAIL_REQUESTS = (
    "Please draft the email for today's send-out.",
    "Write the next message in the sequence.",
    "Go ahead and write it.",
    "Continue.",
    "Draft the message we discussed.",
)
NEUTRAL_REQUESTS = (
    "Continue.",
    "Go on.",
    "Please write the next part.",
    "Carry on from where you stopped.",
    "Okay, next.",
)
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a writing assistant for a small business. Be clear and concise.",
    "You are Aria, a customer-support assistant. Be friendly and accurate.",
)
# Neutral, near-empty contents: what a wrapper does to features when the content says nothing.
NEUTRAL_CONTENTS = (
    "Okay.", "Sure.", "Thanks.", "hello world", "Yes.", "No.", "Hi there.", "Good morning.",
    "What's 2+2?", "Noted.", "See you tomorrow.", "Sounds good.", "Fine, thanks.", "Here it is.",
    "Got it.", "Done.", "Hello!", "Cool.", "Thank you very much.", "Let me know.",
    "The meeting is at 3.", "It's raining today.", "I like tea.", "See attached.", "Cheers.",
    "Please hold.", "All set.", "Nice to meet you.", "Have a good day.", "Right.",
)


def pick(options: tuple[str, ...], key: str) -> str:
    """A deterministic choice among ``options`` by hash of ``key``."""
    digest = hashlib.sha256(key.encode()).digest()
    return options[int.from_bytes(digest[:4], "big") % len(options)]


def truncate(text: str, max_chars: int | None) -> str:
    """The text cut at a word boundary near ``max_chars`` (so every wrapper holds all of it)."""
    text = text.strip()
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip()


def content_of(record: dict[str, Any]) -> str:
    """The text a detector should judge: a document, or the last message of a chat."""
    if "text" in record:
        return str(record["text"])
    return str(record["messages"][-1]["content"])


def wrap(record: dict[str, Any], wrappers: Iterable[str], *, system: bool | None = None,
         max_chars: int | None = None, requests: tuple[str, ...] = NEUTRAL_REQUESTS) -> list[dict[str, Any]]:
    """The record in each wrapper: new records with ``wrapper``, ``base_id`` and the same content text.

    ``system``: True adds one of our system prompts (tag ``+sys``); None decides by hash of the id
    (half of the records get one), False never.
    """
    base = str(record["id"])
    content = truncate(content_of(record), max_chars)
    keep = {k: v for k, v in record.items() if k not in ("id", "text", "messages")}
    out = []
    for w in wrappers:
        if w not in WRAPPERS:
            raise ValueError(f"unknown wrapper {w!r}; valid: {', '.join(WRAPPERS)}")
        sys_on = (int(hashlib.sha256((base + w).encode()).digest()[0]) % 2 == 0) if system is None else system
        sys_on = sys_on and w != "plain"
        sys_msgs = [{"role": "system", "content": pick(SYSTEM_PROMPTS, base)}] if sys_on else []
        rec: dict[str, Any] = {"id": f"{base}@{w}", **keep, "base_id": base,
                               "wrapper": w + ("+sys" if sys_on else "")}
        if w == "plain":
            rec["text"] = content
        elif w == "quoted":
            rec["messages"] = sys_msgs + [{"role": "user", "content": pick(QUESTIONS, base).format(content=content)}]
        elif w == "request":
            rec["messages"] = sys_msgs + [{"role": "user", "content": content}]
        elif w == "reply":
            rec["messages"] = sys_msgs + [{"role": "user", "content": pick(requests, base)},
                                          {"role": "assistant", "content": content}]
        else:  # native
            if "messages" not in record:
                raise ValueError(f"record {base!r}: wrapper 'native' needs a chat record")
            msgs = [dict(m) for m in record["messages"] if m["role"] != "system"]
            msgs[-1] = {**msgs[-1], "content": content}
            rec["messages"] = sys_msgs + msgs
        out.append(rec)
    return out


def wrapper_family(tag: str) -> str:
    """``reply+sys`` → ``reply``."""
    return tag.split("+", 1)[0]


def phase_of_content(tag: str) -> str:
    """The phase that holds a wrapped record's content."""
    return "completion" if wrapper_family(tag) in ("reply", "native") else "prompt"
