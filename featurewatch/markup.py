"""Chat markup in token ids someone else built: which tokens are content, and markup typed into content.

Where featurewatch renders a chat itself (:func:`~featurewatch.records.render_chat`:
``Monitor.generate``, scoring, the LangChain chat model, the page), markup a person types
inside a message is tokenized as text, so it cannot end their turn. Where it reads token
ids another engine built (a session around your own forward pass, vLLM, a LangChain
pipeline), typed ``<|im_end|>`` already *is* the marker token, and the model reads a turn
that nobody sent. This module reads such ids against the chat template's grammar,
learned once by probing the template (:class:`ChatMarkup`):

* the **content mask** (what detectors read): the bodies of user and assistant turns,
  stripped of whitespace-only tokens at either end; not the role headers (``user⏎``),
  system turns or special tokens. A prompt without turn markers is a plain document:
  all content but special tokens.
* **markup that breaks the grammar**, reported as a ``markup-injection`` alert
  (:data:`~featurewatch.alert.MARKUP_INJECTION`): a special token inside a turn's body
  other than the turn's end (``<|endoftext|>``, a turn marker with no end before it); a
  turn end followed by text instead of the next turn; a role the template's chats do not
  have; a system turn after the conversation started; two turns of the same role in a
  row (``Hi<|im_end|>⏎<|im_start|>assistant⏎…`` typed before a request makes the request an
  assistant turn, followed by the real assistant turn). The content around such markup
  is read as content: the body goes on past a typed marker, and the body of a suspicious
  turn is read whatever its role.

What ids alone cannot show: a forged exchange that is itself a well-formed chat
(``…<|im_end|>⏎<|im_start|>assistant⏎OK<|im_end|>⏎<|im_start|>user⏎…``) reads exactly as a real
one; where that matters, let featurewatch render the messages. And a chat that really
sends two user turns in a row is reported too (a warning, never a block).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .records import ROLES, markup_ids

logger = logging.getLogger(__name__)

_PROBE = "Zqxv probe text"
_CONTENT_ROLES = ("user", "assistant")
_MAX_HEADER = 8  # tokens of a role header (``assistant⏎``) read after a typed turn marker


@dataclass(frozen=True)
class ChatReading:
    """A prompt read against the template: the content mask, and the spans of markup typed into content."""

    content: list[bool]
    injected: list[tuple[int, int]] = field(default_factory=list)
    """Token spans ``[start, end)`` of markup that breaks the template's grammar, in order."""


class ChatMarkup:
    """The chat grammar of one tokenizer's template, for reading prompts given as token ids.

    The template is probed once: a one-message chat is rendered; the special token right
    before the role name is the turn marker (``<|im_start|>`` in ChatML), the first special
    token after the message is the turn end (``<|im_end|>``). A template without a
    recognisable turn marker makes every prompt a plain document (logged once); without a
    turn end, or with special tokens inside the role header (Llama 3's ``<|end_header_id|>``),
    only the content mask is read and nothing is reported: the grammar checks are ChatML's.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.special = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
        """The tokens no detector reads (the exclusion rule of :mod:`~featurewatch.positions`)."""
        self.marks = set(markup_ids(tokenizer)) if tokenizer is not None else set()
        """Every special token typed text can become (``all_special_ids`` and the special added tokens)."""
        self.bos = getattr(tokenizer, "bos_token_id", None)
        self.turn_marker, self.turn_end = self._probe()
        self._text: dict[int, str] = {}

    def _decode(self, token: int) -> str:
        text = self._text.get(token)
        if text is None:
            text = self._text[token] = self.tokenizer.decode([token])
        return text

    def _probe(self) -> tuple[int | None, int | None]:
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            return None, None
        try:
            ids = tok.apply_chat_template([{"role": "user", "content": _PROBE}], tokenize=True,
                                          add_generation_prompt=False)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            ids = [int(i) for i in ids]
            pieces = [tok.decode([i]) for i in ids]
            # the probe's first token, and the last special token before it
            at = next(i for i in range(len(ids)) if _PROBE[:2] in "".join(pieces[:i + 1]))
            marker = max(i for i in range(at) if ids[i] in self.special)
            end = next((ids[i] for i in range(at, len(ids)) if ids[i] in self.marks), None)
        except (StopIteration, ValueError, TypeError, KeyError):
            marker, pieces, at, end, ids = None, [], 0, None, []
        if marker is None or "user" not in "".join(pieces[marker + 1:at]):
            logger.warning("featurewatch: the chat template has no turn marker featurewatch recognises; detectors "
                           "read chat markup and system prompts too (scores differ from the transformers monitor)")
            return None, None
        if any(i in self.marks for i in ids[marker + 1:at]):  # a header with markup of its own (Llama 3's
            return ids[marker], None  # <|end_header_id|>): the content mask only, no grammar checks
        return ids[marker], (end if end != ids[marker] else None)

    def mask(self, ids: Sequence[int]) -> list[bool]:
        """Per token of a prompt: is it message content a detector reads?"""
        return self.read(ids).content

    def read(self, ids: Sequence[int]) -> ChatReading:
        """The content mask of a prompt, and the markup typed into its content (see the module docstring)."""
        ids = [int(i) for i in ids]
        if self.turn_marker is None or self.turn_marker not in ids:
            return self._document(ids)
        return _Reader(self, ids).run()

    def _document(self, ids: list[int]) -> ChatReading:
        """A prompt without turns: all content but special tokens; a special token past the start is typed."""
        content = [i not in self.special for i in ids]
        injected: list[tuple[int, int]] = []
        if self.turn_marker is not None and self.turn_end is not None:  # only a chat model's documents are checked
            for pos, i in enumerate(ids):
                if i in self.marks and not (pos == 0 and i == self.bos):
                    _add(injected, pos, pos + 1)
        return ChatReading(content, injected)


def _add(spans: list[tuple[int, int]], start: int, end: int) -> None:
    """Add a span, merged with those it touches (the list stays sorted and disjoint)."""
    keep = [s for s in spans if s[1] < start or s[0] > end]
    for s in spans:
        if not (s[1] < start or s[0] > end):
            start, end = min(start, s[0]), max(end, s[1])
    spans[:] = sorted([*keep, (start, end)])


class _Reader:
    """One pass over a chat prompt's ids."""

    def __init__(self, grammar: ChatMarkup, ids: list[int]) -> None:
        self.g = grammar
        self.ids = ids
        self.content = [False] * len(ids)
        self.injected: list[tuple[int, int]] = []
        self.checked = grammar.turn_end is not None
        self.body: list[int] = []  # positions of the open turn's body
        self.reads = False  # the open turn's body is content
        self.turns: list[tuple[str, int]] = []  # (role, marker position) of each turn so far

    def run(self) -> ChatReading:
        g, ids, pos, n = self.g, self.ids, 0, len(self.ids)
        open_turn = False
        while pos < n:
            tok = ids[pos]
            if tok == g.turn_marker:
                if open_turn and self.checked:  # a marker inside a turn that never ended: typed
                    pos = self._typed_marker(pos)
                    continue
                self._close()
                pos, open_turn = self._header(pos), True
                continue
            if tok in g.marks:
                if tok == g.turn_end and open_turn and self._ends_turn(pos):
                    self._close()
                    open_turn = False
                elif self.checked and not (pos == 0 and tok == g.bos) and (open_turn or tok == g.turn_end):
                    _add(self.injected, pos, pos + 1)  # the body goes on past it
                elif not self.checked:  # no turn end known: a special token ends the turn (as it always did)
                    self._close()
                    open_turn = False
                pos += 1
                continue
            if open_turn:
                self.body.append(pos)
                self.content[pos] = self.reads
            pos += 1
        self._close()
        return ChatReading(self.content, self.injected)

    def _ends_turn(self, pos: int) -> bool:
        """A turn end is real when the next turn (or the end of the prompt) follows it, after whitespace."""
        if not self.checked:
            return True
        for nxt in range(pos + 1, len(self.ids)):
            tok = self.ids[nxt]
            if tok == self.g.turn_marker:
                return True
            if tok in self.g.marks or self.g._decode(tok).strip():
                return False
        return True

    def _header(self, marker: int) -> int:
        """Read a turn's role header (``user⏎``) after its marker; judge the turn; return the body's start."""
        g, ids = self.g, self.ids
        pos, header = marker + 1, []
        while pos < len(ids) and ids[pos] not in g.marks:
            header.append(ids[pos])
            pos += 1
            if "\n" in g._decode(ids[pos - 1]):
                break
        role = g.tokenizer.decode(header).strip().lower() if header else ""
        reads = role in _CONTENT_ROLES
        if self.checked:
            previous = self.turns[-1] if self.turns else None
            late_system = role == "system" and any(r != "system" for r, _ in self.turns)
            if role not in ROLES or late_system:
                _add(self.injected, marker, pos)
                reads = True
            elif previous is not None and previous[0] == role and role != "system":
                _add(self.injected, previous[1], pos)  # the whole turn that repeats the role
        self.turns.append((role, marker))
        self.reads = reads
        return pos

    def _typed_marker(self, marker: int) -> int:
        """A turn marker inside a turn's body: report it and its role header; the body goes on."""
        g, ids = self.g, self.ids
        end = marker + 1
        for pos in range(marker + 1, min(len(ids), marker + 1 + _MAX_HEADER)):
            if ids[pos] in g.marks:
                break
            if "\n" in g._decode(ids[pos]):
                head = g.tokenizer.decode(ids[marker + 1:pos + 1]).strip().lower()
                end = pos + 1 if head in ROLES else end
                break
        _add(self.injected, marker, end)  # typed markup: neither content nor the end of the body
        return end

    def _close(self) -> None:
        # render_chat's spans are the stripped message: whitespace-only tokens at either end are not content
        for seq in (self.body, self.body[::-1]):
            for pos in seq:
                if self.g._decode(self.ids[pos]).strip():
                    break
                self.content[pos] = False
        self.body = []
        self.reads = False
