"""Monitored generation: prompts → tokens (with the content mask) → ``model.generate`` inside a session.

Prompts are rendered by the same code as scored records
(:func:`~featurewatch.records.render_chat`), so live and offline scores agree,
and left-padded here per call: the shared tokenizer is never mutated, so
concurrent calls cannot change each other's padding. A ``block`` action stops
the batch row through a stopping criterion right after the forward pass that
fired it: no further decode step runs for that row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .alert import Alert, RunResult
from .errors import ConfigError, GenerationBlocked
from .intervention import Intervention
from .models import context_length
from .records import ROLES, Rendered, render_chat, render_text
from .session import Session, SessionHost, TokenReading

Prompt = str | Sequence[Mapping[str, str]]


@dataclass
class GenerationResult:
    """One monitored generation: the text, and the run the monitor saw (``run``)."""

    run: RunResult
    prompt: str
    """The prompt as the model read it (chat template applied)."""
    text: str
    token_ids: list[int]
    session: Session
    row: int = 0

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def alerts(self) -> list[Alert]:
        return self.run.alerts

    @property
    def scores(self) -> dict[str, float]:
        return self.run.scores

    @property
    def phase_scores(self) -> dict[str, dict[str, float]]:
        return self.run.phase_scores

    @property
    def outcome(self) -> str:
        return self.run.outcome

    @property
    def degraded(self) -> bool:
        return self.run.degraded

    def readings(self, hookpoint: str | None = None) -> list[TokenReading]:
        """Token-by-token readings (prompt and completion) at a hookpoint (the first by default)."""
        return self.session.readings(self.row, hookpoint)


class StopBlocked:
    """A stopping criterion for ``model.generate``: a batch row stops right after the forward pass
    where a ``block`` alert blocked its run (no further decode step runs for it)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        return torch.tensor([row.blocked for row in self.session.rows], device=input_ids.device)


def count_generated(session: Session, sequences: Any, width: int, tokenizer: Any) -> None:
    """Note each run's generated tokens (up to and with its first end-of-sequence token) in its state."""
    sequences = sequences.sequences if hasattr(sequences, "sequences") else sequences
    eos = getattr(tokenizer, "eos_token_id", None)
    for r, row in enumerate(session.rows):
        new = sequences[r, width:].tolist()
        row.generated = new.index(eos) + 1 if eos in new else len(new)


def generation_results(session: Session, prompts: Sequence[Sequence[int]], sequences: Tensor, width: int,
                       tokenizer: Any) -> list[GenerationResult]:
    """One :class:`GenerationResult` per batch row of a monitored ``generate``: ``prompts`` are the rows'
    prompt ids (without padding), ``sequences`` what ``generate`` returned, its new tokens from ``width`` on."""
    results = []
    for r, prompt in enumerate(prompts):
        new = sequences[r, width:].tolist()
        results.append(GenerationResult(run=session.result(r), prompt=tokenizer.decode(list(prompt)),
                                        text=tokenizer.decode(new, skip_special_tokens=True), token_ids=new,
                                        session=session, row=r))
    return results


def blocked_error(blocked: GenerationResult, results: Sequence[GenerationResult]) -> GenerationBlocked:
    """The :class:`GenerationBlocked` of a blocked run: its first ``block`` alert, and the call's results."""
    first = next(a for a in blocked.alerts if a.action == "block" and not a.would_block)  # not one in shadow
    return GenerationBlocked(first, list(results))


def render_prompt(prompt: Prompt, tokenizer: Any, *, chat: bool = True) -> Rendered:
    """Tokenize one prompt: a string (through the chat template when ``chat``), or chat messages."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ConfigError("empty prompt: give some text, or chat messages")
        if chat and getattr(tokenizer, "chat_template", None):
            return render_chat([{"role": "user", "content": prompt}], tokenizer)
        return render_text(prompt, tokenizer)
    if not isinstance(prompt, Sequence) or not prompt:
        raise ConfigError(f"a prompt is a string or a non-empty list of chat messages, got {prompt!r}")
    messages = []
    for i, m in enumerate(prompt):
        if not isinstance(m, Mapping) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise ConfigError(f"message {i} is {m!r}: each message is {{'role': one of {', '.join(ROLES)}, "
                              "'content': a string}")
        messages.append({"role": str(m["role"]), "content": str(m["content"])})
    if messages[-1]["role"] == "assistant":
        raise ConfigError("the last message is the assistant's: generate() writes the next assistant turn, so end "
                          "with a user message (to score a finished reply, use score_records)")
    if not any(m["content"].strip() for m in messages if m["role"] != "system"):
        raise ConfigError("the messages have no user or assistant text")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("chat messages need a tokenizer with a chat template; pass a string and chat=False")
    return render_chat(messages, tokenizer)


def check_context(model: Any, n_prompt: int, max_new_tokens: int) -> None:
    """A :class:`ConfigError` when a prompt of ``n_prompt`` tokens and ``max_new_tokens`` do not fit the model's
    context (:func:`~featurewatch.models.context_length`; no limit when its config does not say)."""
    context = context_length(model)
    if context is not None and n_prompt + max_new_tokens > context:
        raise ConfigError(f"the prompt is {n_prompt} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                          f"model's context of {context} tokens: shorten the prompt or lower max_new_tokens")


def _left_pad(rendered: Sequence[Rendered], pad_id: int) -> tuple[Tensor, Tensor, list[list[bool]]]:
    width = max(len(r.ids) for r in rendered)
    ids = torch.full((len(rendered), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rendered), width), dtype=torch.long)
    content = []
    for i, r in enumerate(rendered):
        n = len(r.ids)
        ids[i, width - n:] = torch.tensor(r.ids, dtype=torch.long)
        mask[i, width - n:] = 1
        content.append([False] * (width - n) + list(r.content))
    return ids, mask, content


def generate_batch(monitor: SessionHost, prompts: Sequence[Prompt], *, max_new_tokens: int = 64, chat: bool = True,
                   top_features: int = 0, raise_on_block: bool = True,
                   interventions: Sequence[Intervention] = (), streamer: Any = None,
                   run_ids: Sequence[str] | None = None, shadow: Sequence[str] = (),
                   **generate_kwargs: Any) -> list[GenerationResult]:
    """Generate for several prompts at once (left padding, KV cache), monitored. See :meth:`Monitor.generate`.

    ``run_ids``: the runs' ids (e.g. a caller's trace ids), one per prompt; random by default.
    ``shadow``: detectors whose ``block`` only marks its alert ``would_block`` in this call.
    A ``stopping_criteria`` in ``generate_kwargs`` is kept, next to the monitor's own.
    """
    from transformers import StoppingCriteriaList

    tok = monitor.tokenizer
    if tok is None:
        raise ConfigError("generate() needs the tokenizer; pass it to Monitor(model, tokenizer, ...)")
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ConfigError("generate_batch() takes a non-empty list of prompts")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens}; it must be at least 1")
    rendered = [render_prompt(p, tok, chat=chat) for p in prompts]
    check_context(monitor.model, max(len(r.ids) for r in rendered), max_new_tokens)
    ids, mask, content = _left_pad(rendered, tok.pad_token_id)
    width = ids.shape[1]
    session = monitor.session(len(prompts), top_features=top_features, n_prompt=[width] * len(prompts),
                              content=content, interventions=interventions, run_ids=run_ids, shadow=shadow)
    criteria = StoppingCriteriaList([StopBlocked(session), *(generate_kwargs.pop("stopping_criteria", None) or [])])
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("pad_token_id", tok.pad_token_id)
    device = next(monitor.model.parameters()).device
    # inference mode, not generate()'s own no_grad: no version counters or view tracking on the
    # many small tensors of a decode step (≈ 4 % of a batch-1 step on the embedded model)
    with session, torch.inference_mode():
        generate: Any = monitor.model.generate  # nn.Module's stub does not know generate()
        out = generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                       streamer=streamer, stopping_criteria=criteria, **generate_kwargs)
        count_generated(session, out, width, tok)  # before the runs close: their results carry it
    results = generation_results(session, [r.ids for r in rendered], out, width, tok)
    blocked = next((res for res in results if res.outcome == "blocked"), None)
    if raise_on_block and blocked is not None:
        raise blocked_error(blocked, results)
    return results
