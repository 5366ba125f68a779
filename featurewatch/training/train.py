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

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        pre = torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        n = x.shape[0] * self.cfg.k
        flat = pre.flatten()
        values, indices = flat.topk(n, sorted=False)
        acts = torch.zeros_like(flat).scatter_(0, indices, values).view_as(pre)
        return acts @ self.W_dec + self.b_dec, acts, pre

    def aux_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor) -> Tensor:
        dead = self.since_fired >= self.cfg.dead_tokens
        n_dead = int(dead.sum())
        if n_dead == 0:
            return x.new_zeros(())
        k = min(self.cfg.aux_k, n_dead)
        residual = (x - x_hat).detach()
        masked = torch.where(dead, pre, torch.zeros_like(pre))
        values, indices = masked.topk(k, dim=-1)
        aux = torch.zeros_like(pre).scatter_(-1, indices, values)
        recon = aux @ self.W_dec
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
        x_hat, f, pre = sae(x)
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
            fired = (f > 0).any(0)
            sae.since_fired += x.shape[0]
            sae.since_fired[fired] = 0
            positive = f[f > 0]
            if positive.numel():  # BatchTopK → JumpReLU: running mean of the smallest kept activation
                sae.threshold.lerp_(positive.min(), 0.01 if step > 0 else 1.0)
        if step % log_every == 0 or step == total - 1:
            row = {"step": step, "fvu": float(fvu.detach()), "aux": float(aux.detach()),
                   "l0": float((f > 0).sum(-1).float().mean()),
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
