"""Forward hooks: reading activations and stopping the forward pass early.

Everything here is about *registering and always removing* hooks. The hot
path of live monitoring is wired in :mod:`featurewatch.monitor`; offline work
that needs raw activations (harvesting for SAE training, calibration caches)
uses :func:`forward_until`, which stops the model after the deepest layer it
needs — no later layers, no LM head.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .models import resolve_hookpoint


def unwrap(output: Any) -> Tensor:
    """The hidden states of a decoder layer's output (a Tensor in transformers 5.x, a tuple in 4.x)."""
    return output if torch.is_tensor(output) else output[0]


def rewrap(output: Any, hidden: Tensor) -> Any:
    """Put changed hidden states back in the shape the layer returned."""
    if torch.is_tensor(output):
        return hidden
    return (hidden, *output[1:])


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the deepest needed layer ran."""


@contextmanager
def hooked(modules: Sequence[tuple[nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """Register forward hooks for the block's duration; they are removed even on error."""
    handles = [m.register_forward_hook(fn) for m, fn in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def forward_until(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                  hookpoints: Sequence[str]) -> dict[str, Tensor]:
    """Run ``model`` until every hookpoint has run; return their activations ``(batch, seq, d_model)``,
    keyed by the names as given (a SAELens ``blocks.N.hook_resid_post`` under that name, not ``layers.N``)."""
    resolved = [resolve_hookpoint(model, hp) for hp in hookpoints]
    deepest = max(index for _, index, _ in resolved)
    captured: dict[str, Tensor] = {}

    def make(name: str, index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            captured[name] = unwrap(output)
            if index == deepest:
                raise _StopForward
        return hook

    with hooked([(module, make(name, index)) for name, index, module in resolved]), \
            contextlib.suppress(_StopForward):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return {hp: captured[name] for hp, (name, _, _) in zip(hookpoints, resolved)}
