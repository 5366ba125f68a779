"""SparseAutoencoder maths, validation and its own save/load round trip.

Weights are set by hand wherever possible so expected values are exact; the
random cases compare a fast path (subset encode, folded scale) with the
reference path it must equal.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_sae
from featurewatch.errors import ConfigError, SAEFormatError
from featurewatch.sae import ARCHITECTURES, SparseAutoencoder

ARCHS = ["standard", "jumprelu", "topk"]


def identity_sae(d: int = 4, *, architecture: str = "standard", **kwargs: object) -> SparseAutoencoder:
    """W_enc = W_dec = eye, zero biases: the activation is the (activated) input itself."""
    parts = {"W_enc": torch.eye(d), "W_dec": torch.eye(d), "b_enc": torch.zeros(d), "b_dec": torch.zeros(d)}
    parts.update(kwargs)  # type: ignore[arg-type]
    return build_sae(d, d, architecture=architecture, **parts)


def random_sae(architecture: str, *, d_in: int = 8, d_sae: int = 24, seed: int = 0,
               **kwargs: object) -> SparseAutoencoder:
    """A random SAE whose JumpReLU thresholds differ per feature and gate some features off."""
    if architecture == "jumprelu":
        g = torch.Generator().manual_seed(seed + 100)
        kwargs.setdefault("threshold", torch.rand(d_sae, generator=g) * 1.5)
    if architecture == "topk":
        kwargs.setdefault("k", 5)
    return build_sae(d_in, d_sae, architecture=architecture, seed=seed, **kwargs)  # type: ignore[arg-type]


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- exact maths
def test_standard_identity_encoder_gives_relu_of_input() -> None:
    sae = identity_sae()
    x = torch.tensor([1.0, -2.0, 3.0, 0.0])
    assert torch.equal(sae.encode(x), torch.tensor([1.0, 0.0, 3.0, 0.0]))
    assert torch.equal(sae.pre_acts(x), x)


def test_known_decoder_gives_known_reconstruction() -> None:
    W_dec = torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]])  # (d_sae=2, d_in=3)
    b_dec = torch.tensor([0.5, 0.25, -1.0])
    sae = build_sae(3, 2, W_dec=W_dec, b_dec=b_dec)
    f = torch.tensor([[2.0, 3.0], [0.0, 0.0]])
    assert torch.equal(sae.decode(f), torch.tensor([[2.5, -2.75, 6.0], [0.5, 0.25, -1.0]]))


def test_forward_is_decode_of_encode() -> None:
    sae = identity_sae(W_dec=2 * torch.eye(4), b_dec=torch.ones(4), apply_b_dec_to_input=False)
    x = torch.tensor([1.0, -2.0, 3.0, 0.0])
    assert torch.equal(sae(x), torch.tensor([3.0, 1.0, 7.0, 1.0]))


def test_standard_sums_encoder_columns_and_bias() -> None:
    W_enc = torch.tensor([[1.0, 2.0], [3.0, -1.0]])  # (d_in=2, d_sae=2)
    sae = build_sae(2, 2, W_enc=W_enc, b_enc=torch.tensor([0.5, -10.0]), b_dec=torch.zeros(2))
    x = torch.tensor([1.0, 1.0])
    assert torch.equal(sae.pre_acts(x), torch.tensor([4.5, -9.0]))
    assert torch.equal(sae.encode(x), torch.tensor([4.5, 0.0]))


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_apply_b_dec_to_input(apply_b_dec: bool) -> None:
    b_dec = torch.tensor([0.5, 1.0, -1.0, 2.0])
    sae = identity_sae(b_dec=b_dec, apply_b_dec_to_input=apply_b_dec)
    x = torch.tensor([1.0, 1.0, 1.0, 1.0])
    expected = torch.tensor([0.5, 0.0, 2.0, 0.0]) if apply_b_dec else torch.ones(4)
    assert torch.equal(sae.encode(x), expected)
    # The decoder always adds b_dec back.
    assert torch.equal(sae.decode(torch.zeros(4)), b_dec)


def test_jumprelu_gates_strictly_above_threshold() -> None:
    theta = torch.tensor([0.25, 0.5, 1.0, 2.0, 0.5])
    sae = identity_sae(5, architecture="jumprelu", threshold=theta)
    # at θ, above θ, below θ, far above θ, negative
    x = torch.tensor([0.25, 0.75, 0.5, 3.0, -1.0])
    out = sae.encode(x)
    assert torch.equal(out, torch.tensor([0.0, 0.75, 0.0, 3.0, 0.0]))
    # Above the threshold the activation is the pre-activation itself, not pre − θ.
    assert out[1].item() == 0.75


def test_jumprelu_threshold_is_per_feature() -> None:
    sae = identity_sae(3, architecture="jumprelu", threshold=torch.tensor([0.0, 1.0, 2.0]))
    x = torch.full((3,), 1.5)
    assert torch.equal(sae.encode(x), torch.tensor([1.5, 1.5, 0.0]))


def test_topk_keeps_exactly_the_k_largest() -> None:
    sae = identity_sae(6, architecture="topk", k=2)
    x = torch.tensor([[1.0, 5.0, -3.0, 4.0, 2.0, 0.0], [9.0, 0.5, 0.25, 8.0, 10.0, 1.0]])
    expected = torch.tensor([[0.0, 5.0, 0.0, 4.0, 0.0, 0.0], [9.0, 0.0, 0.0, 0.0, 10.0, 0.0]])
    assert torch.equal(sae.encode(x), expected)


def test_topk_relus_the_kept_values() -> None:
    sae = identity_sae(4, architecture="topk", k=2)
    # The second largest value is negative: it is kept by top-k but zeroed by ReLU.
    x = torch.tensor([-1.0, -2.0, 3.0, -4.0])
    assert torch.equal(sae.encode(x), torch.tensor([0.0, 0.0, 3.0, 0.0]))


def test_topk_on_random_inputs_keeps_k_per_row() -> None:
    k = 5
    sae = random_sae("topk", k=k, b_enc=torch.full((24,), 50.0))  # every pre-activation positive
    x = randn(3, 7, 8)
    pre = sae.pre_acts(x)
    out = sae.encode(x)
    assert out.shape == (3, 7, 24)
    assert torch.equal((out != 0).sum(-1), torch.full((3, 7), k))
    kept = out != 0
    assert torch.equal(out[kept], pre[kept])
    # Every kept value is at least as large as every dropped one.
    smallest_kept = torch.where(kept, pre, torch.inf).amin(-1)
    largest_dropped = torch.where(kept, -torch.inf, pre).amax(-1)
    assert bool((smallest_kept >= largest_dropped).all())


def test_input_scale_maths_by_hand() -> None:
    s = 2.0
    W_enc = torch.tensor([[1.0, -1.0, 0.5], [2.0, 0.0, 1.0]])  # (2, 3)
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # (3, 2)
    b_enc = torch.tensor([0.0, 2.0, -0.5])
    b_dec = torch.tensor([1.0, -2.0])
    sae = build_sae(2, 3, W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec, input_scale=s)
    x = torch.tensor([1.0, 0.5])
    # pre = (s·x − b_dec) @ W_enc + b_enc = [1, 3] @ W_enc + b_enc = [7, −1, 3.5] + b_enc
    assert torch.equal(sae.pre_acts(x), torch.tensor([7.0, 1.0, 3.0]))
    f = sae.encode(x)
    assert torch.equal(f, torch.tensor([7.0, 1.0, 3.0]))
    sae_neg = build_sae(2, 3, W_enc=W_enc, W_dec=W_dec, b_enc=torch.zeros(3), b_dec=b_dec, input_scale=s)
    assert torch.equal(sae_neg.encode(x), torch.tensor([7.0, 0.0, 3.5]))
    # x̂ = (f @ W_dec + b_dec) / s = ([10, 4] + [1, -2]) / 2
    assert torch.equal(sae.decode(f), torch.tensor([5.5, 1.0]))


def test_input_scale_without_b_dec_subtraction() -> None:
    sae = identity_sae(2, b_dec=torch.tensor([1.0, 1.0]), apply_b_dec_to_input=False, input_scale=4.0)
    assert torch.equal(sae.encode(torch.tensor([0.5, -0.5])), torch.tensor([2.0, 0.0]))
    assert torch.equal(sae.decode(torch.tensor([2.0, 0.0])), torch.tensor([0.75, 0.25]))


@pytest.mark.parametrize("architecture", ARCHS)
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_folded_matches_scaled(architecture: str, apply_b_dec: bool) -> None:
    sae = random_sae(architecture, input_scale=3.5, apply_b_dec_to_input=apply_b_dec)
    folded = sae.folded()
    assert folded.input_scale == 1.0
    assert folded.architecture == architecture and folded.apply_b_dec_to_input == apply_b_dec
    x = randn(2, 5, 8) * 0.4
    f = sae.encode(x)
    torch.testing.assert_close(folded.encode(x), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded.decode(f), sae.decode(f), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded.decoder_directions([0, 3]), sae.decoder_directions([0, 3]))
    assert int((f != 0).sum()) > 0  # the comparison is not vacuous


def test_folded_keeps_names_and_metadata() -> None:
    sae = build_sae(hook_name="layers.3", model_name="m", metadata={"note": "x"}, input_scale=2.0)
    folded = sae.folded()
    assert (folded.hook_name, folded.model_name, folded.metadata) == ("layers.3", "m", {"note": "x"})


# ------------------------------------------------------------- subset encode
@pytest.mark.parametrize("architecture", ARCHS)
@pytest.mark.parametrize("input_scale", [1.0, 2.5])
def test_encode_subset_equals_full_encode(architecture: str, input_scale: float) -> None:
    sae = random_sae(architecture, input_scale=input_scale)
    x = randn(3, 7, 8)
    full = sae.encode(x)
    assert full.shape == (3, 7, 24)
    for ids in ([5], [0, 23, 7, 7, 2], list(range(24)), torch.tensor([11, 3])):
        sub = sae.encode_subset(x, ids)
        idx = torch.as_tensor(ids)
        assert sub.shape == (3, 7, len(idx))
        torch.testing.assert_close(sub, full[..., idx], rtol=1e-5, atol=1e-6)
    # Some features fire and some do not, so both branches of the activation are exercised.
    assert 0 < int((full != 0).sum()) < full.numel()


def test_encode_subset_without_b_dec_subtraction() -> None:
    sae = random_sae("jumprelu", apply_b_dec_to_input=False)
    x = randn(2, 4, 8)
    torch.testing.assert_close(sae.encode_subset(x, [1, 9]), sae.encode(x)[..., [1, 9]], rtol=1e-5, atol=1e-6)


def test_topk_subset_uses_the_full_encode() -> None:
    sae = identity_sae(6, architecture="topk", k=2)
    x = torch.tensor([5.0, 4.0, 1.0, 0.5, 0.0, 0.0])
    # Features 2 and 3 are not among the top 2 overall; a top-k within the subset would keep them.
    assert torch.equal(sae.encode_subset(x, [2, 3]), torch.zeros(2))
    assert torch.equal(sae.encode_subset(x, [1, 2]), torch.tensor([4.0, 0.0]))


# ------------------------------------------------------------ shape, metadata
def test_widths_and_elementwise_flag() -> None:
    for arch, elementwise in (("standard", True), ("jumprelu", True), ("topk", False)):
        sae = build_sae(4, 6, architecture=arch)
        assert (sae.d_in, sae.d_sae, sae.elementwise) == (4, 6, elementwise)


def test_relu_is_an_alias_of_standard() -> None:
    assert build_sae(architecture="relu").architecture == "standard"
    assert ARCHITECTURES == ("standard", "jumprelu", "topk")


def test_decoder_directions_are_decoder_rows() -> None:
    sae = build_sae(4, 6)
    dirs = sae.decoder_directions([4, 1])
    assert dirs.shape == (2, 4)
    assert torch.equal(dirs, sae.W_dec[[4, 1]])
    assert torch.equal(sae.decoder_directions(torch.tensor([2])), sae.W_dec[[2]])


def test_decoder_directions_are_what_one_unit_adds() -> None:
    sae = build_sae(4, 6, input_scale=2.5)
    torch.testing.assert_close(sae.decoder_directions([3])[0], sae.W_dec[3] / 2.5)
    f = torch.zeros(6)
    f3 = f.clone()
    f3[3] = 1.0
    torch.testing.assert_close(sae.decode(f3) - sae.decode(f), sae.decoder_directions([3])[0])


def test_parameters_are_frozen_copies() -> None:
    W_enc = torch.eye(4)
    sae = identity_sae(W_enc=W_enc)
    W_enc[0, 0] = 99.0
    assert sae.W_enc[0, 0].item() == 1.0
    assert not any(p.requires_grad for p in sae.parameters())


# -------------------------------------------------------------- validation
@pytest.mark.parametrize(("name", "bad"), [
    ("W_dec", torch.zeros(4, 6)),  # transposed
    ("b_enc", torch.zeros(5)),
    ("b_dec", torch.zeros(6)),
])
def test_wrong_shapes_are_named(name: str, bad: torch.Tensor) -> None:
    with pytest.raises(SAEFormatError, match=re.escape(f"{name} has shape {tuple(bad.shape)}, expected")):
        build_sae(4, 6, **{name: bad})


def test_w_enc_of_wrong_rank_is_a_format_error() -> None:
    with pytest.raises(SAEFormatError, match="W_enc"):
        build_sae(4, 6, W_enc=torch.zeros(4))


def test_unknown_architecture_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match="'gated'.*valid: standard, jumprelu, topk"):
        build_sae(architecture="gated")


def test_jumprelu_needs_a_threshold() -> None:
    with pytest.raises(SAEFormatError, match=r"threshold of shape \(6,\)"):
        build_sae(4, 6, architecture="jumprelu", threshold=None)
    with pytest.raises(SAEFormatError, match="threshold"):
        build_sae(4, 6, architecture="jumprelu", threshold=torch.zeros(5))


@pytest.mark.parametrize("k", [None, 0, 7])
def test_topk_needs_k_within_d_sae(k: int | None) -> None:
    with pytest.raises(ConfigError, match=f"0 < k <= d_sae=6, got k={k}"):
        build_sae(4, 6, architecture="topk", k=k)


@pytest.mark.parametrize("scale", [0.0, -1.0, math.nan, math.inf])
def test_input_scale_must_be_positive_and_finite(scale: float) -> None:
    with pytest.raises(ConfigError, match="input_scale must be a positive finite number"):
        build_sae(input_scale=scale)


@pytest.mark.parametrize("name", ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weights_name_the_tensor(name: str, value: float) -> None:
    sae = build_sae(4, 6, architecture="jumprelu")
    t = getattr(sae, name).detach().clone()
    t.view(-1)[1] = value
    with pytest.raises(SAEFormatError, match=rf"^{name} holds 1 non-finite value"):
        build_sae(4, 6, architecture="jumprelu", **{name: t})


# ------------------------------------------------------------ save / load
def _roundtrip_sae(architecture: str, **kwargs: object) -> SparseAutoencoder:
    return random_sae(architecture, hook_name="blocks.3.hook_resid_post", model_name="tiny-model",
                      metadata={"context_size": 128, "prepend_bos": False}, **kwargs)


@pytest.mark.parametrize("architecture", ARCHS)
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_save_load_roundtrip(tmp_path: Path, architecture: str, apply_b_dec: bool) -> None:
    sae = _roundtrip_sae(architecture, apply_b_dec_to_input=apply_b_dec)
    out = sae.save(tmp_path / "sae")
    assert out == tmp_path / "sae"
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]

    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == architecture
    assert (cfg["d_in"], cfg["d_sae"]) == (8, 24)
    assert cfg["apply_b_dec_to_input"] is apply_b_dec
    assert cfg["normalize_activations"] == "none"
    assert cfg["dtype"] == "float32"
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["metadata"]["model_name"] == "tiny-model"
    assert cfg["metadata"]["context_size"] == 128
    assert cfg.get("k") == (5 if architecture == "topk" else None)

    tensors = load_file(str(out / "sae_weights.safetensors"))
    expected_keys = {"W_enc", "W_dec", "b_enc", "b_dec"} | ({"threshold"} if architecture == "jumprelu" else set())
    assert set(tensors) == expected_keys

    back = SparseAutoencoder.load(out)
    assert back.architecture == architecture
    assert (back.d_in, back.d_sae, back.k) == (8, 24, sae.k)
    assert back.apply_b_dec_to_input is apply_b_dec
    assert (back.hook_name, back.model_name) == ("blocks.3.hook_resid_post", "tiny-model")
    assert {k: back.metadata[k] for k in ("context_size", "prepend_bos")} == {"context_size": 128, "prepend_bos": False}
    assert "hook_name" not in back.metadata and "model_name" not in back.metadata
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        assert torch.equal(getattr(back, name), getattr(sae, name)), name
    x = randn(2, 3, 8)
    assert torch.equal(back.encode(x), sae.encode(x))


@pytest.mark.parametrize("architecture", ARCHS)
def test_save_fp16(tmp_path: Path, architecture: str) -> None:
    sae = _roundtrip_sae(architecture)
    out = sae.save(tmp_path / "sae", dtype=torch.float16)
    assert json.loads((out / "cfg.json").read_text())["dtype"] == "float16"
    tensors = load_file(str(out / "sae_weights.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.float16}

    back = SparseAutoencoder.load(out)
    assert back.W_enc.dtype == torch.float32
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        assert torch.equal(getattr(back, name), getattr(sae, name).half().float()), name
    x = randn(2, 3, 8)
    f = sae.encode(x)
    if architecture != "jumprelu":  # fp16 rounding may flip a gate sitting near its threshold
        torch.testing.assert_close(back.encode(x), f, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(back.decode(f), sae.decode(f), rtol=1e-2, atol=1e-2)


def test_save_folds_the_input_scale(tmp_path: Path) -> None:
    sae = random_sae("jumprelu", input_scale=4.0)
    out = sae.save(tmp_path / "sae")
    assert json.loads((out / "cfg.json").read_text())["normalize_activations"] == "none"
    back = SparseAutoencoder.load(out)
    assert back.input_scale == 1.0
    x = randn(4, 8) * 0.3
    f = sae.encode(x)
    torch.testing.assert_close(back.encode(x), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back.decode(f), sae.decode(f), rtol=1e-5, atol=1e-5)
    assert sae.input_scale == 4.0  # saving does not change the SAE itself


def test_load_dtype(tmp_path: Path) -> None:
    out = build_sae().save(tmp_path / "sae")
    back = SparseAutoencoder.load(out, dtype=torch.float64)
    assert {p.dtype for p in back.parameters()} == {torch.float64}
    assert back.encode(torch.zeros(4, dtype=torch.float32)).dtype == torch.float64
