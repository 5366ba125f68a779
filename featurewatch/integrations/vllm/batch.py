"""vLLM's flattened batches → :class:`~featurewatch.positions.StepTokens`, and the content mask of a prompt.

vLLM runs every scheduled request through one forward pass: a decoder layer
sees ``(num_tokens, d)`` with request ``i``'s tokens in rows
``query_start_loc[i] : query_start_loc[i + 1]`` (in the runner's
``input_batch.req_ids`` order), prefill chunks and decode tokens mixed. Rows
past ``query_start_loc[-1]`` are padding. This module turns that layout into
the same flat :class:`StepTokens` the Hugging Face path builds, so the readout
and detection code after it is shared.

vLLM hands the worker token ids only, not chat messages, so which prompt
tokens are message *content* (what detectors read) is recovered from the ids
(:class:`ContentMasker`): the chat template is probed once to learn its turn
marker, and each turn's header (the role name line) and every system turn are
left out, as :func:`featurewatch.records.render_chat` leaves them out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...positions import StepTokens, excluded

logger = logging.getLogger(__name__)

_PROBE = "Zqxv probe text"
_CONTENT_ROLES = ("user", "assistant")


@dataclass(frozen=True)
class Scheduled:
    """One request's part of a forward pass: rows ``[start, stop)`` of the flat batch."""

    run: int  # index of the request's RunState in the step's run list
    start: int
    stop: int
    n_prompt: int  # prompt length: positions below it are the prompt phase
    content: Sequence[bool] | None  # content mask of the prompt positions (None: all content)


def step_tokens(scheduled: Sequence[Scheduled], positions: Tensor, token_ids: Tensor,
                special: Tensor) -> StepTokens:
    """The :class:`StepTokens` of a forward pass's real rows (``positions``/``token_ids``: ``(num_tokens,)``)."""
    runs, rows, n_prompt, content_rows = [], [], [], []
    for s in scheduled:
        n = s.stop - s.start
        runs.append(torch.full((n,), s.run, dtype=torch.long))
        rows.append(torch.arange(s.start, s.stop))
        n_prompt.append(torch.full((n,), s.n_prompt, dtype=torch.long))
        pos = positions[s.start:s.stop].tolist()
        mask = s.content
        content_rows.append(torch.tensor([True if mask is None or p >= len(mask) else bool(mask[p]) for p in pos],
                                         dtype=torch.bool))
    if not rows:
        empty = torch.zeros(0, dtype=torch.long)
        return StepTokens(empty, empty, empty.bool(), empty.bool(), empty.bool(), empty)
    index = torch.cat(rows)
    position = positions.detach().cpu().long()[index]
    ids = token_ids.detach().cpu().long()[index]
    # the one exclusion rule; a request's attention sink is position 0 (vLLM pads no request)
    steerable = ~excluded(ids.unsqueeze(0), position, torch.zeros(1, dtype=torch.long), special)[0]
    return StepTokens(run=torch.cat(runs), position=position, completion=position >= torch.cat(n_prompt),
                      read=steerable & torch.cat(content_rows), steerable=steerable, token_id=ids)


class ContentMasker:
    """Recovers the content mask of a chat prompt from its token ids, for templates with a turn marker.

    The template is probed once: a one-message chat is rendered, and the special token
    right before the role name is the turn marker (``<|im_start|>`` in ChatML). In a
    prompt, the tokens after a turn marker up to the first newline are the header
    (``user⏎``): not content, and they name the role; only the bodies of user and assistant
    turns are content (not a system turn, nor text between turns), stripped of whitespace-only
    tokens at either end. Special tokens never are. A prompt without turn markers is a plain
    document: all content but special tokens. A template without a recognisable turn
    marker falls back to that too, logged once (scores then include chat markup that
    :func:`~featurewatch.records.render_chat` would leave out).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.turn_marker = self._probe()

    def _probe(self) -> int | None:
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            return None
        try:
            ids = tok.apply_chat_template([{"role": "user", "content": _PROBE}], tokenize=True,
                                          add_generation_prompt=False)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            ids = list(ids)
            pieces = [tok.decode([i]) for i in ids]
            # the probe's first token, and the last special token before it
            at = next(i for i in range(len(ids)) if _PROBE[:2] in "".join(pieces[:i + 1]))
            marker = max(i for i in range(at) if ids[i] in self.special)
        except (StopIteration, ValueError, TypeError, KeyError):
            marker, pieces, at = None, [], 0
        if marker is None or "user" not in "".join(pieces[marker + 1:at]):
            logger.warning("featurewatch: the chat template has no turn marker featurewatch recognises; detectors "
                           "read chat markup and system prompts too (scores differ from the transformers monitor)")
            return None
        return int(ids[marker])

    def mask(self, ids: Sequence[int]) -> list[bool]:
        """Per token of a prompt: is it message content a detector reads?"""
        if self.turn_marker is None or self.turn_marker not in ids:
            return [i not in self.special for i in ids]
        out: list[bool] = []
        role: str | None = None
        header: list[int] | None = None
        body: list[int] = []  # positions of the current turn's body
        for pos, i in enumerate(ids):
            if i in self.special:  # a turn ends at the next special token; a marker opens the next
                self._strip(ids, body, out)
                out.append(False)
                role, header, body = None, ([] if i == self.turn_marker else None), []
                continue
            if header is not None:
                header.append(i)
                out.append(False)
                if "\n" in self.tokenizer.decode([i]):
                    role = self.tokenizer.decode(header).strip().lower()
                    header = None
                continue
            out.append(role in _CONTENT_ROLES)
            body.append(pos)
        self._strip(ids, body, out)
        return out

    def _strip(self, ids: Sequence[int], body: list[int], out: list[bool]) -> None:
        # render_chat's spans are the stripped message: whitespace-only tokens at either end are not content
        for seq in (body, body[::-1]):
            for pos in seq:
                if self.tokenizer.decode([ids[pos]]).strip():
                    break
                out[pos] = False
