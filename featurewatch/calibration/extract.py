"""Per-token residual activations for labelled records, cached for calibration.

Discovery and calibration fit on *pooled* activations, but SAE features are a
non-linear function of each token's residual, so the cache keeps every kept
token's residual (fp16) with its phase; pooled SAE features and pooled
residuals (for probes) are derived from it cheaply and exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..hooks import forward_until
from ..positions import excluded_positions
from ..records import Record, pad_right, render
from ..sae import SparseAutoencoder


@dataclass
class TokenActs:
    """Residuals of kept tokens for a list of records."""

    acts: Tensor  # (n_tokens, d_model) fp16
    offsets: Tensor  # (n_records + 1,) token offsets per record
    completion: Tensor  # (n_tokens,) bool: token is in the completion phase
    ids: list[str]

    def save(self, path: Path) -> None:
        torch.save({"acts": self.acts, "offsets": self.offsets, "completion": self.completion,
                    "ids": self.ids}, path)

    @classmethod
    def load(cls, path: Path) -> "TokenActs":
        d = torch.load(path, weights_only=True)
        return cls(d["acts"], d["offsets"], d["completion"], list(d["ids"]))

    def pooled(self, phase: str | None, encode: SparseAutoencoder | None = None,
               chunk: int = 8192) -> tuple[Tensor, Tensor]:
        """Mean over each record's tokens of ``phase`` (None = all) of residuals, or of SAE features.

        Returns ``(pooled (n_records, width), has_tokens (n_records,) bool)``.
        """
        n = len(self.ids)
        width = encode.d_sae if encode is not None else self.acts.shape[1]
        sums = torch.zeros(n, width)
        counts = torch.zeros(n)
        record_of = torch.repeat_interleave(torch.arange(n), self.offsets.diff())
        select = torch.ones_like(self.completion) if phase is None else (
            self.completion if phase == "completion" else ~self.completion)
        for s in range(0, self.acts.shape[0], chunk):
            x = self.acts[s:s + chunk].float()
            keep = select[s:s + chunk]
            values = encode.encode(x) if encode is not None else x
            sums.index_add_(0, record_of[s:s + chunk][keep], values[keep])
            counts.index_add_(0, record_of[s:s + chunk][keep], torch.ones(int(keep.sum())))
        has = counts > 0
        return sums / counts.clamp_min(1).unsqueeze(1), has


@torch.inference_mode()
def extract(model: Any, tokenizer: Any, records: list[Record], hookpoint: str, *, max_tokens: int = 256,
            batch_size: int = 16, progress: Any = None) -> TokenActs:
    """Run records up to ``hookpoint`` and keep the residual of every token a detector reads."""
    rendered = [render(r, tokenizer, max_tokens=max_tokens) for r in records]
    order = sorted(range(len(records)), key=lambda i: len(rendered[i].ids))  # less padding
    per_record: list[tuple[Tensor, Tensor]] = [None] * len(records)  # type: ignore[list-item]
    bar = progress(total=len(records), desc="extract", unit="rec") if progress else None
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = pad_right([rendered[i].ids for i in idx], tokenizer.pad_token_id)
        acts = forward_until(model, ids, mask, [hookpoint])[hookpoint].float()
        drop = excluded_positions(ids, mask, tokenizer.all_special_ids)
        for row, i in enumerate(idx):
            content = torch.tensor(rendered[i].content, dtype=torch.bool)
            keep = ~drop[row]
            keep[: content.numel()] &= content  # detectors read message contents only, never markup
            positions = keep.nonzero().flatten()
            per_record[i] = (acts[row, keep], positions >= rendered[i].n_prompt)
        if bar:
            bar.update(len(idx))
    if bar:
        bar.close()
    lengths = torch.tensor([a.shape[0] for a, _ in per_record])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return TokenActs(_compact(torch.cat([a for a, _ in per_record])), offsets,
                     torch.cat([c for _, c in per_record]), [r.id for r in records])


FP16_MAX = float(torch.finfo(torch.float16).max)


def _compact(acts: Tensor) -> Tensor:
    """fp16 where every value fits it, else fp32: Gemma 3's massive activations (a few tokens a
    thousand, one residual dimension past 65,504) would become inf in fp16, and NaN features after."""
    return acts.half() if acts.numel() == 0 or float(acts.abs().max()) <= FP16_MAX else acts
