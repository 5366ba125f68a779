"""featurewatch and SAELens read each other's files and compute the same thing.

SAEs are built and saved by SAELens itself (the installed version, 6.54 when
written), loaded by featurewatch and compared on random inputs; then the
reverse. In CI a missing sae_lens is a failure, not a skip.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from conftest import build_sae
from featurewatch.sae import SparseAutoencoder

D_IN, D_SAE, K = 8, 32, 4
ATOL = 1e-5
HOOK = "blocks.3.hook_resid_post"


@pytest.fixture(scope="module")
def sl() -> ModuleType:
    """The real sae_lens package (skipped only outside CI when it is not installed)."""
    try:
        with warnings.catch_warnings():
            # Importing sae_lens pulls in transformer_lens, which warns about its own deprecations.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            import sae_lens
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("sae_lens is not installed (this is a failure in CI)")
    return sae_lens


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomise(sae: Any, seed: int, *, threshold_low: float = 0.0) -> None:
    """Random weights (decoder rows of uneven norm) and, for JumpReLU, thresholds in [low, low + 0.5)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sae.named_parameters():
        p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("b_") else 1.0))
    if hasattr(sae, "threshold"):
        sae.threshold.copy_(threshold_low + torch.rand(sae.threshold.shape, generator=g) * 0.5)


def inference_sae(sl: ModuleType, architecture: str, seed: int = 0, **cfg: Any) -> Any:
    classes = {"standard": (sl.StandardSAE, sl.StandardSAEConfig), "jumprelu": (sl.JumpReLUSAE, sl.JumpReLUSAEConfig),
               "topk": (sl.TopKSAE, sl.TopKSAEConfig)}
    sae_cls, cfg_cls = classes[architecture]
    if architecture == "topk":
        cfg.setdefault("k", K)
    config = cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=sl.saes.sae.SAEMetadata(hook_name=HOOK, model_name="tiny"), **cfg)
    sae = sae_cls(config)
    randomise(sae, seed)
    return sae.eval()


def assert_same(ours: SparseAutoencoder, theirs: Any, *, seed: int = 1) -> None:
    """Same activations and reconstructions on random (batch, seq, d_in) inputs."""
    x = randn(3, 5, D_IN, seed=seed)
    with torch.no_grad():
        f = theirs.encode(x)
        torch.testing.assert_close(ours.encode(x), f, rtol=1e-5, atol=ATOL)
        torch.testing.assert_close(ours.decode(f), theirs.decode(f), rtol=1e-5, atol=ATOL)
        torch.testing.assert_close(ours.encode_subset(x, [0, 7, 31]), f[..., [0, 7, 31]], rtol=1e-5, atol=ATOL)
    assert 0 < int((f != 0).sum()) < f.numel()  # features both fire and stay silent


# ------------------------------------------------- SAELens → featurewatch
@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_load_sae_saved_by_saelens(sl: ModuleType, tmp_path: Path, architecture: str, apply_b_dec: bool) -> None:
    theirs = inference_sae(sl, architecture, apply_b_dec_to_input=apply_b_dec)
    theirs.save_model(tmp_path / "sae")
    ours = SparseAutoencoder.load(tmp_path / "sae")
    assert (ours.architecture, ours.d_in, ours.d_sae) == (architecture, D_IN, D_SAE)
    assert ours.apply_b_dec_to_input is apply_b_dec
    assert (ours.hook_name, ours.model_name) == (HOOK, "tiny")
    if architecture == "topk":
        assert ours.k == K
    assert_same(ours, theirs)


def test_expected_average_only_in_matches_saelens_fold(sl: ModuleType, tmp_path: Path) -> None:
    theirs = inference_sae(sl, "jumprelu", normalize_activations="expected_average_only_in")
    theirs.save_model(tmp_path / "sae")
    ours = SparseAutoencoder.load(tmp_path / "sae", input_scale=2.5)
    # SAELens leaves this scaling to the caller and offers to fold it into the weights.
    theirs.fold_activation_norm_scaling_factor(2.5)
    assert_same(ours.folded(), theirs)
    x = randn(4, D_IN, seed=3)
    torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-5, atol=ATOL)


def training_sae(sl: ModuleType, name: str) -> Any:
    cfg_cls = getattr(sl, f"{name}TrainingSAEConfig")
    sae_cls = getattr(sl, f"{name}TrainingSAE")
    extra = {"k": K} if "TopK" in name else {}
    sae = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=sl.saes.sae.SAEMetadata(hook_name=HOOK), **extra))
    randomise(sae, seed=5)
    return sae.eval()


@pytest.mark.parametrize("name", ["Standard", "JumpReLU", "TopK"])
def test_load_inference_export_of_a_training_sae(sl: ModuleType, tmp_path: Path, name: str) -> None:
    """save_inference_model folds what training needed (TopK's decoder-norm rescaling) into the weights."""
    theirs = training_sae(sl, name)
    theirs.save_inference_model(tmp_path / "sae")
    ours = SparseAutoencoder.load(tmp_path / "sae")
    assert ours.architecture == {"Standard": "standard", "JumpReLU": "jumprelu", "TopK": "topk"}[name]
    assert_same(ours, theirs)


def test_batchtopk_exports_as_jumprelu(sl: ModuleType, tmp_path: Path) -> None:
    theirs = training_sae(sl, "BatchTopK")
    with torch.no_grad():
        theirs.topk_threshold.fill_(0.4)
    theirs.save_inference_model(tmp_path / "sae")
    ours = SparseAutoencoder.load(tmp_path / "sae")
    assert ours.architecture == "jumprelu"
    assert bool((ours.threshold == 0.4).all())
    assert_same(ours, sl.SAE.load_from_disk(tmp_path / "sae"))


def test_topk_rescaled_by_decoder_norm(sl: ModuleType, tmp_path: Path) -> None:
    theirs = inference_sae(sl, "topk", rescale_acts_by_decoder_norm=True)
    theirs.save_model(tmp_path / "sae")
    assert_same(SparseAutoencoder.load(tmp_path / "sae"), theirs)


def test_jumprelu_negative_threshold(sl: ModuleType, tmp_path: Path) -> None:
    theirs = inference_sae(sl, "jumprelu")
    randomise(theirs, seed=0, threshold_low=-0.5)
    theirs.save_model(tmp_path / "sae")
    assert_same(SparseAutoencoder.load(tmp_path / "sae"), theirs)


# ------------------------------------------------- featurewatch → SAELens
@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_loads_our_save(sl: ModuleType, tmp_path: Path, architecture: str, apply_b_dec: bool) -> None:
    g = torch.Generator().manual_seed(2)
    extra: dict[str, Any] = {"k": K} if architecture == "topk" else {}
    if architecture == "jumprelu":
        extra["threshold"] = torch.rand(D_SAE, generator=g)
    # An input scale that save() must fold, as SAELens does not apply one.
    ours = build_sae(D_IN, D_SAE, architecture=architecture, seed=3, apply_b_dec_to_input=apply_b_dec,
                     input_scale=1.75, hook_name=HOOK, **extra)
    ours.save(tmp_path / "sae")
    theirs = sl.SAE.load_from_disk(tmp_path / "sae")
    assert theirs.cfg.architecture() == architecture
    assert (theirs.cfg.d_in, theirs.cfg.d_sae, theirs.cfg.apply_b_dec_to_input) == (D_IN, D_SAE, apply_b_dec)
    assert theirs.cfg.normalize_activations == "none"
    if architecture == "topk":
        assert theirs.cfg.k == K
    assert_same(ours, theirs)


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_saelens_loads_our_fp16_save(sl: ModuleType, tmp_path: Path, architecture: str) -> None:
    extra: dict[str, Any] = {"k": K} if architecture == "topk" else {}
    ours = build_sae(D_IN, D_SAE, architecture=architecture, seed=4, **extra)
    ours.save(tmp_path / "sae", dtype=torch.float16)
    theirs = sl.SAE.load_from_disk(tmp_path / "sae")
    assert theirs.W_enc.dtype == torch.float16  # SAELens honours the dtype written in cfg.json
    # Compare in fp32 against our own reload of the same fp16-rounded weights.
    assert_same(SparseAutoencoder.load(tmp_path / "sae"), sl.SAE.load_from_disk(tmp_path / "sae", dtype="float32"))


def test_saelens_sees_our_hook_name(sl: ModuleType, tmp_path: Path) -> None:
    build_sae(D_IN, D_SAE, hook_name=HOOK, model_name="tiny").save(tmp_path / "sae")
    theirs = sl.SAE.load_from_disk(tmp_path / "sae")
    assert (theirs.cfg.metadata.hook_name, theirs.cfg.metadata.model_name) == (HOOK, "tiny")
