"""Interventions: clamp, add, scale or ablate SAE features in the residual stream while the model runs.

The maths keeps the SAE's error term, so only the chosen features change::

    x' = x + Σᵢ (a'ᵢ − aᵢ) · W_dec[i]        a = the SAE encoding of x

An intervention that leaves ``aᵢ`` unchanged leaves ``x`` unchanged exactly. It
applies at every new position (prefill and each cached decode step) of every
run, except padding, special tokens and the attention sink; ``phases`` limits
it to the prompt or the completion, and ``when=DETECTOR`` switches it on in a
run from the position after that detector fires there. A detector's
``action: suppress`` is the same machinery: ablate its positively weighted
features, ``when`` it fires.

Values for ``clamp`` and ``add`` are in units of the feature's maximum
activation (from the pack's feature statistics), so ``value=2`` means twice
the largest activation seen in the SAE's training text — the scale of
Anthropic's Golden Gate demonstration; ``absolute=True`` takes raw units.
A value is refused (one line, before any generation) when it is beyond
:data:`STEER_LIMIT` × the feature's max activation (a ``scale`` factor beyond
:data:`STEER_LIMIT`), or when the change it makes would not be finite in the
residual stream's dtype: an overflowing edit turns every logit into NaN.
Interventions stacked on one feature add their changes, so the bound holds for
their sum (a call's interventions together with the monitor's own).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor

from .alert import Phase
from .detector import DetectorSpec
from .errors import ConfigError
from .positions import StepTokens
from .sae import SparseAutoencoder, SubsetEncoder, check_feature_ids
from .state import RunState

Mode = Literal["clamp", "add", "scale", "ablate"]
MODES: tuple[Mode, ...] = ("clamp", "add", "scale", "ablate")
STEER_LIMIT = 1000.0
"""The largest ``|value|`` in max-activation units (clamp/add), and the largest ``|factor|`` (scale)."""
_STEER = re.compile(r"^(?:(?P<hp>[A-Za-z_][\w.]*):)?(?P<feature>\d+):(?P<mode>[a-z]+)(?::(?P<value>[-+0-9.eE]+))?$")


class Intervention(BaseModel):
    """One change to one SAE feature during generation.

    Example::

        Intervention(feature=812, mode="clamp", value=2)          # 2 × the feature's max activation
        Intervention(feature=812, mode="ablate", when="deception")  # once deception fires in a run
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    feature: int = Field(ge=0, strict=True, description="feature index in the SAE at the hookpoint")
    mode: Mode = Field(description="clamp: set to value; add: add value; scale: multiply by value; ablate: set to 0")
    value: float | None = Field(default=None, strict=True, description=(
        "clamp/add: in units of the feature's max activation (unless absolute); scale: the factor"))
    absolute: bool = Field(default=False, strict=True,
                           description="clamp/add values are raw activations, not × max activation")
    hookpoint: str | None = Field(default=None, description="default: the pack's SAE hookpoint (when it has one)")
    phases: tuple[Phase, ...] = Field(default=("prompt", "completion"), min_length=1)
    when: str | None = Field(default=None, description="a detector name: active after it fires in the run")

    @model_validator(mode="after")
    def _value(self) -> Intervention:
        if self.mode == "ablate":
            if self.value not in (None, 0):
                raise ValueError("mode 'ablate' takes no value (it sets the feature to 0)")
        elif self.value is None or not math.isfinite(self.value):
            raise ValueError(f"mode {self.mode!r} needs a finite value")
        elif (self.mode == "scale" or not self.absolute) and abs(self.value) > STEER_LIMIT:
            unit = "a factor" if self.mode == "scale" else "× the feature's max activation"
            raise ValueError(f"{self.mode} value {self.value:g} is beyond ±{STEER_LIMIT:g} ({unit}): the edit would "
                             "swamp the residual stream; use a value within it")
        return self

    @classmethod
    def parse(cls, text: str) -> Intervention:
        """Parse the CLI form ``[HOOKPOINT:]FEATURE:MODE[:VALUE]``, e.g. ``812:clamp:2``."""
        m = _STEER.match(text.strip())
        if m is None or m["mode"] not in MODES:
            raise ConfigError(f"cannot read intervention {text!r}: write [HOOKPOINT:]FEATURE:MODE[:VALUE] with MODE "
                              f"one of {', '.join(MODES)}, e.g. 812:clamp:2 or layers.15:812:ablate")
        try:
            return cls(feature=int(m["feature"]), mode=m["mode"],
                       value=None if m["value"] is None else float(m["value"]), hookpoint=m["hp"])
        except ValidationError as exc:  # one line, not pydantic's report
            raise ConfigError(f"intervention {text!r}: {first_error(exc)}") from None
        except ValueError as exc:
            raise ConfigError(f"intervention {text!r}: {exc}") from None


def first_error(exc: ValidationError) -> str:
    """The first problem of a pydantic error as one line (no input dump, no URL)."""
    err = exc.errors()[0]
    msg = str(err.get("msg", exc)).removeprefix("Value error, ")
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {msg}" if where else msg


def suppression(spec: DetectorSpec) -> list[Intervention]:
    """A detector's ``suppress`` action: ablate its positively weighted features once it fires."""
    return [Intervention(feature=f.id, mode="ablate", hookpoint=spec.hookpoint, when=spec.name)
            for f in spec.features if f.weight > 0]


@dataclass
class Steering:
    """The interventions at one hookpoint, compiled: one subset encode and one matmul per pass."""

    hookpoint: str
    interventions: list[Intervention]
    encoder: SubsetEncoder
    W_dec: Tensor  # (k, d_model) decoder rows in activation units
    mode: Tensor  # (k,) long index into MODES
    value: Tensor  # (k,) absolute target / addend / factor
    phase_ok: Tensor  # (2, k) bool: row 0 prompt, row 1 completion

    def delta(self, x: Tensor, tokens: StepTokens, runs: Sequence[RunState]) -> Tensor | None:
        """The change to residuals ``x`` ``(n, d)`` of the step's tokens, or None when nothing applies."""
        active = tokens.steerable.unsqueeze(1) & self.phase_ok[tokens.completion.long()]
        for j, iv in enumerate(self.interventions):
            if iv.when is not None:  # from the position after the detector fired in that run
                fired = torch.tensor([runs[r].fired.get(iv.when, math.inf) for r in tokens.run.tolist()])
                active[:, j] &= tokens.position > fired
        if not bool(active.any()):
            return None
        active = active.to(x.device)
        a = self.encoder(x)
        mode, value = self.mode, self.value
        new = torch.where(mode == 0, value, torch.where(mode == 1, a + value, torch.where(mode == 2, a * value, 0.0)))
        return (torch.where(active, new, a) - a) @ self.W_dec


def sae_hookpoint(iv: Intervention, sae_hookpoints: Sequence[str],
                  canonical: Callable[[str], str] = lambda hp: hp) -> str:
    """The SAE hookpoint an intervention acts at: the one it names (made ``canonical``), or the only one."""
    if iv.hookpoint is None:
        if len(sae_hookpoints) != 1:
            raise ConfigError(f"intervention on feature {iv.feature} names no hookpoint and the monitor has "
                              f"{len(sae_hookpoints)} SAE hookpoints ({', '.join(sae_hookpoints) or 'none'}): "
                              "set hookpoint=")
        return sae_hookpoints[0]
    hp = canonical(iv.hookpoint)
    if hp not in sae_hookpoints:
        raise ConfigError(f"intervention at {iv.hookpoint!r}: there is no SAE there; "
                          f"SAE hookpoints: {', '.join(sae_hookpoints) or 'none'}")
    return hp


def _check_size(iv: Intervention, hp: str, value: float, unit: float | None, sae: SparseAutoencoder,
                dtype: torch.dtype) -> None:
    """A compiled value within :data:`STEER_LIMIT` max activations, and its change finite in ``dtype``."""
    if iv.mode == "ablate":
        return
    target = abs(value) * (unit or 1.0) if iv.mode == "scale" else abs(value)  # activation units
    if iv.mode != "scale" and unit and target > STEER_LIMIT * unit:
        raise ConfigError(f"intervention on feature {iv.feature} at {hp}: {iv.mode} {iv.value:g} is "
                          f"{target / unit:.3g} × the feature's max activation ({unit:g}); keep it within "
                          f"±{STEER_LIMIT:g} ×")
    row = float(sae.W_dec[iv.feature].abs().max()) / (sae.input_scale or 1.0)
    biggest = float(torch.finfo(dtype).max) if dtype.is_floating_point else math.inf
    if not math.isfinite(target * row) or target * row > biggest / 4:
        raise ConfigError(f"intervention on feature {iv.feature} at {hp}: {iv.mode} {iv.value:g} changes the "
                          f"residual stream by up to {target * row:.3g}, which overflows {dtype} "
                          f"(max {biggest:.3g}); use a smaller value")


def _check_stack(feature: int, hp: str, stack: Sequence[tuple[Intervention, float, float | None]],
                 sae: SparseAutoencoder, dtype: torch.dtype) -> None:
    """Several interventions on one feature add their changes (each is computed from the same encoding), so
    their sum is held to what one may do: within :data:`STEER_LIMIT` max activations, finite in ``dtype``."""
    unit = next((u for _, _, u in stack if u), None)
    total = sum(0.0 if iv.mode == "ablate" else abs(value) * (unit or 1.0) if iv.mode == "scale" else abs(value)
                for iv, value, _ in stack)  # activation units
    what = ", ".join(f"{iv.mode} {iv.value:g}" if iv.value is not None else iv.mode for iv, _, _ in stack)
    if unit and total > STEER_LIMIT * unit:
        raise ConfigError(f"{len(stack)} interventions on feature {feature} at {hp} ({what}) add up to "
                          f"{total / unit:.3g} × the feature's max activation ({unit:g}); keep their sum within "
                          f"±{STEER_LIMIT:g} ×")
    row = float(sae.W_dec[feature].abs().max()) / (sae.input_scale or 1.0)
    biggest = float(torch.finfo(dtype).max) if dtype.is_floating_point else math.inf
    if not math.isfinite(total * row) or total * row > biggest / 4:
        raise ConfigError(f"{len(stack)} interventions on feature {feature} at {hp} ({what}) change the residual "
                          f"stream by up to {total * row:.3g} together, which overflows {dtype} (max "
                          f"{biggest:.3g}); use smaller values or fewer interventions")


def compile_steering(interventions: Sequence[Intervention], saes: Mapping[str, SparseAutoencoder], *,
                     max_activation: Callable[[str, int], float | None] | None = None,
                     dtype: torch.dtype = torch.float32) -> dict[str, Steering]:
    """Group interventions by hookpoint and compile each group (values in absolute units).

    ``saes`` maps canonical hookpoints (``layers.N``, as interventions must name them by now)
    to the SAEs there (float32, on the model's device); ``max_activation(hookpoint, feature)``
    gives the unit of relative clamp/add values; ``dtype``: the residual stream's, in which
    the change must stay finite.
    """
    by_hp: dict[str, list[Intervention]] = {}
    for iv in interventions:
        by_hp.setdefault(sae_hookpoint(iv, list(saes)), []).append(iv)
    out = {}
    for hp, ivs in by_hp.items():
        sae = saes[hp]
        values = []
        stacks: dict[int, list[tuple[Intervention, float, float | None]]] = {}  # feature -> (iv, value, unit)
        for iv in ivs:
            # before anything else: no advice about a feature that is not there
            check_feature_ids(sae, [iv.feature], hookpoint=hp, what="intervention on feature")
            unit = max_activation(hp, iv.feature) if max_activation is not None else None
            if iv.mode in ("clamp", "add") and not iv.absolute:
                if unit is None:
                    raise ConfigError(f"no max activation is known for feature {iv.feature} at {hp} (the pack's "
                                      "features.json has none): pass absolute=True with a raw value")
                values.append(float(iv.value or 0.0) * unit)
            else:
                values.append(float(iv.value or 0.0))
            _check_size(iv, hp, values[-1], unit, sae, dtype)
            stacks.setdefault(iv.feature, []).append((iv, values[-1], unit))
        for feature, stack in stacks.items():
            if len(stack) > 1:
                _check_stack(feature, hp, stack, sae, dtype)
        ids = [iv.feature for iv in ivs]
        device = sae.W_enc.device
        phase_ok = torch.tensor([[p in iv.phases for iv in ivs] for p in ("prompt", "completion")])  # on the CPU
        out[hp] = Steering(hookpoint=hp, interventions=list(ivs), encoder=sae.subset(ids),
                           W_dec=sae.decoder_directions(ids).float().contiguous(),
                           mode=torch.tensor([MODES.index(iv.mode) for iv in ivs], device=device),
                           value=torch.tensor(values, dtype=torch.float32, device=device), phase_ok=phase_ok)
    return out
