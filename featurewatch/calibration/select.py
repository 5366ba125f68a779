"""Recognising formatting features from their top contexts.

A feature whose top contexts (features.json) highlight punctuation, whitespace,
digits, chat markup or the operator's system prompt, or whose label says so,
reads the form of a text, not what it says; the leave-one-source-out fit
(:func:`featurewatch.calibration.loso.candidate_features`) drops it.
"""

from __future__ import annotations

import re
from typing import Any

_MARK = re.compile(r"«(.*?)»")
_MARKUP = {"<|im_start|>", "<|im_end|>", "assistant", "user", "system", "⏎"}
_DEFAULT_SYSTEM = "AI assistant named SmolLM"  # SmolLM2's default system prompt, as in top contexts
_FORMAT_WORDS = ("punctuation", "newline", "whitespace", "indent", "period", "comma", "paragraph break",
                 "markup", "system prompt", "chat template", "colon", "bracket", "quote mark", "'⏎'",
                 "digits", "sentence end", "line break", "role token", "role name", "im_start")
# formatting words a label may use only to say where a word sits ("'and' after a comma")
_POSITIONAL_WORDS = {"punctuation", "newline", "period", "comma", "paragraph break", "colon", "bracket", "quote mark",
                     "sentence end", "line break", "digits", "whitespace", "indent"}
_QUOTED_WORD = re.compile(r"['‘\"“][^'’\"”⏎]*[a-z][^'’\"”]*['’\"”]")  # a quoted token with a letter in it


def is_formatting(info: dict[str, Any] | None, *, share: float = 0.6) -> bool:
    """Whether a feature's top contexts highlight mostly punctuation, whitespace, digits or markup."""
    if not info:
        return False
    label = str(info.get("label") or "").lower()
    said = [w for w in _FORMAT_WORDS if w in label]
    # "'but' after a comma": a word, placed by punctuation; only markup and preamble words make it formatting
    word = _QUOTED_WORD.search(label) is not None and not set(said) - _POSITIONAL_WORDS
    if said and not word and not label.startswith("mixed"):
        return True
    contexts = list(info.get("top_contexts", []))
    # the highlighted token inside a system prompt: a feature of the operator's preamble
    def system_token(c: str) -> bool:
        before = c.split("«", 1)[0]
        if "<|im_start|>system" in before:
            return "<|im_end|>" not in before.split("<|im_start|>system", 1)[-1]
        return "<|im_start|>" not in before and _DEFAULT_SYSTEM in before  # a snippet cut inside it
    in_system = sum(system_token(c) for c in contexts)
    if contexts and in_system / len(contexts) >= share:
        return True
    tokens = [m.group(1) for c in contexts for m in [_MARK.search(c)] if m]
    if not tokens:
        return False
    def fmt(t: str) -> bool:
        s = t.strip()
        return s in _MARKUP or not any(ch.isalpha() for ch in s)
    return sum(fmt(t) for t in tokens) / len(tokens) >= share
