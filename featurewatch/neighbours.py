"""Feature neighbourhoods: the features nearest to one, by decoder direction and by co-activation, and their map.

Scaling Monosemanticity found features in neighbourhoods: the Golden Gate
Bridge feature's nearest were Alcatraz, Ghirardelli Square, the Presidio; the
scam feature sat near other fraud and deception features. A person checking
whether a detector's features mean what their labels say wants to see the
neighbours: is this one of a cluster, and did the readout pick the generic
member of it?

* **decoder cosine** — the cosine similarity of decoder rows ``W_dec[i]``: the
  directions features write into the residual stream. Needs only the SAE.
* **co-activation** — on a corpus, the Jaccard index of the token sets where two
  features fire (``|both| / |either|``), over content tokens (padding, special
  tokens and the attention sink left out). Needs the model.
* **map** — a 2-D picture of a neighbourhood: the first two principal components
  of the unit decoder directions of a feature and its neighbours, points labelled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._plot import pyplot
from .hooks import forward_until
from .positions import excluded_positions
from .records import Record, pad_right, render
from .sae import SparseAutoencoder, check_feature_ids

if TYPE_CHECKING:
    from .pack import Pack


@dataclass(frozen=True)
class Neighbour:
    """One feature near another, and how near (a cosine, or a Jaccard index)."""

    feature: int
    similarity: float
    both: int | None = None
    """co-activation only: the tokens where both fire."""


def unit_directions(sae: SparseAutoencoder) -> torch.Tensor:
    """Decoder rows scaled to unit length ``(d_sae, d_in)`` (a dead feature's zero row stays zero)."""
    w = sae.W_dec.detach().float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def decoder_neighbours(sae: SparseAutoencoder, feature: int, k: int) -> list[Neighbour]:
    """The ``k`` features whose decoder directions are nearest to ``feature``'s, by cosine."""
    _check(sae, [feature])
    unit = unit_directions(sae)
    cos = unit @ unit[feature]
    cos[feature] = -float("inf")
    top = torch.topk(cos, min(k, sae.d_sae - 1))
    return [Neighbour(int(i), round(float(c), 4)) for c, i in zip(top.values, top.indices)]


@torch.inference_mode()
def coactivation_neighbours(model: Any, tokenizer: Any, sae: SparseAutoencoder, hookpoint: str,
                            records: Sequence[Record], features: Sequence[int], k: int, *, batch_size: int = 8,
                            max_tokens: int = 256, progress: Callable[..., Any] | None = None
                            ) -> dict[int, list[Neighbour]]:
    """Per feature, the ``k`` features that fire on the most similar set of tokens (Jaccard) in ``records``."""
    _check(sae, features)
    fired_any = torch.zeros(sae.d_sae, dtype=torch.long)
    both = {f: torch.zeros(sae.d_sae, dtype=torch.long) for f in features}
    bar = progress(total=len(records), desc="co-activation", unit="rec") if progress else None
    device = sae.W_enc.device
    for start in range(0, len(records), batch_size):
        rows = [render(r, tokenizer, max_tokens=max_tokens).ids for r in records[start:start + batch_size]]
        ids, mask = pad_right(rows, tokenizer.pad_token_id)
        x = forward_until(model, ids.to(device), mask.to(device), [hookpoint])[hookpoint].float()
        keep = ~excluded_positions(ids, mask, tokenizer.all_special_ids)
        fired = sae.encode(x.to(device))[keep.to(device)].cpu() > 0  # (content tokens, d_sae)
        fired_any += fired.sum(0)
        for f in features:
            both[f] += fired[fired[:, f]].sum(0)
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    out = {}
    for f in features:
        union = (fired_any + fired_any[f] - both[f]).clamp_min(1)
        jaccard = both[f].float() / union.float()
        jaccard[f] = -1.0
        top = torch.topk(jaccard, min(k, sae.d_sae - 1))
        out[f] = [Neighbour(int(i), round(float(j), 4), int(both[f][i])) for j, i in zip(top.values, top.indices)
                  if j > 0]
    return out


def describe(pack: Pack, hookpoint: str, n: Neighbour, kind: str) -> dict[str, Any]:
    """A neighbour as people and programs read it: id, similarity, name (``#id label``, or the tokens it fires on
    when it has no label), label, density, top context."""
    from .display import feature_name

    info = pack.features.get(hookpoint, {}).get(n.feature)
    row: dict[str, Any] = {"feature": n.feature, kind: n.similarity,
                           "name": feature_name(pack, hookpoint, n.feature, 80)}
    if n.both is not None:
        row["tokens_both"] = n.both
    row.update(label=info.label if info else None, density=info.density if info else None,
               top_context=info.top_contexts[0] if info and info.top_contexts else None)
    return row


def projection(sae: SparseAutoencoder, features: Sequence[int]) -> torch.Tensor:
    """2-D coordinates ``(len(features), 2)``: the first two principal components of their unit decoder directions."""
    _check(sae, features)
    x = unit_directions(sae)[list(features)]
    x = x - x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    xy = x @ v[:2].T
    return torch.nn.functional.pad(xy, (0, 2 - xy.shape[1])) if xy.shape[1] < 2 else xy


def draw_map(sae: SparseAutoencoder, feature: int, neighbours: Sequence[Neighbour], labels: dict[int, str],
             path: str | Path, *, title: str = "") -> Path:
    """Write a PNG of ``feature`` and its neighbours in the plane of their decoder directions (needs matplotlib)."""
    plt = pyplot("--map")
    ids = [feature, *(n.feature for n in neighbours)]
    xy = projection(sae, ids).numpy()
    sims = [n.similarity for n in neighbours]
    fig, ax = plt.subplots(figsize=(7.2, 5.4), dpi=100)
    if neighbours:
        points = ax.scatter(xy[1:, 0], xy[1:, 1], c=sims, cmap="viridis", s=60, zorder=2)
        fig.colorbar(points, ax=ax, label=f"decoder cosine with #{feature}")
    ax.scatter(xy[:1, 0], xy[:1, 1], s=140, color="tab:red", edgecolors="black", zorder=3)
    for (x, y), f in zip(xy, ids):
        text = labels.get(f) or ""
        ax.annotate(f"#{f} {text[:38]}".strip(), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7,
                    fontweight="bold" if f == feature else "normal")
    ax.margins(x=0.35, y=0.15)  # room for the labels right of the points
    ax.set_xlabel("PC 1 of the decoder directions")
    ax.set_ylabel("PC 2")
    ax.grid(alpha=0.3)
    ax.set_title(title or f"feature #{feature} and its {len(neighbours)} nearest by decoder cosine", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def _check(sae: SparseAutoencoder, features: Sequence[int]) -> None:
    check_feature_ids(sae, features)
