"""The architecture matrix: tiny random-weight models of each supported family, built from configs.

Each row is a 3-layer, width-16 model (a few thousand parameters, no download) of one
``model_type``. On every row: the hookpoints name the decoder layers (``layers.N`` and
SAELens ``blocks.N.hook_resid_post``) and read what Hugging Face's own ``hidden_states``
hold; readings of a monitored ``generate`` (KV cache) equal a full forward over the same
tokens, alone and in a left-padded batch; a clamp and an ablation change the residual the
next layer receives exactly as ``x' = x + Σ (a'ᵢ − aᵢ)·W_dec[i]`` (the SAE's error term
kept); and ``block`` stops the generation in the forward pass that fired.

The oracle here is the test's own: each row names where its decoder layers and final
norm live (``layers``, ``norm``), independently of ``featurewatch.models.ARCHITECTURES``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from test_block import block_spec, count_passes
from torch import nn

from conftest import TinyTokenizer, build_sae
from featurewatch import models
from featurewatch.errors import HookpointNotFound
from featurewatch.hooks import forward_until, unwrap
from featurewatch.intervention import Intervention
from featurewatch.monitor import Monitor

D, LAYERS, VOCAB = 16, 3, 64  # TinyTokenizer's ids are 0 … 28
WATCH = list(range(12))
SPECIAL = (0, 1)


@dataclass(frozen=True)
class Arch:
    """One row: how to build the tiny model, and where (by the test's own reckoning) its parts are."""

    config: str  # transformers class names
    model: str
    layers: str  # dotted path to the decoder-layer list
    norm: str  # dotted path to the norm between the last layer and the LM head
    kwargs: dict[str, Any] = field(default_factory=dict)


_COMMON = dict(hidden_size=D, intermediate_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
               max_position_embeddings=128)
ARCHS = {
    "llama": Arch("LlamaConfig", "LlamaForCausalLM", "model.layers", "model.norm",
                  dict(_COMMON, num_key_value_heads=2)),
    "qwen2": Arch("Qwen2Config", "Qwen2ForCausalLM", "model.layers", "model.norm",
                  dict(_COMMON, num_key_value_heads=1)),
    "qwen3": Arch("Qwen3Config", "Qwen3ForCausalLM", "model.layers", "model.norm",
                  dict(_COMMON, num_key_value_heads=1, head_dim=8)),
    # sliding windows shorter than the test sequences, so the cache's window is exercised
    "gemma2": Arch("Gemma2Config", "Gemma2ForCausalLM", "model.layers", "model.norm",
                   dict(_COMMON, num_key_value_heads=1, head_dim=8, sliding_window=4)),
    "gemma3_text": Arch("Gemma3TextConfig", "Gemma3ForCausalLM", "model.layers", "model.norm",
                        dict(_COMMON, num_key_value_heads=1, head_dim=8, sliding_window=4)),
    "mistral": Arch("MistralConfig", "MistralForCausalLM", "model.layers", "model.norm",
                    dict(_COMMON, num_key_value_heads=1, sliding_window=4)),
    "phi3": Arch("Phi3Config", "Phi3ForCausalLM", "model.layers", "model.norm",
                 dict(_COMMON, num_key_value_heads=2, original_max_position_embeddings=128)),
    # Gemma 3 4B and up: the multimodal wrapper AutoModelForCausalLM loads (width and context in text_config)
    "gemma3": Arch("Gemma3Config", "Gemma3ForConditionalGeneration", "model.language_model.layers",
                   "model.language_model.norm",
                   dict(text_config=dict(_COMMON, num_key_value_heads=1, head_dim=8, sliding_window=4),
                        vision_config=dict(hidden_size=D, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=28, patch_size=14),
                        mm_tokens_per_image=4, boi_token_index=61, eoi_token_index=62, image_token_index=63)),
    # same layout as Llama, other blocks: Gemma 1, mixture-of-experts MLPs, SmolLM3's NoPE layers, OLMo 2's
    # post-norms, Phi-2's parallel attention and MLP, Granite's embedding and residual multipliers
    "gemma": Arch("GemmaConfig", "GemmaForCausalLM", "model.layers", "model.norm",
                  dict(_COMMON, num_key_value_heads=1, head_dim=8)),
    "mixtral": Arch("MixtralConfig", "MixtralForCausalLM", "model.layers", "model.norm",
                    dict(_COMMON, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1)),
    "qwen3_moe": Arch("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "model.layers", "model.norm",
                      dict(_COMMON, num_key_value_heads=1, head_dim=8, num_experts=2, num_experts_per_tok=1,
                           moe_intermediate_size=16)),
    "smollm3": Arch("SmolLM3Config", "SmolLM3ForCausalLM", "model.layers", "model.norm",
                    dict(_COMMON, num_key_value_heads=1)),
    "olmo2": Arch("Olmo2Config", "Olmo2ForCausalLM", "model.layers", "model.norm",
                  dict(_COMMON, num_key_value_heads=1)),
    "phi": Arch("PhiConfig", "PhiForCausalLM", "model.layers", "model.final_layernorm",
                dict(_COMMON, num_key_value_heads=2)),
    "granite": Arch("GraniteConfig", "GraniteForCausalLM", "model.layers", "model.norm",
                    dict(_COMMON, num_key_value_heads=1, embedding_multiplier=2.0, residual_multiplier=0.5)),
    "starcoder2": Arch("Starcoder2Config", "Starcoder2ForCausalLM", "model.layers", "model.norm",
                       dict(_COMMON, num_key_value_heads=1, sliding_window=4)),
    "gpt2": Arch("GPT2Config", "GPT2LMHeadModel", "transformer.h", "transformer.ln_f",
                 dict(n_embd=D, n_layer=LAYERS, n_head=2, n_positions=128)),
    "gpt_neox": Arch("GPTNeoXConfig", "GPTNeoXForCausalLM", "gpt_neox.layers", "gpt_neox.final_layer_norm",
                     dict(_COMMON)),
}


def attr(obj: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


_BUILT: dict[str, nn.Module] = {}


def build(name: str) -> nn.Module:
    """The row's tiny model (built once per test session; random weights, seeded)."""
    if name not in _BUILT:
        arch = ARCHS[name]
        transformers = importlib.import_module("transformers")
        torch.manual_seed(0)
        tokens = dict(vocab_size=VOCAB, bos_token_id=2, eos_token_id=1, pad_token_id=0)
        kwargs = dict(arch.kwargs)
        if "text_config" in kwargs:  # a multimodal wrapper: the token ids belong to its language model
            kwargs["text_config"] = {**kwargs["text_config"], **tokens}
            tokens = dict(pad_token_id=0)
        cfg = getattr(transformers, arch.config)(**tokens, **kwargs)
        model = getattr(transformers, arch.model)(cfg).eval()
        with torch.no_grad():  # transformers adds its own hooks for output_hidden_states on first use
            model(input_ids=torch.tensor([[2, 3]]), output_hidden_states=True)
        _BUILT[name] = model
    return _BUILT[name]


@pytest.fixture(params=list(ARCHS))
def arch(request: pytest.FixtureRequest) -> Iterator[tuple[str, nn.Module]]:
    model = build(request.param)
    hooks = _hook_count(model)
    yield request.param, model
    assert _hook_count(model) == hooks, "a test left hooks on the shared model"


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def layer(name: str, model: nn.Module, index: int) -> nn.Module:
    module: nn.Module = attr(model, ARCHS[name].layers)[index]
    return module


def sae(seed: int = 1) -> Any:
    """An SAE for the tiny models' width: every feature biased on, so clamps and ablations always bite."""
    return build_sae(D, 12, architecture="standard", seed=seed, b_enc=torch.full((12,), 0.5))


def forward_residuals(model: nn.Module, ids: torch.Tensor, name: str) -> tuple[list[torch.Tensor], Any]:
    """Every layer's output in one full forward (hooks on the row's own layer path), and the model output."""
    seen: list[torch.Tensor] = [torch.empty(0)] * LAYERS
    handles = [layer(name, model, i).register_forward_hook(
        lambda _m, _a, o, i=i: seen.__setitem__(i, unwrap(o).detach().clone())) for i in range(LAYERS)]
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen, out


# ----------------------------------------------------------------------------------- the matrix
def test_hookpoints_are_the_decoder_layers_and_read_the_residual_stream(arch: tuple[str, nn.Module]) -> None:
    name, model = arch
    assert model.config.model_type == name
    assert models.model_width(model) == D and models.context_length(model) == 128
    for i in range(LAYERS):
        for spelling in (f"layers.{i}", f"blocks.{i}.hook_resid_post"):
            assert models.resolve_hookpoint(model, spelling) == (f"layers.{i}", i, layer(name, model, i))
    with pytest.raises(HookpointNotFound, match=rf"layers\.0 … layers\.{LAYERS - 1}"):
        models.resolve_hookpoint(model, f"layers.{LAYERS}")
    # what the hooked module outputs is the residual stream Hugging Face reports: hidden_states[N + 1]
    # for every layer but the last, whose hidden state is after the final norm (layers.N never is)
    ids = torch.tensor([[2, 5, 9, 13, 4, 7, 20, 6]])
    seen, out = forward_residuals(model, ids, name)
    for i in range(LAYERS - 1):
        torch.testing.assert_close(seen[i], out.hidden_states[i + 1])
    with torch.no_grad():
        torch.testing.assert_close(attr(model, ARCHS[name].norm)(seen[-1]), out.hidden_states[-1])
    assert not torch.allclose(seen[-1], out.hidden_states[-1])
    # offline reads (training harvests, calibration caches) stop after the deepest layer asked for
    early = forward_until(model, ids, torch.ones_like(ids), ["layers.1", f"blocks.{LAYERS - 1}.hook_resid_post"])
    torch.testing.assert_close(early["layers.1"], seen[1])
    torch.testing.assert_close(early[f"blocks.{LAYERS - 1}.hook_resid_post"], seen[-1])


def test_cached_generation_reads_what_a_full_forward_reads(arch: tuple[str, nn.Module]) -> None:
    name, model = arch
    last = f"blocks.{LAYERS - 1}.hook_resid_post"  # a SAELens name, next to a layers.N one
    saes = {"layers.1": sae(1), last: sae(2)}
    with Monitor(model, TinyTokenizer(), saes=saes, watch={hp: WATCH for hp in saes}, fail_closed=True) as m:
        assert m.hookpoints == ["layers.1", f"layers.{LAYERS - 1}"]
        assert [r.module for r in m.readouts] == [layer(name, model, 1), layer(name, model, LAYERS - 1)]
        result = m.generate("hello there monitor", max_new_tokens=6, min_new_tokens=6)
        single = m.generate("hi", max_new_tokens=3, min_new_tokens=3)
        batch = m.generate_batch(["hi", "a much longer prompt"], max_new_tokens=3, min_new_tokens=3)
    readings = {hp: result.readings(hp) for hp in m.hookpoints}
    tokens = [r.token_id for r in readings["layers.1"]]
    assert len(tokens) == len("hellotheremonitor") + 1 + 5  # the last sampled token is never run
    seen, _ = forward_residuals(model, torch.tensor([tokens]), name)
    for hp, index in (("layers.1", 1), (f"layers.{LAYERS - 1}", LAYERS - 1)):
        ref = saes[hp if hp == "layers.1" else last].encode(seen[index][0])
        assert [r.token_id for r in readings[hp]] == tokens
        for r in readings[hp]:
            got = torch.tensor([r.features.get(f, 0.0) for f in WATCH])
            torch.testing.assert_close(got, ref[r.position], atol=1e-4, rtol=1e-4,
                                       msg=lambda s, hp=hp, r=r: f"{name} {hp} position {r.position}: {s}")
    # a left-padded batch row reads what the same prompt alone reads
    pads = len("amuchlongerprompt") - len("hi")
    padded = batch[0].readings()
    assert all(r.excluded for r in padded[:pads + 1])  # the pads, then the attention sink
    assert [r.token_id for r in padded[pads:]] == [r.token_id for r in single.readings()]
    for ra, rb in zip(padded[pads:], single.readings(), strict=True):
        for f in WATCH:
            assert ra.features.get(f, 0.0) == pytest.approx(rb.features.get(f, 0.0), abs=1e-3), (name, ra.position)


def test_a_clamp_and_an_ablation_change_the_residual_as_the_maths_says(arch: tuple[str, nn.Module]) -> None:
    name, model = arch
    s = sae(3)
    raw: list[torch.Tensor] = []  # layer 1's output before the monitor's hook
    passed: list[torch.Tensor] = []  # what layer 2 receives

    def take_input(_m: Any, args: Any, kwargs: Any) -> None:
        passed.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    before = layer(name, model, 1).register_forward_hook(lambda _m, _a, o: raw.append(unwrap(o).detach().clone()),
                                                         prepend=True)
    after = layer(name, model, 2).register_forward_pre_hook(take_input, with_kwargs=True)
    try:
        with Monitor(model, TinyTokenizer(), saes={"layers.1": s}, fail_closed=True) as m:
            ivs = [Intervention(feature=3, mode="clamp", value=4.0, absolute=True),
                   Intervention(feature=5, mode="ablate")]
            result = m.generate("abcd", max_new_tokens=4, min_new_tokens=4, interventions=ivs)
            m.generate("abcd", max_new_tokens=4, min_new_tokens=4)
    finally:
        before.remove()
        after.remove()
    n_passes = 4  # the prefill and three decode steps (the last token is never run)
    assert len(raw) == len(passed) == 2 * n_passes
    x, out = torch.cat(raw[:n_passes], dim=1)[0], torch.cat(passed[:n_passes], dim=1)[0]
    ids = [r.token_id for r in result.readings()]
    steerable = torch.tensor([p > 0 and t not in SPECIAL for p, t in enumerate(ids)])
    a = s.encode(x)
    edited = a.clone()
    edited[:, 3], edited[:, 5] = 4.0, 0.0
    want = x + (edited[:, [3, 5]] - a[:, [3, 5]]) @ s.W_dec[[3, 5]]
    torch.testing.assert_close(out[steerable], want[steerable], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[~steerable], x[~steerable], atol=0, rtol=0)  # the sink and specials untouched
    assert not torch.allclose(out[steerable], x[steerable])
    # only the two features changed: the SAE's error term is what it was
    error = x - s.decode(a)
    torch.testing.assert_close((out - s.decode(edited))[steerable], error[steerable], atol=1e-5, rtol=1e-5)
    # without interventions the next layer gets the layer's output unchanged
    for r, p in zip(raw[n_passes:], passed[n_passes:], strict=True):
        assert torch.equal(r, p)


def test_block_stops_the_generation_in_the_pass_that_fired(arch: tuple[str, nn.Module]) -> None:
    name, model = arch
    min_tokens = 2
    total, at_alert, blocked = count_passes(model, TinyTokenizer(), block_spec("layers.1", 3, min_tokens), "abc", 20,
                                            saes={"layers.1": sae()})
    # pass 1 is the prefill; pass k + 1 reads reply token k. Random weights may write a special token
    # (not read), so the pass that fires is the one that reads the min_tokens-th token that is read
    reply = blocked.result.token_ids
    read = [k + 1 for k, t in enumerate(reply) if t not in SPECIAL]
    assert at_alert == read[min_tokens - 1] + 1, (name, reply)
    assert total == at_alert, name  # no forward pass after the one that fired
    assert blocked.result.outcome == "blocked" and len(reply) == total < 20  # that pass chose the reply's last token


# ----------------------------------------------------------------------------------- outside the table
def test_the_table_covers_the_matrix_and_nothing_untested() -> None:
    assert set(ARCHS) <= set(models.ARCHITECTURES)
    untested = set(models.ARCHITECTURES) - set(ARCHS)
    assert not untested, f"architectures in the table without a row in this matrix: {sorted(untested)}"


class _Mystery(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = type("Cfg", (), {"model_type": "mystery", "hidden_size": D})()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Linear(D, D) for _ in range(2)])


def test_an_unknown_architecture_is_one_error_naming_the_supported_ones_and_how_to_add_it() -> None:
    with pytest.raises(HookpointNotFound) as info:
        models.resolve_hookpoint(_Mystery(), "layers.1")
    message = str(info.value)
    assert "'mystery'" in message
    for supported in ARCHS:
        assert supported in message
    assert "ARCHITECTURES" in message and "featurewatch/models.py" in message


def test_an_architecture_added_to_the_table_resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _Mystery()
    monkeypatch.setitem(models.ARCHITECTURES, "mystery", models.Architecture(layers=("model.layers",)))
    assert models.resolve_hookpoint(model, "layers.1")[2] is model.model.layers[1]
