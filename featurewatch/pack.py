"""Packs: versioned bundles of SAEs, feature labels and calibrated detectors for one model.

Layout (docs/architecture.md, "Pack layout")::

    <pack>/pack.json          manifest: model, hookpoints → SAE dirs, version, provenance
    <pack>/sae/<hookpoint>/   SAELens layout
    <pack>/features.json      per hookpoint: per-feature label, max activation, density, contexts
    <pack>/<detector>.json    one DetectorSpec each

Packs shipped with featurewatch live in the ``featurewatch.detectors`` package
data (the repository's top-level ``detectors/``). Everything is validated at
load so a bad pack fails before it touches a model.

A pack is data someone else may have written, so it is confined: every path
it names (SAE directories, probe weights) and every file it holds resolves,
symlinks followed, to a place inside the pack directory, and only regular
files are opened (a FIFO or a device would hang or flood the loader).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .detector import DetectorSpec
from .errors import ConfigError, FeatureOutOfRange, SAEFormatError
from .models import normalize_hookpoint
from .sae import SparseAutoencoder, check_feature_ids

DEFAULT_PACK = "smollm2-135m-instruct"
_RESERVED = {"pack.json", "features.json", "build.json"}  # build.json: what build-pack measured


class PackManifest(BaseModel):
    """``pack.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    model: str = Field(description="model the pack was made for (id or name)")
    hookpoints: dict[str, str] = Field(description="hookpoint → SAE directory relative to the pack")
    default_detectors: list[str] | None = Field(default=None, description=(
        "detectors a monitor loads when none are named (default: all)"))
    shadow: bool | list[str] = Field(default=False, description=(
        "block detectors that run in shadow mode (true: all): they alert with would_block and stop nothing, "
        "for rolling blocking out; Monitor(shadow=...) and FEATUREWATCH_SHADOW override it"))
    description: str = ""
    provenance: dict[str, Any] = Field(default_factory=dict)


class FeatureInfo(BaseModel):
    """Statistics and label of one SAE feature."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int
    label: str | None = None
    max_activation: float = 0.0
    density: float = 0.0
    top_contexts: list[str] = Field(default_factory=list)


@dataclass
class Pack:
    """A loaded pack."""

    path: Path
    manifest: PackManifest
    saes: dict[str, SparseAutoencoder]
    detectors: dict[str, DetectorSpec]
    features: dict[str, dict[int, FeatureInfo]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.manifest.name

    def select(self, names: list[str] | None) -> list[DetectorSpec]:
        """Detectors by name (the pack's defaults when ``None``), or say which exist."""
        if names is None:
            names = self.manifest.default_detectors or sorted(self.detectors)
        unknown = [n for n in names if n not in self.detectors]
        if unknown:
            raise ConfigError(f"pack {self.name!r} has no detector {', '.join(map(repr, unknown))}; "
                              f"valid: {', '.join(sorted(self.detectors))}")
        return [self.detectors[n] for n in names]

    def label(self, hookpoint: str, feature: int) -> str | None:
        info = self.features.get(hookpoint, {}).get(feature)
        return info.label if info else None

    def max_activation(self, hookpoint: str, feature: int) -> float | None:
        info = self.features.get(hookpoint, {}).get(feature)
        return info.max_activation if info and info.max_activation > 0 else None

    def feature_summary(self, hookpoint: str, feature: int) -> dict[str, Any]:
        """What the pack knows of one feature: label, statistics, stored top contexts, the detectors reading it.

        ``hookpoint`` (``layers.N`` or SAELens ``blocks.N.hook_resid_post``) must have an SAE in the pack and
        ``feature`` be in its range (else
        :class:`ConfigError` / :class:`FeatureOutOfRange` naming the valid ones).
        """
        given = hookpoint
        with contextlib.suppress(ConfigError):  # a name not understood is named below, with the valid ones
            hookpoint = normalize_hookpoint(hookpoint)  # SAELens blocks.N.hook_resid_post, as everywhere else
        sae = self.saes.get(hookpoint)
        if sae is None:
            raise ConfigError(f"pack {self.name} has no SAE at {given!r}; valid: {', '.join(self.saes)}")
        check_feature_ids(sae, [feature], hookpoint=hookpoint)
        info = self.features.get(hookpoint, {}).get(feature)
        used_by = [{"detector": d.name, "weight": f.weight} for d in self.detectors.values()
                   if normalize_hookpoint(d.hookpoint) == hookpoint for f in d.features if f.id == feature]
        return {"feature": feature, "hookpoint": hookpoint, "d_sae": sae.d_sae,
                "label": info.label if info else None,
                "max_activation": info.max_activation if info else None,
                "density": info.density if info else None, "used_by": used_by,
                "top_contexts": list(info.top_contexts) if info else []}

    def probe_weight(self, spec: DetectorSpec) -> torch.Tensor:
        """The ``(d_model,)`` weight of a probe detector."""
        path = confined(self.path, str(spec.probe_weights), what=f"detector {spec.name!r} probe_weights")
        return _load_probe(path, self.saes[spec.hookpoint].d_in if spec.hookpoint in self.saes else None)


def shipped_packs_dir() -> Path:
    return Path(str(resources.files("featurewatch.detectors")))


def list_packs() -> list[str]:
    """Names of the packs shipped with featurewatch."""
    root = shipped_packs_dir()
    return sorted(p.name for p in root.iterdir() if (p / "pack.json").is_file())


def resolve_pack_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if (p / "pack.json").is_file():
        return p
    shipped = shipped_packs_dir() / str(name_or_path)
    if (shipped / "pack.json").is_file():
        return shipped
    raise ConfigError(f"no pack {str(name_or_path)!r}: not a directory with pack.json, nor a shipped pack; "
                      f"shipped packs: {', '.join(list_packs()) or 'none'}")


def confined(root: Path, rel: str, *, what: str) -> Path:
    """``root / rel`` with symlinks resolved, refused unless it stays inside ``root``."""
    base = root.resolve()
    if Path(rel).is_absolute():
        raise ConfigError(f"{root}: {what} {rel!r} is an absolute path; paths in a pack are relative to the "
                          "pack directory: copy the file into the pack and name it relative to it")
    target = (base / rel).resolve()
    if not target.is_relative_to(base):
        raise ConfigError(f"{root}: {what} {rel!r} resolves to {target}, outside the pack; paths in a pack "
                          "must stay inside its directory: copy the file into the pack")
    return target


def _check_regular(path: Path, root: Path) -> None:
    """Refuse a pack entry that leaves the pack through a symlink or is not a regular file or directory."""
    target = path.resolve()
    if not target.is_relative_to(root.resolve()):
        raise ConfigError(f"{path} is a link to {target}, outside the pack; copy the file into the pack")
    if target.exists() and not (target.is_file() or target.is_dir()):
        raise ConfigError(f"{path} is not a regular file (a FIFO, socket or device); replace it with the file")


def _read_json(path: Path) -> Any:
    if path.exists() and not path.is_file():
        raise ConfigError(f"{path} is not a regular file; a pack holds plain JSON files")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path} is missing") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc


def _validation_message(path: Path, exc: ValidationError) -> str:
    parts = [f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in exc.errors()]
    return f"{path}: " + "; ".join(parts)


def load_spec(path: str | Path) -> DetectorSpec:
    """Read and validate one detector spec file."""
    p = Path(path)
    try:
        return DetectorSpec.model_validate(_read_json(p))
    except ValidationError as exc:
        raise ConfigError(_validation_message(p, exc)) from None


def _load_probe(path: Path, d_in: int | None) -> torch.Tensor:
    from safetensors.torch import load_file

    if path.exists() and not path.is_file():
        raise ConfigError(f"probe weights {path} are not a regular file; give a .safetensors file")
    try:
        weight = load_file(str(path))["weight"].float()
    except FileNotFoundError as exc:
        raise ConfigError(f"probe weights {path} are missing") from exc
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise SAEFormatError(f"cannot read probe weights {path}: {exc}") from exc
    if weight.ndim != 1 or (d_in is not None and weight.shape[0] != d_in):
        raise ConfigError(f"{path}: 'weight' has shape {tuple(weight.shape)}, expected ({d_in},)")
    if not torch.isfinite(weight).all():
        raise SAEFormatError(f"{path}: 'weight' holds non-finite values")
    return weight


def load_pack(name_or_path: str | Path = DEFAULT_PACK) -> Pack:
    """Load and validate a pack by shipped name or path."""
    root = resolve_pack_path(name_or_path).resolve()
    for entry in root.iterdir():
        _check_regular(entry, root)
    try:
        manifest = PackManifest.model_validate(_read_json(root / "pack.json"))
    except ValidationError as exc:
        raise ConfigError(_validation_message(root / "pack.json", exc)) from None
    saes: dict[str, SparseAutoencoder] = {}
    for hookpoint, rel in manifest.hookpoints.items():
        sae_dir = confined(root, rel, what=f"pack.json hookpoints[{hookpoint!r}]")
        if sae_dir.is_dir():
            for entry in sae_dir.iterdir():
                _check_regular(entry, root)
        saes[normalize_hookpoint(hookpoint)] = SparseAutoencoder.load(sae_dir)
    features: dict[str, dict[int, FeatureInfo]] = {}
    if (root / "features.json").is_file():
        raw = _read_json(root / "features.json")
        try:
            for hookpoint, rows in raw.items():
                features[normalize_hookpoint(hookpoint)] = {
                    r["id"]: FeatureInfo.model_validate(r) for r in rows}
        except (ValidationError, AttributeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{root / 'features.json'}: expected {{hookpoint: [feature objects]}} ({exc})") from None
    detectors: dict[str, DetectorSpec] = {}
    for spec_path in sorted(root.glob("*.json")):
        if spec_path.name in _RESERVED:
            continue
        spec = load_spec(spec_path)
        _check_spec(spec, spec_path, saes, root)
        if spec.name in detectors:
            raise ConfigError(f"{spec_path}: detector name {spec.name!r} is used twice in the pack")
        detectors[spec.name] = spec
    pack = Pack(root, manifest, saes, detectors, features)
    pack.select(manifest.default_detectors)  # names in default_detectors must exist
    if isinstance(manifest.shadow, list):
        pack.select(manifest.shadow)  # and so must those in shadow
    return pack


def _check_spec(spec: DetectorSpec, path: Path, saes: dict[str, SparseAutoencoder], root: Path) -> None:
    hookpoint = normalize_hookpoint(spec.hookpoint)
    if spec.kind == "sae":
        if hookpoint not in saes:
            raise ConfigError(f"{path}: hookpoint {spec.hookpoint!r} has no SAE in this pack; "
                              f"valid: {', '.join(saes) or 'none'}")
        try:
            check_feature_ids(saes[hookpoint], [f.id for f in spec.features], hookpoint=hookpoint)
        except FeatureOutOfRange as exc:
            raise FeatureOutOfRange(f"{path}: {exc}") from None
    else:
        probe = confined(root, str(spec.probe_weights), what="probe_weights")
        _load_probe(probe, saes[hookpoint].d_in if hookpoint in saes else None)
    if not math.isfinite(spec.threshold):
        raise ConfigError(f"{path}: threshold must be finite")
