"""Reading SAE files: sparsify, Gemma Scope, old SAELens configs, and broken files.

Every foreign file is written by hand here, from the format's own description,
so the expected activations are computed independently of the reader.
"""

from __future__ import annotations

import gc
import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import build_sae
from featurewatch.errors import ConfigError, SAEFormatError
from featurewatch.sae import SparseAutoencoder

D_IN, D_SAE = 4, 6  # not square, so a transposed matrix cannot pass the shape checks


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """TopK by hand: keep the k largest pre-activations of each row, then ReLU."""
    out = torch.zeros_like(pre)
    order = pre.argsort(dim=-1, descending=True)[..., :k]
    return out.scatter(-1, order, pre.gather(-1, order).clamp_min(0))


# ------------------------------------------------------------ sparsify
def write_sparsify(root: Path, *, k: int = 2, cfg_extra: dict[str, Any] | None = None,
                   tensors_extra: dict[str, torch.Tensor] | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
    path = root / "layers.3"
    path.mkdir(parents=True)
    tensors = {
        "encoder.weight": randn(D_SAE, D_IN, seed=1),  # nn.Linear layout (d_sae, d_in)
        "encoder.bias": randn(D_SAE, seed=2) * 0.5,
        "W_dec": randn(D_SAE, D_IN, seed=3),  # already (d_sae, d_in)
        "b_dec": randn(D_IN, seed=4) * 0.5,
        **(tensors_extra or {}),
    }
    save_file(tensors, str(path / "sae.safetensors"))
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": D_SAE,
           "k": k, "multi_topk": False, "skip_connection": False, "transcode": False, **(cfg_extra or {})}
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path, tensors


def test_sparsify_encode_and_decode_by_hand(tmp_path: Path) -> None:
    path, t = write_sparsify(tmp_path, k=2)
    sae = SparseAutoencoder.load(path)
    assert (sae.architecture, sae.k, sae.d_in, sae.d_sae) == ("topk", 2, D_IN, D_SAE)
    assert sae.apply_b_dec_to_input is True
    assert sae.hook_name == "layers.3"

    x = randn(3, 5, D_IN, seed=5)
    pre = (x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"]
    expected = topk_relu(pre, 2)
    f = sae.encode(x)
    torch.testing.assert_close(f, expected, rtol=1e-5, atol=1e-6)
    assert int((f != 0).sum()) > 0
    torch.testing.assert_close(sae.decode(f), f @ t["W_dec"] + t["b_dec"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae.decoder_directions([1]), t["W_dec"][[1]])


def test_sparsify_transcoder_does_not_subtract_b_dec(tmp_path: Path) -> None:
    path, t = write_sparsify(tmp_path, cfg_extra={"transcode": True})
    sae = SparseAutoencoder.load(path)
    assert sae.apply_b_dec_to_input is False
    x = randn(4, D_IN, seed=6)
    expected = topk_relu(x @ t["encoder.weight"].T + t["encoder.bias"], 2)
    torch.testing.assert_close(sae.encode(x), expected, rtol=1e-5, atol=1e-6)


def test_sparsify_needs_integer_k(tmp_path: Path) -> None:
    path, _ = write_sparsify(tmp_path, cfg_extra={"k": None})
    with pytest.raises(SAEFormatError, match="sparsify SAE needs an integer 'k'"):
        SparseAutoencoder.load(path)


def test_sparsify_missing_tensor_lists_what_is_there(tmp_path: Path) -> None:
    path = tmp_path / "layers.0"
    path.mkdir()
    save_file({"encoder.weight": torch.zeros(D_SAE, D_IN), "b_dec": torch.zeros(D_IN)}, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text('{"k": 2}')
    with pytest.raises(SAEFormatError, match="lacks tensor.*encoder.bias, W_dec; it has b_dec, encoder.weight"):
        SparseAutoencoder.load(path)


@pytest.mark.parametrize("variant", ["groupmax", "skip_connection"])
def test_sparsify_variants_we_cannot_run_are_refused(tmp_path: Path, variant: str) -> None:
    if variant == "groupmax":
        path, _ = write_sparsify(tmp_path, cfg_extra={"activation": "groupmax"})
    else:
        path, _ = write_sparsify(tmp_path, cfg_extra={"skip_connection": True},
                                 tensors_extra={"W_skip": torch.eye(D_IN)})
    with pytest.raises(SAEFormatError, match=variant.split("_")[0]):
        SparseAutoencoder.load(path)


# ---------------------------------------------------------- Gemma Scope
def gemma_arrays() -> dict[str, np.ndarray]:
    g = np.random.default_rng(0)
    return {
        "W_enc": g.standard_normal((D_IN, D_SAE)).astype(np.float32),
        "W_dec": g.standard_normal((D_SAE, D_IN)).astype(np.float32),
        "b_enc": (g.standard_normal(D_SAE) * 0.3).astype(np.float32),
        "b_dec": (g.standard_normal(D_IN) * 2).astype(np.float32),  # large, so subtracting it would show
        "threshold": np.array([0.0, 0.25, 0.5, 1.0, 0.1, 2.0], dtype=np.float32),
    }


@pytest.mark.parametrize("form", ["file", "directory"])
def test_gemma_scope_params_npz(tmp_path: Path, form: str) -> None:
    a = gemma_arrays()
    np.savez(tmp_path / "params.npz", **a)
    sae = SparseAutoencoder.load(tmp_path / "params.npz" if form == "file" else tmp_path)
    assert (sae.architecture, sae.d_in, sae.d_sae) == ("jumprelu", D_IN, D_SAE)
    assert sae.apply_b_dec_to_input is False
    assert sae.metadata == {"format": "gemma-scope"}

    t = {k: torch.from_numpy(v) for k, v in a.items()}
    x = randn(3, 5, D_IN, seed=7)
    pre = x @ t["W_enc"] + t["b_enc"]  # raw activations: no b_dec subtraction
    expected = pre * (pre > t["threshold"])
    f = sae.encode(x)
    torch.testing.assert_close(f, expected, rtol=1e-5, atol=1e-6)
    assert 0 < int((f != 0).sum()) < f.numel()
    torch.testing.assert_close(sae.decode(f), f @ t["W_dec"] + t["b_dec"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae.encode_subset(x, [3, 1]), f[..., [3, 1]], rtol=1e-5, atol=1e-6)


def test_gemma_scope_missing_threshold(tmp_path: Path) -> None:
    a = gemma_arrays()
    del a["threshold"]
    np.savez(tmp_path / "params.npz", **a)
    with pytest.raises(SAEFormatError, match="lacks tensor.*threshold"):
        SparseAutoencoder.load(tmp_path / "params.npz")


UNPICKLED: list[str] = []


def _record_unpickle(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class _Sneaky:
    """An object whose unpickling leaves a trace."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_record_unpickle, ("unpickled",))


def test_npz_object_array_is_refused_not_unpickled(tmp_path: Path) -> None:
    a: dict[str, Any] = gemma_arrays()
    obj = np.empty(D_IN * D_SAE, dtype=object)
    obj[:] = [_Sneaky() for _ in range(D_IN * D_SAE)]
    a["W_enc"] = obj.reshape(D_IN, D_SAE)
    np.savez(tmp_path / "params.npz", **a)  # numpy pickles the object array
    UNPICKLED.clear()
    with pytest.raises(SAEFormatError, match=r"params\.npz.*allow_pickle=False"):
        SparseAutoencoder.load(tmp_path / "params.npz")
    assert UNPICKLED == []


def test_non_zip_npz_is_a_format_error(tmp_path: Path) -> None:
    (tmp_path / "params.npz").write_bytes(b"this is not a zip archive")
    with pytest.raises(SAEFormatError, match="cannot read"):
        SparseAutoencoder.load(tmp_path / "params.npz")


def test_truncated_npz_is_a_format_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "params.npz", **gemma_arrays())
    data = (tmp_path / "params.npz").read_bytes()
    (tmp_path / "params.npz").write_bytes(data[: len(data) // 2])
    # np.load leaves the file open when the zip directory is missing; collect it here, quietly,
    # so the ResourceWarning does not surface later as an unraisable-exception error.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            SparseAutoencoder.load(tmp_path / "params.npz")
        except Exception as exc:  # noqa: BLE001 - inspected below, after the file is collected
            raised: tuple[type[BaseException], str] | None = (type(exc), str(exc))
        else:
            raised = None
        gc.collect()
    assert raised is not None and raised[0] is SAEFormatError, raised
    assert "truncated or corrupt" in raised[1]


# ------------------------------------------------------- SAELens configs
def write_saelens(path: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        g = torch.Generator().manual_seed(0)
        tensors = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "W_dec": torch.randn(D_SAE, D_IN, generator=g),
                   "b_enc": torch.randn(D_SAE, generator=g) * 0.3, "b_dec": torch.randn(D_IN, generator=g) * 0.3}
    save_file(tensors, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def test_pre_v6_flat_topk_config(tmp_path: Path) -> None:
    cfg = {"model_name": "gpt2-small", "hook_name": "blocks.8.hook_resid_pre", "hook_layer": 8, "d_in": D_IN,
           "d_sae": D_SAE, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3},
           "apply_b_dec_to_input": True, "normalize_activations": "none", "context_size": 128}
    path = write_saelens(tmp_path / "old", cfg)
    sae = SparseAutoencoder.load(path)
    assert (sae.architecture, sae.k) == ("topk", 3)
    assert (sae.hook_name, sae.model_name) == ("blocks.8.hook_resid_pre", "gpt2-small")
    x = randn(5, D_IN, seed=8)
    expected = topk_relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc, 3)
    torch.testing.assert_close(sae.encode(x), expected)


def test_pre_v6_hook_point_and_relu(tmp_path: Path) -> None:
    cfg = {"hook_point": "blocks.2.hook_resid_post", "d_in": D_IN, "d_sae": D_SAE, "activation_fn_str": "relu",
           "apply_b_dec_to_input": False, "normalize_activations": None}
    sae = SparseAutoencoder.load(write_saelens(tmp_path / "old", cfg))
    assert (sae.architecture, sae.hook_name, sae.apply_b_dec_to_input) == (
        "standard", "blocks.2.hook_resid_post", False)
    x = randn(5, D_IN, seed=9)
    torch.testing.assert_close(sae.encode(x), torch.relu(x @ sae.W_enc + sae.b_enc))


def test_pre_v6_boolean_normalize_activations(tmp_path: Path) -> None:
    cfg = {"hook_name": "blocks.2.hook_resid_post", "d_in": D_IN, "d_sae": D_SAE, "normalize_activations": True}
    sae = SparseAutoencoder.load(write_saelens(tmp_path / "old", cfg), input_scale=2.0)
    assert sae.input_scale == 2.0


def v6_cfg(**kw: Any) -> dict[str, Any]:
    return {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"hook_name": "blocks.1.hook_resid_post", "model_name": "m"}, **kw}


def test_expected_average_only_in_needs_input_scale(tmp_path: Path) -> None:
    path = write_saelens(tmp_path / "sae", v6_cfg(normalize_activations="expected_average_only_in"))
    with pytest.raises(ConfigError, match="input_scale"):
        SparseAutoencoder.load(path)


def test_expected_average_only_in_with_input_scale(tmp_path: Path) -> None:
    path = write_saelens(tmp_path / "sae", v6_cfg(normalize_activations="expected_average_only_in"))
    sae = SparseAutoencoder.load(path, input_scale=2.0)
    assert sae.input_scale == 2.0
    x = randn(5, D_IN, seed=10)
    f = sae.encode(x)
    torch.testing.assert_close(f, torch.relu((2.0 * x - sae.b_dec) @ sae.W_enc + sae.b_enc))
    torch.testing.assert_close(sae.decode(f), (f @ sae.W_dec + sae.b_dec) / 2.0)
    # Saving folds the scale, and the folded file loads without one.
    back = SparseAutoencoder.load(sae.save(tmp_path / "folded"))
    assert back.input_scale == 1.0
    torch.testing.assert_close(back.encode(x), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back.decode(f), sae.decode(f), rtol=1e-5, atol=1e-5)


def test_unsupported_normalisation_lists_valid_ones(tmp_path: Path) -> None:
    path = write_saelens(tmp_path / "sae", v6_cfg(normalize_activations="layer_norm"))
    with pytest.raises(SAEFormatError, match="'layer_norm' is not supported; valid: none, expected_average_only_in"):
        SparseAutoencoder.load(path)


def test_unknown_architecture_in_cfg_lists_valid_ones(tmp_path: Path) -> None:
    path = write_saelens(tmp_path / "sae", v6_cfg(architecture="gated"))
    with pytest.raises(SAEFormatError, match="'gated' is not supported; valid: standard, jumprelu, topk"):
        SparseAutoencoder.load(path)


def test_jumprelu_file_without_threshold(tmp_path: Path) -> None:
    path = write_saelens(tmp_path / "sae", v6_cfg(architecture="jumprelu"))
    with pytest.raises(SAEFormatError, match="jumprelu SAE needs a 'threshold' tensor"):
        SparseAutoencoder.load(path)


def test_cfg_width_disagreeing_with_weights(tmp_path: Path) -> None:
    path = write_saelens(tmp_path / "sae", v6_cfg(d_sae=D_SAE + 1))
    with pytest.raises(SAEFormatError, match=re.escape(f"d_sae={D_SAE + 1} but W_enc has shape ({D_IN}, {D_SAE})")):
        SparseAutoencoder.load(path)


def test_wrong_tensor_shape_in_file(tmp_path: Path) -> None:
    tensors = {"W_enc": torch.zeros(D_IN, D_SAE), "W_dec": torch.zeros(D_IN, D_SAE),  # transposed decoder
               "b_enc": torch.zeros(D_SAE), "b_dec": torch.zeros(D_IN)}
    path = write_saelens(tmp_path / "sae", v6_cfg(), tensors)
    expected = f"W_dec has shape ({D_IN}, {D_SAE}), expected ({D_SAE}, {D_IN})"
    with pytest.raises(SAEFormatError, match=re.escape(expected)):
        SparseAutoencoder.load(path)


def test_missing_tensor_in_file(tmp_path: Path) -> None:
    tensors = {"W_enc": torch.zeros(D_IN, D_SAE), "W_dec": torch.zeros(D_SAE, D_IN), "b_dec": torch.zeros(D_IN)}
    path = write_saelens(tmp_path / "sae", v6_cfg(), tensors)
    with pytest.raises(SAEFormatError, match="lacks tensor.*b_enc; it has W_dec, W_enc, b_dec"):
        SparseAutoencoder.load(path)


@pytest.mark.parametrize("name", ["W_enc", "W_dec", "b_enc", "b_dec"])
def test_nan_in_file_names_the_tensor(tmp_path: Path, name: str) -> None:
    path = build_sae(D_IN, D_SAE).save(tmp_path / "sae")
    from safetensors.torch import load_file

    tensors = load_file(str(path / "sae_weights.safetensors"))
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(path / "sae_weights.safetensors"))
    with pytest.raises(SAEFormatError, match=rf"{name} holds 1 non-finite value.*corrupt"):
        SparseAutoencoder.load(path)


def test_missing_cfg_json(tmp_path: Path) -> None:
    path = build_sae().save(tmp_path / "sae")
    (path / "cfg.json").unlink()
    with pytest.raises(SAEFormatError, match=r"cannot read .*cfg\.json"):
        SparseAutoencoder.load(path)


@pytest.mark.parametrize(("text", "message"), [("{not json", "cannot read"), ("[1, 2]", "must hold a JSON object")])
def test_bad_cfg_json(tmp_path: Path, text: str, message: str) -> None:
    path = build_sae().save(tmp_path / "sae")
    (path / "cfg.json").write_text(text)
    with pytest.raises(SAEFormatError, match=message):
        SparseAutoencoder.load(path)


# --------------------------------------------------------- broken paths
def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(SAEFormatError, match=r"no SAE at .*nowhere: expected a directory"):
        SparseAutoencoder.load(tmp_path / "nowhere")


def test_directory_without_weights_lists_what_it_found(tmp_path: Path) -> None:
    (tmp_path / "cfg.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SAEFormatError,
                       match=r"holds no SAE weights.*sae_weights\.safetensors.*found cfg\.json, notes\.txt$"):
        SparseAutoencoder.load(tmp_path)


def test_empty_directory_says_nothing_found(tmp_path: Path) -> None:
    with pytest.raises(SAEFormatError, match="found nothing"):
        SparseAutoencoder.load(tmp_path)


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = build_sae().save(tmp_path / "sae")
    weights = path / "sae_weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFormatError, match=r"cannot read .*sae_weights\.safetensors.*truncated or corrupt"):
        SparseAutoencoder.load(path)


@pytest.mark.parametrize("damage", ["length", "json"])
def test_corrupt_safetensors_header(tmp_path: Path, damage: str) -> None:
    path = build_sae().save(tmp_path / "sae")
    weights = path / "sae_weights.safetensors"
    data = weights.read_bytes()
    # The first 8 bytes give the header length; the JSON header follows.
    data = b"\xff" * 8 + data[8:] if damage == "length" else data[:8] + b"{garbage" + data[16:]
    weights.write_bytes(data)
    with pytest.raises(SAEFormatError, match=r"cannot read .*header.*truncated or corrupt"):
        SparseAutoencoder.load(path)
