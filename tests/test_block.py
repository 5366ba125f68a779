"""Block: compute stops in the forward pass that fired — no decode step runs after the alert.

Measured by counting forward passes with a forward pre-hook on the model, on the
tiny in-process Llama (always) and on the embedded model (slow).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from conftest import EMBEDDED_HP, HP, build_sae
from featurewatch.alert import Alert
from featurewatch.detector import DetectorSpec, FeatureWeight
from featurewatch.errors import GenerationBlocked
from featurewatch.monitor import Monitor


def block_spec(hookpoint: str, feature: int, min_tokens: int) -> DetectorSpec:
    """A detector that blocks once ``min_tokens`` completion tokens have been read (threshold far below any score)."""
    return DetectorSpec(name="blocker", description="fires after min_tokens completion tokens", hookpoint=hookpoint,
                        features=[FeatureWeight(id=feature, weight=1.0)], threshold=-1e6, action="block",
                        phases=["completion"], pooling={"method": "mean", "min_tokens": min_tokens})


def count_passes(model: Any, tokenizer: Any, spec: DetectorSpec, prompt: str, max_new_tokens: int,
                 **kw: Any) -> tuple[int, int, GenerationBlocked]:
    """(forward passes in all, forward passes when the alert fired, the GenerationBlocked raised)."""
    passes = [0]
    at_alert: list[int] = []

    def on_alert(alert: Alert) -> None:
        at_alert.append(passes[0])

    handle = model.register_forward_pre_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
    try:
        with Monitor(model, tokenizer, detectors=[spec], on_alert=on_alert, fail_closed=True, **kw) as m, \
                pytest.raises(GenerationBlocked) as info:
            m.generate(prompt, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
    finally:
        handle.remove()
    assert len(at_alert) == 1
    return passes[0], at_alert[0], info.value


@pytest.mark.parametrize("min_tokens", [1, 3, 6])
def test_block_runs_no_forward_pass_after_the_alert(tiny_llama: Any, tiny_tokenizer: Any, min_tokens: int) -> None:
    sae = build_sae(16, 12, architecture="standard", seed=1, b_enc=torch.full((12,), 0.5))
    total, at_alert, blocked = count_passes(tiny_llama, tiny_tokenizer, block_spec(HP, 3, min_tokens), "abc", 20,
                                            saes={HP: sae})
    # pass 1 is the prefill; pass k+1 reads completion token k: the alert fires in pass min_tokens + 1
    assert at_alert == min_tokens + 1
    assert total == at_alert  # the pass that fired was the last one
    # that pass still chose one more token; the reply ends there
    assert len(blocked.result.token_ids) == min_tokens + 1 < 20


@pytest.mark.slow
def test_block_on_the_embedded_model_runs_no_forward_pass_after_the_alert(smollm: Any) -> None:
    from featurewatch.pack import load_pack

    pack = load_pack()
    total, at_alert, blocked = count_passes(smollm.model, smollm.tokenizer, block_spec(EMBEDDED_HP, 1589, 8),
                                            "Write a short poem about the sea.", 40, pack=pack)
    assert at_alert == 9 and total == at_alert
    assert len(blocked.result.token_ids) == 9
