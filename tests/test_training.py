"""SAE training on synthetic sparse data: it learns, exports exactly, and resumes exactly."""

from pathlib import Path

import torch

from featurewatch.training.harvest import is_held_out
from featurewatch.training.train import TrainConfig, lr_at, train


def sparse_data(n: int = 6000, d_in: int = 16, atoms: int = 48, k: int = 3, seed: int = 0) -> torch.Tensor:
    """Each row is a sum of ``k`` random dictionary atoms with positive coefficients."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(atoms, d_in, generator=g)
    codes = torch.zeros(n, atoms)
    idx = torch.stack([torch.randperm(atoms, generator=g)[:k] for _ in range(n)])
    codes.scatter_(1, idx, torch.rand(n, k, generator=g) + 0.5)
    return (codes @ dictionary + 3.0).half()


CFG = TrainConfig(d_sae=64, k=3, batch_size=256, epochs=6, lr=3e-3, dead_tokens=2000, seed=0)


def test_training_learns_a_sparse_code_and_exports_an_equivalent_jumprelu_sae() -> None:
    acts = sparse_data()
    model, scale, history = train(acts, CFG)
    assert history[-1]["fvu"] < 0.25 < history[0]["fvu"]
    sae = model.export(scale, hook_name="layers.0", model_name="synthetic", metadata={})
    assert sae.architecture == "jumprelu" and sae.input_scale == 1.0
    x = acts[:2000].float()
    f = sae.encode(x)
    fvu = ((sae.decode(f) - x).pow(2).sum(-1).mean() / (x - x.mean(0)).pow(2).sum(-1).mean()).item()
    assert fvu < 0.32  # the JumpReLU export of a 6-epoch toy run (training FVU ~0.21)
    assert 1.0 < (f > 0).sum(-1).float().mean().item() < 8.0  # L0 near k = 3
    # the export folds the training scale exactly: same pre-activations, reconstruction in raw units
    with torch.no_grad():
        pre_train = (x[:8] * scale - model.b_dec) @ model.W_enc + model.b_enc
        f = torch.relu(pre_train) * (pre_train > model.threshold)
        x_hat_train = f @ model.W_dec + model.b_dec
    assert torch.allclose(sae.pre_acts(x[:8]), pre_train, atol=1e-4)
    assert torch.allclose(sae.decode(sae.encode(x[:8])) * scale, x_hat_train, atol=1e-4)


def test_interrupted_training_resumes_to_the_same_weights(tmp_path: Path) -> None:
    acts = sparse_data(n=3000)
    cfg = TrainConfig(d_sae=32, k=3, batch_size=256, epochs=2, lr=3e-3, seed=1)
    straight, _, _ = train(acts, cfg)
    ckpt = tmp_path / "ckpt.pt"
    train(acts, cfg, checkpoint=ckpt, max_steps=9)
    resumed, _, _ = train(acts, cfg, checkpoint=ckpt)
    assert torch.allclose(straight.W_dec, resumed.W_dec, atol=1e-5)
    assert torch.allclose(straight.threshold, resumed.threshold)


def test_learning_rate_warms_up_holds_and_decays_to_zero() -> None:
    cfg = TrainConfig(lr=1.0, warmup_frac=0.1, decay_frac=0.5)
    assert lr_at(0, 100, cfg) == 0.1 and lr_at(9, 100, cfg) == 1.0
    assert lr_at(30, 100, cfg) == 1.0 and lr_at(75, 100, cfg) == 0.5 and lr_at(99, 100, cfg) == 0.02


def test_held_out_split_is_deterministic_and_about_the_asked_fraction() -> None:
    ids = [f"rec-{i}" for i in range(4000)]
    held = [i for i in ids if is_held_out(i, 0.05)]
    assert held == [i for i in ids if is_held_out(i, 0.05)]
    assert 140 < len(held) < 260
