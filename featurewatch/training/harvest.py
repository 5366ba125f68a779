"""Harvesting activations from a corpus for SAE training.

Records are rendered (chat template for ``messages``), batched, and run only
up to the hookpoint. Positions that are attention sinks (first token, special
tokens) or extreme-norm outliers are dropped, since an SAE spends capacity on
them and detectors exclude them anyway. Activations are cached as fp16 shards
so an interrupted harvest resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor

from ..hooks import forward_until
from ..positions import excluded_positions
from ..records import Record, pad_right, render

logger = logging.getLogger(__name__)


def is_held_out(record_id: str, fraction: float = 0.05) -> bool:
    """Deterministic split by id hash: the same record is held out on every machine."""
    digest = hashlib.sha256(record_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def in_chat_wrappers(records: list[Record], fraction: float, *, seed: int = 0) -> list[Record]:
    """Documents (``text`` records) put inside a chat, a ``fraction`` of them chosen by hash of id.

    A chosen document becomes, again by hash, either a user message quoting it or the assistant's
    reply to a neutral request (calibration.wrappers' ``quoted`` and ``reply``), so features see
    the same kind of text as a document, as something a user brings, and as something the model
    writes. Chats are kept as they are.
    """
    from ..calibration.wrappers import wrap

    if fraction <= 0:
        return records
    out = []
    for r in records:
        h = hashlib.sha256(f"wrap{seed}:{r.id}".encode()).digest()
        if r.text is None or int.from_bytes(h[:4], "big") / 2**32 >= fraction:
            out.append(r)
            continue
        wrapped = wrap({"id": r.id, "text": r.text}, ["quoted" if h[4] % 2 else "reply"])[0]
        out.append(Record(r.id, None, tuple(wrapped["messages"]), r.extra, r.line))
    return out


def batches(records: Iterable[Record], tokenizer: Any, *, ctx: int, batch_size: int,
            seed: int) -> Iterator[list[list[int]]]:
    """Token-id rows (up to ``ctx`` tokens each) in a seeded shuffled order, grouped in batches."""
    rows = [render(r, tokenizer, max_tokens=ctx).ids for r in records]
    random.Random(seed).shuffle(rows)
    for i in range(0, len(rows), batch_size):
        yield rows[i:i + batch_size]


def kept_activations(model: Any, tokenizer: Any, rows: list[list[int]], hookpoint: str,
                     *, outlier_factor: float = 10.0) -> tuple[Tensor, Tensor, Tensor]:
    """Activations at non-excluded positions ``(n, d_model)`` plus their (row, position) indices."""
    ids, mask = pad_right(rows, tokenizer.pad_token_id)
    acts = forward_until(model, ids, mask, [hookpoint])[hookpoint].float()
    drop = excluded_positions(ids, mask, tokenizer.all_special_ids)
    norms = acts.norm(dim=-1)
    median = norms[~drop].median() if (~drop).any() else norms.median()
    drop |= norms > outlier_factor * median
    keep = ~drop
    r, p = keep.nonzero(as_tuple=True)
    return acts[keep], r, p


def harvest(model: Any, tokenizer: Any, records: list[Record], hookpoint: str, out_dir: Path, *,
            max_tokens: int, ctx: int = 256, batch_size: int = 32, shard_tokens: int = 200_000,
            seed: int = 0, progress: Any = None) -> Tensor:
    """Collect up to ``max_tokens`` activations (fp16) into ``out_dir``; resumes from saved shards."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = sorted(out_dir.glob("shard-*.pt"))
    have = sum(torch.load(s, weights_only=True).shape[0] for s in shards)
    done_batches = len(shards) and torch.load(out_dir / "progress.pt", weights_only=True)["batches"]
    pending: list[Tensor] = []
    pending_n = 0
    bar = progress(total=max_tokens, initial=min(have, max_tokens), desc="harvest", unit="tok") if progress else None
    for b, rows in enumerate(batches(records, tokenizer, ctx=ctx, batch_size=batch_size, seed=seed)):
        if b < done_batches:
            continue
        if have + pending_n >= max_tokens:
            break
        acts, _, _ = kept_activations(model, tokenizer, rows, hookpoint)
        pending.append(acts.half())
        pending_n += acts.shape[0]
        if bar:
            bar.update(acts.shape[0])
        if pending_n >= shard_tokens:
            torch.save(torch.cat(pending), out_dir / f"shard-{len(shards):04d}.pt")
            shards.append(out_dir / f"shard-{len(shards):04d}.pt")
            torch.save({"batches": b + 1}, out_dir / "progress.pt")
            have, pending, pending_n = have + pending_n, [], 0
    if pending:
        torch.save(torch.cat(pending), out_dir / f"shard-{len(shards):04d}.pt")
        shards.append(out_dir / f"shard-{len(shards):04d}.pt")
        torch.save({"batches": 10**9}, out_dir / "progress.pt")
    if bar:
        bar.close()
    return torch.cat([torch.load(s, weights_only=True) for s in shards])[:max_tokens]
