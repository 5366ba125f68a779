"""vLLM's flattened batches → :class:`~featurewatch.positions.StepTokens`, and the content mask of a prompt.

vLLM runs every scheduled request through one forward pass: a decoder layer
sees ``(num_tokens, d)`` with request ``i``'s tokens in rows
``query_start_loc[i] : query_start_loc[i + 1]`` (in the runner's
``input_batch.req_ids`` order), prefill chunks and decode tokens mixed. Rows
past ``query_start_loc[-1]`` are padding. This module turns that layout into
the same flat :class:`StepTokens` the Hugging Face path builds, so the readout
and detection code after it is shared.

vLLM hands the worker token ids only, not chat messages, so which prompt
tokens are message *content* (what detectors read) is recovered from the ids by
:class:`featurewatch.markup.ChatMarkup`, which also finds chat markup a client
typed into a message (``markup-injection``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ...positions import StepTokens, excluded


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
