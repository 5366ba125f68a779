"""Record files (DESIGN.md §4.1) and their rendering into tokens with phases.

A record has ``text`` (a raw document, all prompt phase) or ``messages`` (a
chat rendered with the model's chat template; when the last message is the
assistant's, its tokens are the completion phase). Rendering keeps the two
phases as separate token runs so the boundary is exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import RecordError

ROLES = ("system", "user", "assistant")
PROMPT, COMPLETION = "prompt", "completion"
PHASES = (PROMPT, COMPLETION)


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
    """A record as tokens: ``ids`` are prompt tokens then completion tokens."""

    ids: list[int]
    n_prompt: int

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
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise bad("'messages' must be a non-empty list of {role, content} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise bad(f"messages[{i}] must be {{\"role\": one of {', '.join(ROLES)}, \"content\": str}}")
        messages = tuple({"role": m["role"], "content": m["content"]} for m in msgs)
    rid = obj.get("id", f"line-{line}")
    extra = {k: v for k, v in obj.items() if k not in ("id", "text", "messages")}
    return Record(id=str(rid), text=text, messages=messages, extra=extra, line=line)


def iter_records(path: str | Path, *, skip_invalid: bool = False,
                 on_skip: Any = None) -> Iterator[Record]:
    """Yield records from a JSONL file; a malformed line raises :class:`RecordError` naming it.

    With ``skip_invalid``, bad lines are passed to ``on_skip(error)`` instead (never dropped silently).
    """
    p = Path(path)
    try:
        handle = p.open(encoding="utf-8")
    except OSError as exc:
        raise RecordError(f"cannot open {p}: {exc.strerror}", path=str(p)) from exc
    with handle:
        for n, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise RecordError(f"invalid JSON ({exc.msg} at column {exc.colno})",
                                      path=str(p), line=n) from exc
                yield parse_record(obj, line=n, path=str(p))
            except RecordError as exc:
                if not skip_invalid:
                    raise
                if on_skip is None:
                    raise RecordError("skip_invalid needs an on_skip callback so skipped lines are reported",
                                      path=str(p), line=n) from exc
                on_skip(exc)


def load_records(path: str | Path, **kwargs: Any) -> list[Record]:
    return list(iter_records(path, **kwargs))


def render(record: Record, tokenizer: Any, *, max_tokens: int | None = None) -> Rendered:
    """Tokenize a record; ``messages`` go through the chat template."""
    if record.text is not None:
        ids = tokenizer(record.text, add_special_tokens=True)["input_ids"]
        n_prompt = len(ids)
    else:
        msgs = list(record.messages or ())
        if msgs[-1]["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(msgs, tokenize=False)
            if not full.startswith(prompt):  # templates that rewrite earlier turns: fall back to a split
                prompt, full = full[: full.rfind(msgs[-1]["content"])], full
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            c_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
            ids, n_prompt = p_ids + c_ids, len(p_ids)
        else:
            prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            n_prompt = len(ids)
    if max_tokens is not None and len(ids) > max_tokens:
        prompt_ids, completion_ids = ids[:n_prompt], ids[n_prompt:]
        if not completion_ids:
            ids, n_prompt = prompt_ids[:max_tokens], max_tokens
        else:  # keep the reply, and the end of the prompt closest to it
            completion_ids = completion_ids[: max_tokens - min(n_prompt, max_tokens // 2)]
            keep = max_tokens - len(completion_ids)
            prompt_ids = prompt_ids[len(prompt_ids) - keep:] if keep else []
            ids, n_prompt = prompt_ids + completion_ids, len(prompt_ids)
    return Rendered(list(ids), n_prompt)


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
