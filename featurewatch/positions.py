"""Which tokens a forward pass adds: their run, position, phase, and whether detectors read them.

The readout and detection work on *flat* token batches: every new token of a
forward pass is one row of a ``(n_tokens, d)`` tensor, described by a
:class:`StepTokens` (its run, position, phase, token id, and whether it is
read). Hugging Face hands the hooks ``(batch, seq, d)`` tensors; vLLM hands
``(num_tokens, d)`` with all requests flattened together. Both become the same
:class:`StepTokens`, so the maths after this module does not care which engine
ran.

:class:`PositionTracker` builds them for Hugging Face models. A forward
pre-hook tells it each call's ``input_ids`` / ``attention_mask``: at prefill
every position is new; with a KV cache each decode step adds one; with the
cache off the model sees the whole sequence again and only its tail is new.

A token is *read* (by detectors, evidence and statistics) unless it is
padding, a special token (chat markers), the first real token of its row (the
attention sink, whose norm is tens of times the median), or outside the
content mask the renderer gave (chat markup, role names, the system prompt).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def first_real(attention_mask: Tensor | None, batch_size: int) -> Tensor:
    """Position of each row's first real token ``(batch,)`` — the attention sink (left padding aware)."""
    if attention_mask is None:
        return torch.zeros(batch_size, dtype=torch.long)
    return attention_mask.detach().cpu().long().argmax(dim=1)


def excluded(token_ids: Tensor, positions: Tensor, sink: Tensor, special: Collection[int],
             attention_mask: Tensor | None = None) -> Tensor:
    """The one exclusion rule, ``(batch, n)`` bool: special tokens, padding and the attention sink.

    ``token_ids`` ``(batch, n)`` at ``positions`` ``(n,)``; ``sink`` ``(batch,)`` each row's first real
    position; ``attention_mask`` ``(batch, n)`` for the same window. These tokens carry norms tens of
    times the median (or are not text at all), so nothing — detection, statistics, SAE training,
    steering — reads them.
    """
    # a set lookup, not torch.isin: a few ids per decode step, and no kernel launch
    out = torch.tensor([i in special for i in token_ids.flatten().tolist()], dtype=torch.bool).view(token_ids.shape)
    out |= positions.unsqueeze(0) == sink.unsqueeze(1)
    if attention_mask is not None:
        out |= attention_mask == 0
    return out


def excluded_positions(input_ids: Tensor, attention_mask: Tensor | None, special_ids: Sequence[int]) -> Tensor:
    """:func:`excluded` for whole sequences ``(batch, seq)`` (offline work: training, calibration)."""
    ids = input_ids.detach().cpu()
    mask = attention_mask.detach().cpu() if attention_mask is not None else None
    out = excluded(ids, torch.arange(ids.shape[1]), first_real(mask, ids.shape[0]), frozenset(special_ids), mask)
    return out.to(input_ids.device)


@dataclass(frozen=True)
class StepTokens:
    """The tokens one forward pass adds, flattened: row ``i`` of every tensor is one token.

    Rows are grouped by run, runs in order, each run's tokens in position order:
    ``counts[r]`` consecutive rows belong to run ``r``. Consumers split by ``counts``
    (views) instead of selecting each run with a mask.
    """

    run: Tensor  # (n,) long: which run (batch row / request) the token belongs to
    position: Tensor  # (n,) long: its position in that run
    completion: Tensor  # (n,) bool: the phase, False = prompt, True = completion
    read: Tensor  # (n,) bool: detectors, evidence and statistics read it
    steerable: Tensor  # (n,) bool: interventions may change it (not padding, special or the sink)
    token_id: Tensor  # (n,) long: -1 where the model was given embeddings
    counts: tuple[int, ...] = ()  # tokens of each run, in run order (default: counted from ``run``)

    def __post_init__(self) -> None:
        if not self.counts and self.run.numel():
            object.__setattr__(self, "counts", tuple(torch.bincount(self.run).tolist()))

    def __len__(self) -> int:
        return int(self.run.numel())


class PositionTracker:
    """Turns the inputs of each Hugging Face forward call of one session into :class:`StepTokens`.

    ``n_prompt[r]``: how many leading positions of row ``r`` are prompt (default: the whole
    first call). ``content[r]``: the renderer's content mask of row ``r``'s prompt positions
    (aligned with ``input_ids``, padding included); positions past it are content unless special.

    It runs once per forward pass, so what does not change between passes (the run index,
    the prompt lengths, the attention sinks' positions) is computed once, and the checks
    that cannot apply to a pass (the sink, the content mask and the prompt boundary during
    decode) are skipped by comparing plain integers.
    """

    def __init__(self, batch_size: int, special_ids: Sequence[int], *, n_prompt: Sequence[int] | None = None,
                 content: Sequence[Sequence[bool]] | None = None) -> None:
        self.batch_size = batch_size
        self.special = frozenset(int(i) for i in special_ids)
        self.n_prompt = list(n_prompt) if n_prompt is not None else None
        self.content = None
        if content is not None:
            width = max((len(c) for c in content), default=0)
            self.content = torch.ones(batch_size, width, dtype=torch.bool)
            for r, row in enumerate(content):
                self.content[r, :len(row)] = torch.tensor(list(row), dtype=torch.bool)
        self.n_seen = 0
        self.first_real: Tensor | None = None
        self.last: StepTokens | None = None
        self.n_new = 0
        self._last_sink = -1  # the largest attention-sink position (plain int: decode steps skip the check)
        self._n_prompt_t: Tensor | None = None  # (batch, 1)
        self._runs: dict[int, Tensor] = {}  # n_new -> (batch · n_new,) run index

    def _set_first_real(self, first_real: Tensor) -> None:
        self.first_real = first_real
        self._last_sink = int(first_real.max()) if first_real.numel() else -1

    def step(self, input_ids: Tensor | None, attention_mask: Tensor | None, length: int) -> StepTokens:
        """Register one forward call whose inputs are ``length`` positions long; return its new tokens."""
        start = self.n_seen
        n_new = length if start == 0 or length <= start else length - start
        end = start + n_new
        b = self.batch_size
        if input_ids is not None:
            new_ids = input_ids[:, -n_new:].detach().to("cpu", torch.long)
        else:
            new_ids = torch.full((b, n_new), -1, dtype=torch.long)
        positions = torch.arange(start, end)
        mask = attention_mask.detach().cpu() if attention_mask is not None else None
        if self.first_real is None:
            self._set_first_real(first_real(mask, b))
        assert self.first_real is not None
        window = mask[:, start:end] if mask is not None else None
        out = excluded(new_ids, positions, self.first_real, self.special, window)
        steerable = ~out
        if self.content is not None and start < self.content.shape[1]:
            content = self.content[:, start:end]
            out[:, :content.shape[1]] |= ~content
        if self.n_prompt is None:
            self.n_prompt = [end] * b
        if self._n_prompt_t is None:
            self._n_prompt_t = torch.tensor(self.n_prompt).unsqueeze(1)
        if start >= max(self.n_prompt):
            completion = torch.ones(b * n_new, dtype=torch.bool)
        elif end <= min(self.n_prompt):
            completion = torch.zeros(b * n_new, dtype=torch.bool)
        else:
            completion = (positions.unsqueeze(0) >= self._n_prompt_t).flatten()
        run = self._runs.get(n_new)
        if run is None:
            run = self._runs[n_new] = torch.arange(b).repeat_interleave(n_new)
        self.n_seen = end
        self.n_new = n_new
        self.last = StepTokens(
            run=run,
            position=positions.repeat(b) if b > 1 else positions,
            completion=completion,
            read=(~out).flatten(),
            steerable=steerable.flatten(),
            token_id=new_ids.flatten(),
            counts=(n_new,) * b,
        )
        return self.last
