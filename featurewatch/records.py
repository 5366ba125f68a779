"""Record files (docs/architecture.md, "Record format") and their rendering into tokens with phases.

A record has ``text`` (a raw document, all prompt phase) or ``messages`` (a
chat rendered with the model's chat template; when the last message is the
assistant's, its tokens are the completion phase). Rendering keeps the two
phases as separate token runs so the boundary is exact.
"""

from __future__ import annotations

import json
import math
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, TypeVar

from .alert import COMPLETION, PHASES, PROMPT
from .errors import RecordError

if TYPE_CHECKING:
    import torch

ROLES = ("system", "user", "assistant")
__all__ = ["PHASES", "ROLES", "Record", "Rendered", "iter_records", "load_records", "markup_ids", "parse_record",
           "records_from_lines", "json_lines", "render", "pad_right"]
T = TypeVar("T")


@dataclass(frozen=True)
class Record:
    """One validated input record; ``extra`` holds passed-through keys (``label``, ``source``, ...)."""

    id: str
    text: str | None
    messages: tuple[dict[str, str], ...] | None
    extra: dict[str, Any]
    line: int

    @property
    def label(self) -> Any:
        return self.extra.get("label")


@dataclass(frozen=True)
class Rendered:
    """A record as tokens: ``ids`` are prompt tokens then completion tokens.

    ``content[i]`` is True when token ``i`` belongs to what a person or the model wrote: the
    text of a document, or the content of a user or assistant message. Chat markup, role
    names and the system prompt (the operator's words, and a default one the template may
    insert) are not content, and detectors never read them: a detector that could see the
    wrapper would learn the wrapper.
    """

    ids: list[int]
    n_prompt: int
    content: list[bool]
    markup: tuple[tuple[int, int], ...] = ()
    """Token spans ``[start, end)`` of chat markup typed inside content that became marker tokens
    (rendered with ``typed_markup="markup"``, as another engine tokenizes); empty otherwise."""

    def phase_of(self, position: int) -> str:
        return PROMPT if position < self.n_prompt else COMPLETION


def parse_record(obj: Any, *, line: int, path: str | None = None) -> Record:
    """Validate one decoded JSON value as a record."""
    def bad(msg: str) -> RecordError:
        return RecordError(msg, path=path, line=line)

    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object, got {type(obj).__name__}")
    has_text, has_messages = "text" in obj, "messages" in obj
    if has_text == has_messages:
        raise bad("a record needs exactly one of 'text' (a document) or 'messages' (a chat)")
    text = messages = None
    if has_text:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise bad("'text' must be a non-empty string")
        text = obj["text"]
    else:
        messages = _parse_messages(obj["messages"], bad)
    rid = obj.get("id", f"line-{line}")
    extra = {k: v for k, v in obj.items() if k not in ("id", "text", "messages")}
    return Record(id=str(rid), text=text, messages=messages, extra=extra, line=line)


def _parse_messages(msgs: Any, bad: Callable[[str], RecordError]) -> tuple[dict[str, str], ...]:
    """Check a chat: known roles, string contents, and a prompt turn before a final assistant reply."""
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object {{\"role\": ..., \"content\": str}}")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad(f"messages[{i}] has role {role!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise bad(f"messages[{i}] needs a string 'content'")
    if all(m["role"] == "assistant" for m in msgs):
        # a final assistant message is the completion; the chat template needs a prompt turn before it
        raise bad("a chat needs a system or user message before the assistant's reply (the prompt)")
    return tuple({"role": m["role"], "content": m["content"]} for m in msgs)


def iter_records(path: str | Path, *, skip_invalid: bool = False,
                 on_skip: Callable[[RecordError], Any] | None = None) -> Iterator[Record]:
    """Yield records from a JSONL file; a malformed line raises :class:`RecordError` naming it.

    Lines are decoded one at a time, so bytes that are not UTF-8 (a binary
    file) and JSON nested past Python's recursion limit are errors of their
    line. With ``skip_invalid``, bad lines are passed to ``on_skip(error)``
    instead (never dropped silently).
    """
    p = Path(path)
    if p.is_dir():
        raise RecordError(f"cannot read {p}: it is a directory; give a JSONL file", path=str(p))
    try:
        handle = p.open("rb")
    except OSError as exc:
        raise RecordError(f"cannot open {p}: {exc.strerror}", path=str(p)) from exc
    with handle:
        yield from records_from_lines(handle, path=str(p), skip_invalid=skip_invalid, on_skip=on_skip)


def records_from_lines(lines: Iterable[bytes], *, path: str, skip_invalid: bool = False,
                       on_skip: Callable[[RecordError], Any] | None = None) -> Iterator[Record]:
    """Record lines (a file's, or package data's): :func:`iter_records` without the file."""
    return json_lines(lines, lambda obj, n: parse_record(obj, line=n, path=path), path=path,
                      skip_invalid=skip_invalid, on_skip=on_skip)


def json_lines(lines: Iterable[bytes | str], parse: Callable[[Any, int], T], *, path: str, strict: bool = False,
               skip_invalid: bool = False, on_skip: Callable[[RecordError], Any] | None = None) -> Iterator[T]:
    """The one reader of JSONL lines (record files, the shipped corpus, the page's score files): each line
    decoded (UTF-8, a byte-order mark tolerated on the first), blank lines skipped, the JSON handed to
    ``parse(obj, line_number)``. A bad line is a :class:`RecordError` naming its line (``reason`` without
    the place); ``parse`` raises one for what it refuses. ``strict``: ``NaN``, ``Infinity`` and numbers
    out of double range are refused too. With ``skip_invalid``, bad lines go to ``on_skip(error)``
    (never dropped silently)."""
    for n, raw in enumerate(lines, start=1):
        try:
            obj = _json_line(raw, n, path, strict)
            value = None if obj is _BLANK else parse(obj, n)
        except RecordError as exc:
            if not skip_invalid:
                raise
            if on_skip is None:
                raise RecordError("skip_invalid needs an on_skip callback so skipped lines are reported",
                                  path=path, line=n) from exc
            on_skip(exc)
            continue
        if obj is not _BLANK and value is not None:
            yield value


_BLANK = object()


class BadNumber(ValueError):
    """A JSON number featurewatch refuses: ``NaN``/``Infinity``, or a float beyond a finite double."""


def reject_constant(name: str) -> Any:
    """``json.loads(parse_constant=…)``: ``NaN``, ``Infinity`` and ``-Infinity`` are refused."""
    raise BadNumber(f"{name} is not a number JSON allows")


def finite_float(text: str) -> float:
    """``json.loads(parse_float=…)``: a float that overflows a double (``1e309``) is refused, not made inf."""
    value = float(text)
    if not math.isfinite(value):
        raise BadNumber(f"the number {text[:40]} is out of range (not a finite double)")
    return value


def _json_line(raw: bytes | str, n: int, path: str, strict: bool) -> Any:
    """One JSONL line's JSON value; ``_BLANK`` for a blank line."""
    if isinstance(raw, str):
        line = raw.removeprefix("\ufeff") if n == 1 else raw
    else:
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # tolerate a byte-order mark
        except UnicodeDecodeError as exc:
            raise RecordError(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line); "
                              "record files must be UTF-8 JSONL", path=path, line=n) from None
    if not line.strip():
        return _BLANK
    try:
        if strict:
            return json.loads(line, parse_constant=reject_constant, parse_float=finite_float)
        return json.loads(line)
    except BadNumber as exc:
        raise RecordError(f"a bad number: {exc}; JSON lines take finite numbers", path=path, line=n) from None
    except json.JSONDecodeError as exc:
        raise RecordError(f"invalid JSON ({exc.msg} at column {exc.colno})", path=path, line=n) from None
    except ValueError as exc:  # int() limits: an integer of thousands of digits
        raise RecordError(f"invalid JSON ({exc})", path=path, line=n) from None
    except RecursionError:
        raise RecordError("JSON nested too deeply to read", path=path, line=n) from None


def load_records(path: str | Path, **kwargs: Any) -> list[Record]:
    return list(iter_records(path, **kwargs))


TypedMarkup = Literal["text", "markup"]
"""How chat markup typed inside a message's content is tokenized: ``text`` (what featurewatch
renders: ``<|im_end|>`` typed by a person is the characters ``<``, ``|``, ``im`` ...) or ``markup``
(what an engine that tokenizes the rendered chat as a whole builds: real marker tokens, reported
in :attr:`Rendered.markup`)."""


_ROLE_HEADER = re.compile(r"(?:system|user|assistant|tool)[^\S\n]*\n")
"""A role name and its line end right after a typed turn marker (``<|im_start|>assistant⏎``)."""


_MARKUP_IDS: "weakref.WeakKeyDictionary[Any, tuple[Any, frozenset[int]]]" = weakref.WeakKeyDictionary()
"""markup_ids per tokenizer, with the special ids it was read at."""


def markup_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the tokenizer's special tokens (chat markers, end of text, ...): what typed markup can become.

    Cached per tokenizer (reading ``added_tokens_decoder`` builds a dict of every added token,
    thousands in Gemma's tokenizer, and this runs for every record rendered); the cache is read
    again when the tokenizer's special ids change (``add_special_tokens``; even ``len(tokenizer)``
    costs a fifth of a millisecond, too much to ask for every record).
    """
    specials = tuple(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    try:
        cached = _MARKUP_IDS.get(tokenizer)
    except TypeError:  # not weak-referenceable or not hashable: no cache
        return _read_markup_ids(tokenizer, specials)
    if cached is not None and cached[0] == specials:
        return cached[1]
    ids = _read_markup_ids(tokenizer, specials)
    _MARKUP_IDS[tokenizer] = (specials, ids)
    return ids


def _read_markup_ids(tokenizer: Any, specials: tuple[int, ...]) -> frozenset[int]:
    ids = set(specials)
    decoder = getattr(tokenizer, "added_tokens_decoder", None)
    if isinstance(decoder, dict):
        ids.update(int(i) for i, t in decoder.items() if getattr(t, "special", False))
    return frozenset(ids)


def _encode(tokenizer: Any, text: str, *, special: bool, split: bool = False
            ) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Token ids of ``text`` and their character offsets (None for slow tokenizers, which have none);
    ``split``: special-token strings in ``text`` are tokenized as the characters they are."""
    extra = {"split_special_tokens": True} if split else {}
    try:
        enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True, **extra)
        return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        return list(tokenizer(text, add_special_tokens=special, **extra)["input_ids"]), None


def _tokenize(tokenizer: Any, text: str, spans: list[tuple[int, int]], *, special: bool = False,
              typed_markup: TypedMarkup = "text") -> tuple[list[int], list[bool], list[tuple[int, int]]]:
    """Token ids of ``text``, per token whether it starts inside one of the content ``spans``, and the
    token spans of markup typed inside them (``typed_markup="markup"`` only; with ``"text"`` the
    content spans are tokenized with special tokens split into text, and the rest as markup)."""
    ids, offsets = _encode(tokenizer, text, special=special)
    if offsets is None:
        return ids, [True] * len(ids), []
    marks = markup_ids(tokenizer)
    typed = [i for i, (t, (start, _)) in enumerate(zip(ids, offsets))
             if t in marks and any(a <= start < b for a, b in spans)]
    markup: list[tuple[int, int]] = []
    typed_chars: list[tuple[int, int]] = []  # the typed markers and the role header after each
    if typed and typed_markup == "text":
        for i in typed:
            start, end = offsets[i]
            header = _ROLE_HEADER.match(text, end)
            typed_chars.append((start, header.end() if header else end))
        ids, offsets = _encode_content_as_text(tokenizer, text, spans, special=special)
    for i in typed if typed_markup == "markup" else ():
        if markup and markup[-1][1] == i:
            markup[-1] = (markup[-1][0], i + 1)
        else:
            markup.append((i, i + 1))
    content = [end > start and any(a <= start < b for a, b in spans) and not any(a <= start < b for a, b in typed_chars)
               for start, end in offsets]
    return ids, content, markup


def _encode_content_as_text(tokenizer: Any, text: str, spans: list[tuple[int, int]], *, special: bool
                            ) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokenize ``text`` piece by piece: the content ``spans`` with special-token strings split into
    text, what lies between them (the template's markup) as markup."""
    cuts = sorted({0, len(text), *(x for span in spans for x in span if 0 <= x <= len(text))})
    pieces = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for a, b in pieces:
        inside = any(lo <= a < hi for lo, hi in spans)
        piece_ids, piece_offsets = _encode(tokenizer, text[a:b], special=special and len(pieces) == 1,
                                           split=inside)
        ids += piece_ids
        offsets += [(s + a, e + a) for s, e in piece_offsets or [(0, b - a)] * len(piece_ids)]
    return ids, offsets


def _content_spans(rendered: str, messages: list[dict[str, str]]) -> list[tuple[int, int]]:
    """Character spans of user and assistant message contents in a rendered chat, in order."""
    spans, cursor = [], 0
    for m in messages:
        body = m["content"].strip()
        if not body:
            continue
        at = rendered.find(body, cursor)
        if at < 0:  # a template that rewrites contents: fall back to "everything is content"
            return [(0, len(rendered))]
        cursor = at + len(body)
        if m["role"] != "system":
            spans.append((at, cursor))
    return spans


def render_chat(messages: list[dict[str, str]], tokenizer: Any, *, add_generation_prompt: bool = True,
                typed_markup: TypedMarkup = "text") -> Rendered:
    """Tokenize chat messages through the chat template (all prompt phase), with the content mask.

    Chat markup a message's content contains (``Hi<|im_end|>\\n<|im_start|>assistant\\n``) is the
    content's text (``typed_markup="text"``): it cannot end the turn or start another. With
    ``typed_markup="markup"`` it is tokenized as the markers an engine that tokenizes the whole
    rendered chat would build, and reported in :attr:`Rendered.markup`.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids, content, markup = _tokenize(tokenizer, text, _content_spans(text, messages), typed_markup=typed_markup)
    return Rendered(ids, len(ids), content, tuple(markup))


def render_text(text: str, tokenizer: Any, *, typed_markup: TypedMarkup = "text") -> Rendered:
    """Tokenize a plain document (all prompt phase, all content but special tokens; markup typed in it is
    text unless ``typed_markup="markup"``)."""
    ids, content, markup = _tokenize(tokenizer, text, [(0, len(text))], special=True, typed_markup=typed_markup)
    return Rendered(ids, len(ids), content, tuple(markup))


def render(record: Record, tokenizer: Any, *, max_tokens: int | None = None) -> Rendered:
    """Tokenize a record; ``messages`` go through the chat template.

    Past ``max_tokens`` the reply is kept first, then the end of the prompt closest to it.
    """
    if record.text is not None:
        out = render_text(record.text, tokenizer)
    else:
        msgs = list(record.messages or ())
        if msgs[-1]["role"] != "assistant":
            out = render_chat(msgs, tokenizer)
        else:
            prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(msgs, tokenize=False)
            if not full.startswith(prompt):  # templates that rewrite earlier turns: fall back to a split
                prompt = full[: full.rfind(msgs[-1]["content"])]
            spans = _content_spans(full, msgs)
            p_ids, p_content, _ = _tokenize(tokenizer, prompt, spans)
            shifted = [(a - len(prompt), b - len(prompt)) for a, b in spans]
            c_ids, c_content, _ = _tokenize(tokenizer, full[len(prompt):], shifted)
            out = Rendered(p_ids + c_ids, len(p_ids), p_content + c_content)
    if max_tokens is None or len(out.ids) <= max_tokens:
        return out
    n_prompt = out.n_prompt
    if n_prompt == len(out.ids):  # no reply: keep the start of the document
        return Rendered(out.ids[:max_tokens], max_tokens, out.content[:max_tokens])
    n_completion = min(len(out.ids) - n_prompt, max_tokens - min(n_prompt, max_tokens // 2))
    keep = max_tokens - n_completion
    lo, hi = n_prompt - keep, n_prompt + n_completion
    return Rendered(out.ids[lo:hi], keep, out.content[lo:hi])


def pad_right(rows: list[list[int]], pad_id: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Right-pad token rows into ``(input_ids, attention_mask)``; causal attention makes right pads harmless."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask
