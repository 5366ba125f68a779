"""Detector specs: what a detector reads, how it scores and pools, when it fires.

A detector maps each token to a score — ``bias + Σ wᵢ·aᵢ`` over a few SAE
features (kind ``sae``) or ``bias + w·x`` over the raw residual (kind
``probe``) — pools the scores over the tokens of the phases it watches, and
fires when the pooled score crosses its threshold. Scores are in logit units
when the detector was calibrated by logistic regression.

Specs are pydantic models serialised as JSON, one file per detector in a pack
(see docs/architecture.md, "Pack layout"). Unknown keys are errors.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .alert import PHASES, Action, Phase, Severity

DETECTOR_NAME = r"^[a-z][a-z0-9-]{0,62}$"
MAX_SAE_FEATURES = 128  # per sae detector; a 16k dictionary reads concepts as families of specific features


class FeatureWeight(BaseModel):
    """One SAE feature in a readout, with its weight and human label."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int = Field(ge=0, description="feature index in the SAE")
    weight: float = Field(description="weight of the feature's activation in the per-token score")
    label: str | None = Field(default=None, description="what the feature responds to")

    @field_validator("weight")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("weight must be finite")
        return v


class Pooling(BaseModel):
    """How per-token scores become one score per run and phase."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["mean", "max", "ewma"] = Field(default="mean", description=(
        "mean: running mean of token scores; max: the highest token score; "
        "ewma: the highest value of an exponentially weighted moving average"))
    alpha: float = Field(default=0.2, gt=0, le=1, description="EWMA weight of the newest token")
    min_tokens: int = Field(default=4, ge=1, description=(
        "scoreable tokens a phase must have before it can fire, at the end of a run too "
        "(a mean over 2 tokens is noise)"))
    prior_score: float | None = Field(default=None, description=(
        "mean pooling: the score a text with no evidence gets; the mean is shrunk toward it"))
    prior_tokens: float = Field(default=0.0, ge=0, description=(
        "mean pooling: weight of prior_score, in tokens: value = (Σ scores + prior_tokens·prior_score) / "
        "(n + prior_tokens)"))


class OutOfSource(BaseModel):
    """A detector's figures on whole groups of data (sources) that its fit never saw."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group_by: str = Field(description="the record field whose values were left out one at a time")
    decision: Literal["sae", "probe", "mean-diff"] = Field(description="the decision that was shipped")
    reason: str = Field(description="why that decision: the leave-one-source-out comparison")
    auroc: float | None = Field(default=None, description="AUROC of all out-of-source scores")
    worst_auroc: float | None = Field(default=None, description="the lowest AUROC of any left-out group")
    worst_group: str | None = None
    in_split_auroc: float | None = Field(default=None, description=(
        "AUROC of a split by record inside the same groups, for comparison"))
    recall: float | None = Field(default=None, description="recall of left-out positives at the thresholds")
    fpr: float | None = Field(default=None, description="false-positive rate of left-out negatives")
    groups: list[dict[str, Any]] = Field(default_factory=list, description=(
        "per left-out group: n_pos, n_neg, auroc (within the group where it has both labels, else the one "
        "below it has), auroc_pos (its positives vs every negative), auroc_neg (every positive vs its "
        "negatives), auroc_within, recall, fpr_<kind>"))
    compared: dict[str, dict[str, Any]] = Field(default_factory=dict, description=(
        "per decision kind tried: auroc, worst_auroc, in_split_auroc"))


class Calibration(BaseModel):
    """Where a detector's weights and threshold came from, and how good they measured."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: list[str] = Field(description="files (and sources) the detector was fitted and measured on")
    target_fpr: float = Field(ge=0, le=1)
    auroc: float | None = Field(default=None, description="AUROC on the held-out part of the data")
    tpr_at_fpr: float | None = Field(default=None, description="true-positive rate at the threshold")
    fpr: float | None = Field(default=None, description="measured false-positive rate at the threshold")
    n_pos: int | None = None
    n_neg: int | None = None
    held_out: str | None = Field(default=None, description="how the measuring split was made")
    date: str
    notes: str | None = None
    out_of_source: OutOfSource | None = Field(default=None, description=(
        "leave-one-source-out figures (calibrate --group-by): what the detector measured on whole "
        "groups it was not fitted on"))


class DetectorSpec(BaseModel):
    """A named rule from feature (or raw) activations to alerts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=DETECTOR_NAME, description="lower-case, dashes; used as a metric label")
    description: str
    kind: Literal["sae", "probe"] = "sae"
    hookpoint: str = Field(description="e.g. layers.15")
    features: list[FeatureWeight] = Field(default_factory=list, description="kind sae: the readout, ≤ 64")
    probe_weights: str | None = Field(default=None, description=(
        "kind probe: safetensors file (relative to the spec) with 'weight' (d_model,)"))
    bias: float = 0.0
    evidence_features: list[FeatureWeight] = Field(default_factory=list, description=(
        "kind probe: SAE features that explain the probe's score, each weighted by w·dᵢ (the probe's "
        "weight on the feature's decoder direction); watched for evidence only, never added to the score"))
    evidence_offset: float = Field(default=0.0, description=(
        "kind probe: w·b_dec, the part of the score that is the SAE's decoder bias (no feature's)"))
    pooling: Pooling = Pooling()
    threshold: float = Field(description="fire when the pooled score reaches this (the combined score's, and "
                             "each phase's unless phase_thresholds overrides it)")
    phase_thresholds: dict[Phase, float] = Field(default_factory=dict, description=(
        "per-phase thresholds (e.g. a reply calibrated apart from a prompt); phases not named use threshold"))
    hysteresis: float = Field(default=0.0, ge=0, description=(
        "after firing, the pooled score must fall below threshold − hysteresis to re-arm"))
    cooldown_tokens: int = Field(default=0, ge=0, description="tokens after an alert before it may fire again")
    phases: list[Phase] = Field(default_factory=lambda: list(PHASES), min_length=1)
    action: Action = "alert"
    severity: Severity = "warning"
    calibration: Calibration | None = None

    @field_validator("threshold", "bias")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    def threshold_for(self, phase: Phase) -> float:
        """The threshold a phase fires at."""
        return self.phase_thresholds.get(phase, self.threshold)

    @model_validator(mode="after")
    def _kind_fields(self) -> "DetectorSpec":
        if self.kind == "sae":
            if not self.features:
                raise ValueError("an sae detector needs at least one entry in 'features'")
            if len(self.features) > MAX_SAE_FEATURES:
                raise ValueError(f"an sae detector reads at most {MAX_SAE_FEATURES} features, got {len(self.features)} "
                                 "(split it into several detectors, or fit a sparser readout)")
            ids = [f.id for f in self.features]
            if len(set(ids)) != len(ids):
                raise ValueError("feature ids in 'features' must be unique")
            if self.probe_weights:
                raise ValueError("'probe_weights' is for kind 'probe' only")
            if self.evidence_features:
                raise ValueError("'evidence_features' is for kind 'probe' only (an sae detector's evidence is "
                                 "its own features)")
        elif not self.probe_weights:
            raise ValueError("a probe detector needs 'probe_weights' (a safetensors file)")
        elif len(self.evidence_features) > MAX_SAE_FEATURES:
            raise ValueError(f"a probe explains itself with at most {MAX_SAE_FEATURES} evidence features, got "
                             f"{len(self.evidence_features)}")
        if len(set(self.phases)) != len(self.phases):
            raise ValueError("'phases' must not repeat a phase")
        if any(not math.isfinite(t) for t in self.phase_thresholds.values()):
            raise ValueError("'phase_thresholds' must be finite numbers")
        if set(self.phase_thresholds) - set(self.phases):
            raise ValueError(f"'phase_thresholds' names phases the detector does not watch: "
                             f"{sorted(set(self.phase_thresholds) - set(self.phases))}; it watches {self.phases}")
        return self

    def save(self, path: str | Path) -> Path:
        """Write the spec as indented JSON."""
        p = Path(path)
        p.write_text(self.model_dump_json(indent=2, exclude_none=True) + "\n")
        return p
