"""BatchTopK SAE training, sized for a CPU budget.

Why BatchTopK (Bussmann et al., 2024) rather than ReLU + L1: it hits a chosen
L0 directly (no L1 coefficient to sweep, which a CPU budget cannot afford), it
does not shrink activations, and with an AuxK loss it keeps dead latents rare
even on a short run. At export it becomes a JumpReLU SAE with one learned
threshold, so inference is per-feature: watched features need only their own
encoder columns, and clamps stay cheap.

Recipe (docs/architecture.md, "SAE training"): inputs scaled so E‖x‖ = √d_in (folded back at export),
``b_dec`` initialised at the mean, unit-norm decoder rows with the gradient's
parallel component removed, Adam with warm-up and linear decay, grad clip 1.

Sparse where the code is sparse: a step keeps ``k × batch`` activations out of
``d_sae × batch``, so only the encoder's forward matmul is dense. The kept
pre-activations carry their gradient through :class:`_KeptPre` (an index-add
into the encoder's gradient instead of a second dense matmul), and the
decoder is an ``embedding_bag`` over the kept features (forward and backward
touch ``k`` decoder rows per token, not ``d_sae``). The encoder reads
``x − b_dec`` with ``b_dec`` held constant (it learns through the decoder),
which saves the third dense matmul. Measured in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..sae import SparseAutoencoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one SAE training run."""

    d_sae: int = 4608
    """Number of features."""
    k: int = 32
    """Mean active features per token (BatchTopK keeps k × batch activations per batch)."""
    batch_size: int = 4096
    """Tokens per optimiser step."""
    epochs: float = 2.0
    """Passes over the harvested activations."""
    lr: float = 1e-3
    """Peak Adam learning rate."""
    warmup_frac: float = 0.05
    """Fraction of steps spent warming up the learning rate."""
    decay_frac: float = 0.3
    """Final fraction of steps over which the learning rate decays linearly to 0."""
    aux_k: int = 256
    """Dead latents used by the AuxK loss."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_tokens: int = 200_000
    """A latent that has not fired for this many tokens counts as dead for AuxK."""
    seed: int = 0
    """Seed for initialisation and shuffling."""


class _KeptPre(torch.autograd.Function):
    """``pre[rows, cols]`` of ``x @ W_enc + b_enc``, with a gradient that touches only the kept entries.

    Forward reads the dense pre-activations already computed without a graph; backward adds each
    kept entry's gradient times its token's input into the encoder column it came from.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor, pre: Tensor, rows: Tensor,
                cols: Tensor) -> Tensor:
        ctx.save_for_backward(x, rows, cols)
        ctx.shapes = (W_enc.shape, b_enc.shape[0])
        return pre[rows, cols]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, rows, cols = ctx.saved_tensors
        (d_in, d_sae), _ = ctx.shapes
        grad_b = torch.zeros(d_sae, dtype=grad.dtype).index_add_(0, cols, grad)
        grad_W = torch.zeros(d_sae, d_in, dtype=grad.dtype).index_add_(0, cols, x[rows] * grad[:, None])
        return None, grad_W.t(), grad_b, None, None, None


class BatchTopKSAE(nn.Module):
    """The trainable SAE; :meth:`export` turns it into a JumpReLU :class:`SparseAutoencoder`."""

    def __init__(self, d_in: int, cfg: TrainConfig, mean: Tensor) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(cfg.seed)
        W = torch.randn(cfg.d_sae, d_in, generator=g)
        W = W / W.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W.clone())
        self.W_enc = nn.Parameter(W.T.clone())  # tied initialisation
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(mean.clone())
        self.cfg = cfg
        self.threshold: Tensor
        self.since_fired: Tensor
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("since_fired", torch.zeros(cfg.d_sae, dtype=torch.long))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(x_hat, kept rows, kept features, kept values, pre-activations)``; kept entries sorted by row.

        The dense pre-activations carry no graph (:class:`_KeptPre` gives the kept ones theirs).
        """
        with torch.no_grad():
            pre = torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
            # the batch's top k·batch among each token's top 4k: a global top-k over every entry costs
            # more than the encoder matmul; this caps a token at 4k features and is otherwise exact
            cand_vals, cand_cols = pre.topk(min(4 * self.cfg.k, self.cfg.d_sae), dim=-1, sorted=False)
            keep = cand_vals.flatten().topk(x.shape[0] * self.cfg.k, sorted=False).indices.sort().values
            rows, cols = keep // cand_cols.shape[1], cand_cols.flatten()[keep]
        values = torch.relu(_KeptPre.apply(x - self.b_dec.detach(), self.W_enc, self.b_enc, pre, rows, cols))
        return self.decode(rows, cols, values, x.shape[0]) + self.b_dec, rows, cols, values, pre

    def decode(self, rows: Tensor, cols: Tensor, values: Tensor, batch: int) -> Tensor:
        """``Σ values · W_dec[cols]`` per row, touching only the kept decoder rows (no ``b_dec``)."""
        offsets = torch.cat([rows.new_zeros(1), torch.bincount(rows, minlength=batch).cumsum(0)[:-1]])
        return nn.functional.embedding_bag(cols, self.W_dec, offsets, mode="sum", per_sample_weights=values)

    def aux_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor) -> Tensor:
        """AuxK: the dead latents' top-``aux_k`` reconstruct what the live ones left over."""
        dead = self.since_fired >= self.cfg.dead_tokens
        n_dead = int(dead.sum())
        if n_dead == 0:
            return x.new_zeros(())
        k = min(self.cfg.aux_k, n_dead)
        residual = (x - x_hat).detach()
        with torch.no_grad():
            dead_cols = dead.nonzero().flatten()
            top = pre.index_select(1, dead_cols).topk(k, dim=-1).indices
            rows = torch.arange(x.shape[0]).repeat_interleave(k)
            cols = dead_cols[top.flatten()]
        values = torch.relu(_KeptPre.apply(x - self.b_dec.detach(), self.W_enc, self.b_enc, pre, rows, cols))
        recon = self.decode(rows, cols, values, x.shape[0])
        return (recon - residual).pow(2).sum(-1).mean() / residual.pow(2).sum(-1).mean().clamp_min(1e-8)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        if self.W_dec.grad is None:
            return
        W = self.W_dec.data
        self.W_dec.grad -= (self.W_dec.grad * W).sum(dim=1, keepdim=True) * W

    def export(self, scale: float, *, hook_name: str, model_name: str, metadata: dict[str, Any]) -> SparseAutoencoder:
        """A JumpReLU SAE in activation units (the training scale folded into the weights)."""
        d_sae = self.cfg.d_sae
        sae = SparseAutoencoder(
            self.W_enc.detach(), self.W_dec.detach(), self.b_enc.detach(), self.b_dec.detach(),
            architecture="jumprelu", threshold=self.threshold.detach().expand(d_sae).clone(),
            apply_b_dec_to_input=True, input_scale=scale, hook_name=hook_name, model_name=model_name,
            metadata={**metadata, "training": asdict(self.cfg)},
        )
        return sae.folded()


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm = max(1, int(total * cfg.warmup_frac))
    decay_start = int(total * (1 - cfg.decay_frac))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if step >= decay_start:
        return cfg.lr * max(0.0, (total - step) / max(1, total - decay_start))
    return cfg.lr


def train(acts: Tensor, cfg: TrainConfig, *, checkpoint: Path | None = None, progress: Any = None,
          log_every: int = 50, checkpoint_every: int = 200, max_steps: int | None = None,
          ) -> tuple[BatchTopKSAE, float, list[dict[str, float]]]:
    """Train on ``acts (n, d_in)`` (fp16 is fine); returns the model, the input scale and a loss log.

    With ``checkpoint``, state is saved every ``checkpoint_every`` steps (and when stopping early
    after ``max_steps`` steps of this call), and a later call resumes from it exactly.
    """
    torch.manual_seed(cfg.seed)
    n, d_in = acts.shape
    sample = acts[torch.randperm(n)[:50_000]].float()
    scale = math.sqrt(d_in) / float(sample.norm(dim=-1).mean())
    sae = BatchTopKSAE(d_in, cfg, (sample * scale).mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    total = int(cfg.epochs * n / cfg.batch_size)
    start, history = 0, []
    if checkpoint and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        sae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, scale = int(state["step"]), float(state["scale"])
        logger.info("resuming SAE training at step %d of %d", start, total)
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(cfg.epochs) + 1)])
    bar = progress(total=total, initial=start, desc="train", unit="step") if progress else None
    end = total if max_steps is None else min(total, start + max_steps)
    for step in range(start, end):
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        x = acts[idx].float() * scale
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, cfg)
        x_hat, rows, cols, values, pre = sae(x)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        fvu = mse / (x - x.mean(0)).pow(2).sum(-1).mean()
        aux = sae.aux_loss(x, x_hat, pre)
        loss = fvu + cfg.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_grad()
        nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sae.normalize_decoder()
        with torch.no_grad():
            live = values > 0
            sae.since_fired += x.shape[0]
            sae.since_fired[cols[live]] = 0
            if live.any():  # BatchTopK → JumpReLU: running mean of the smallest kept activation
                sae.threshold.lerp_(values[live].min(), 0.01 if step > 0 else 1.0)
        if step % log_every == 0 or step == total - 1:
            row = {"step": step, "fvu": float(fvu.detach()), "aux": float(aux.detach()),
                   "l0": float(live.sum()) / x.shape[0],
                   "dead": float((sae.since_fired >= cfg.dead_tokens).float().mean()), "lr": lr_at(step, total, cfg)}
            history.append(row)
            if bar:
                bar.set_postfix(fvu=f"{row['fvu']:.3f}", dead=f"{row['dead']:.3f}")
        if checkpoint and ((step + 1) % checkpoint_every == 0 or step + 1 == end):
            torch.save({"model": sae.state_dict(), "opt": opt.state_dict(), "step": step + 1, "scale": scale},
                       checkpoint)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return sae, scale, history
