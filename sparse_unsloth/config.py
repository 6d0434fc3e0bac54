"""SparseConfig: which layers are sparse, how sparse, and when.

A config is a YAML file (or the name of a preset: a file in the repository's ``configs/``) like::

    name: llama3-8b-math10k
    estimator_rank: 8          # rank of the SVD estimator
    dense_warmup_ratio: 0.1    # fraction of the training steps run dense first
    dense_warmup_steps: null   # or an exact number of steps (wins over the ratio)
    dense_output_tokens: true  # tokens with labels (and the ones predicting them) stay dense
    ffn_seq_average: true      # FFN estimator scores each sequence's mean context token (else every token); packed (padding-free) sequences apart, by their position ids
    sparsity:
      mlp:       {"3-30": 0.99}          # layer index, "a-b" (inclusive) or "all"
      self_attn: {"14-19": 0.75, "21": 0.75}

Layers that are not listed stay dense. Sparsity is the fraction of channels dropped for the
context tokens, in [0, 1).
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

MODULE_KINDS = ("mlp", "self_attn")
# What `calibrate` tries by default: estimator ranks, and sparsity levels per module kind.
CALIBRATION_RANKS = (8, 16, 32, 64)
CALIBRATION_LEVELS = {"mlp": (0.25, 0.5, 0.75, 0.9), "self_attn": (0.25, 0.5, 0.75)}
_TOP_KEYS = {
    "name", "description", "estimator_rank", "dense_warmup_ratio", "dense_warmup_steps",
    "dense_output_tokens", "ffn_seq_average", "sparsity",
}


class ConfigError(ValueError):
    """A sparse config that cannot be used; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """Per-layer sparsity and the schedule of a SparseLoRA run.

    ``mlp`` and ``self_attn`` map a 0-based decoder layer index to the fraction of channels
    dropped for context tokens. Build one directly, or with :func:`load_config`.
    """

    mlp: Mapping[int, float] = dataclasses.field(default_factory=dict)
    self_attn: Mapping[int, float] = dataclasses.field(default_factory=dict)
    estimator_rank: int = 8
    dense_warmup_ratio: float = 0.1
    dense_warmup_steps: int | None = None
    dense_output_tokens: bool = True
    ffn_seq_average: bool = True
    name: str = "custom"

    def __post_init__(self) -> None:
        for kind in MODULE_KINDS:
            table = getattr(self, kind)
            for layer, value in table.items():
                if not isinstance(layer, int) or layer < 0:
                    raise ConfigError(f"sparsity.{kind}: layer {layer!r} is not a layer index >= 0")
                _check_sparsity(f"sparsity.{kind}.{layer}", value)
            object.__setattr__(self, kind, dict(sorted(table.items())))
        if not isinstance(self.estimator_rank, int) or isinstance(self.estimator_rank, bool) \
                or self.estimator_rank < 1:
            raise ConfigError(f"estimator_rank must be an integer >= 1, got {self.estimator_rank!r}")
        if not isinstance(self.dense_warmup_ratio, (int, float)) or not 0 <= self.dense_warmup_ratio < 1:
            raise ConfigError(
                f"dense_warmup_ratio must be a number in [0, 1), got {self.dense_warmup_ratio!r}")
        steps = self.dense_warmup_steps
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 0):
            raise ConfigError(f"dense_warmup_steps must be null or an integer >= 0, got {steps!r}")
        for key in ("dense_output_tokens", "ffn_seq_average"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")

    def sparsity(self, kind: str, layer: int) -> float:
        """Fraction of channels dropped in ``kind`` ('mlp' or 'self_attn') of ``layer``."""
        return getattr(self, kind).get(layer, 0.0)

    def sparse_layers(self, kind: str) -> list[int]:
        return [layer for layer, s in getattr(self, kind).items() if s > 0]

    def warmup_steps(self, max_steps: int) -> int:
        """Number of dense steps before sparsity starts, for a run of ``max_steps`` steps."""
        if self.dense_warmup_steps is not None:
            return self.dense_warmup_steps
        return round(self.dense_warmup_ratio * max_steps)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sparsity"] = {kind: {str(k): v for k, v in out.pop(kind).items()} for kind in MODULE_KINDS}
        return out


def _check_sparsity(where: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(
            f"{where}: sparsity {value!r} is outside [0, 1). Use the fraction of channels to drop, "
            "e.g. 0.75 keeps a quarter; 0 (or leaving the layer out) keeps the layer dense.")


def _parse_layers(kind: str, key: Any) -> list[int]:
    text = str(key).strip()
    if text in ("all", "*"):
        return [-1]
    try:
        if "-" in text:
            lo, hi = (int(p) for p in text.split("-", 1))
            if lo > hi:
                raise ValueError
            return list(range(lo, hi + 1))
        return [int(text)]
    except ValueError:
        raise ConfigError(
            f"sparsity.{kind}: layer key {key!r} is not a layer index, an inclusive range like "
            "'3-30', or 'all'") from None


def config_from_dict(data: Mapping[str, Any], num_layers: int | None = None) -> SparseConfig:
    """Validate a parsed YAML mapping. ``all`` layer keys need ``num_layers``."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a sparse config must be a mapping of keys, got {type(data).__name__}")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(unknown)}; valid keys are {sorted(_TOP_KEYS)}")
    sparsity = data.get("sparsity") or {}
    if not isinstance(sparsity, Mapping):
        raise ConfigError("sparsity must map 'mlp' and/or 'self_attn' to {layers: sparsity}")
    bad = set(sparsity) - set(MODULE_KINDS)
    if bad:
        raise ConfigError(f"sparsity: unknown module kind(s) {sorted(bad)}; use 'mlp' and 'self_attn'")
    tables: dict[str, dict[int, float]] = {}
    for kind in MODULE_KINDS:
        table: dict[int, float] = {}
        entries = sparsity.get(kind) or {}
        if not isinstance(entries, Mapping):
            raise ConfigError(f"sparsity.{kind} must map layers to a sparsity, e.g. {{'3-30': 0.9}}")
        for key, value in entries.items():
            _check_sparsity(f"sparsity.{kind}.{key}", value)
            layers = _parse_layers(kind, key)
            if layers == [-1]:
                if num_layers is None:
                    raise ConfigError(f"sparsity.{kind}: 'all' needs the model's layer count")
                layers = list(range(num_layers))
            for layer in layers:
                if layer in table:
                    raise ConfigError(f"sparsity.{kind}: layer {layer} is listed twice")
                table[layer] = float(value)
        tables[kind] = table
    fields = {k: v for k, v in data.items() if k not in ("sparsity", "description")}
    return SparseConfig(**tables, **fields)


def presets_dir() -> Path:
    """The folder of the preset YAML files.

    Installed from a wheel, the presets are the package ``sparse_unsloth/configs/``; in a source
    checkout (an editable install, or the checkout on ``sys.path``) they are its top-level
    ``configs/``, which pyproject.toml maps to that package. Looked up by path rather than by
    import so that a checkout on ``sys.path`` needs no install.
    """
    package = Path(__file__).resolve().parent
    for folder in (package / "configs", package.parent / "configs"):
        if (folder / "__init__.py").is_file():
            return folder
    raise ConfigError(f"the preset folder is missing (neither {package / 'configs'} nor "
                      f"{package.parent / 'configs'}); reinstall sparse_unsloth "
                      "(pip install -e . in a checkout)")


def preset_names() -> list[str]:
    """Names of the shipped presets (``configs/<name>.yaml``)."""
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def check_depth(config: SparseConfig, num_layers: int) -> None:
    """Refuse a config that makes layers sparse which a ``num_layers``-layer model lacks."""
    for kind in MODULE_KINDS:
        bad = [layer for layer in getattr(config, kind) if layer >= num_layers]
        if bad:
            raise ConfigError(
                f"config {config.name!r} makes sparsity.{kind} layer(s) {bad} sparse, but the model "
                f"has {num_layers} decoder layers (0-{num_layers - 1}); use a preset for this model "
                "or edit the layer ranges")


def load_config(source: str | Path | Mapping[str, Any] | SparseConfig,
                num_layers: int | None = None) -> SparseConfig:
    """A SparseConfig from a preset name, a YAML path, a mapping, or a SparseConfig.

    ``num_layers``: the model's depth; resolves ``all`` layer keys and refuses layers beyond it.
    """
    where = ""
    try:
        if isinstance(source, SparseConfig):
            config = source
        elif isinstance(source, Mapping):
            config = config_from_dict(source, num_layers)
        else:
            path = _config_path(str(source))
            where = f"{path}: "
            try:
                data = yaml.safe_load(path.read_text())
            except yaml.YAMLError as err:
                raise ConfigError(f"not valid YAML: {err}") from None
            config = config_from_dict(data, num_layers)
        if num_layers is not None:
            check_depth(config, num_layers)
    except ConfigError as err:
        if not where:
            raise
        raise ConfigError(f"{where}{err}") from None
    return config


def _config_path(text: str) -> Path:
    if text.endswith((".yaml", ".yml")) or Path(text).exists():
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; give a YAML path or one of the "
                              f"presets {preset_names()}")
        return path
    if text in preset_names():
        return presets_dir() / f"{text}.yaml"
    raise ConfigError(f"unknown preset {text!r}; presets are {preset_names()}, or give a YAML path")


def _layer_keys(table: Mapping[int, float]) -> dict[str, float]:
    """``{layer: sparsity}`` as YAML keys: runs of consecutive layers with one value become ``"a-b"``."""
    out: dict[str, float] = {}
    run: list[int] = []
    for layer, value in sorted(table.items()):
        if run and (layer != run[-1] + 1 or value != table[run[0]]):
            out[f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0])] = table[run[0]]
            run = []
        run.append(layer)
    if run:
        out[f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0])] = table[run[0]]
    return out


def config_to_yaml(config: SparseConfig, header: str = "", description: str = "") -> str:
    """``config`` as a YAML file that :func:`load_config` reads back to an equal config.

    ``header`` becomes ``#`` comment lines on top; ``description`` the file's description key.
    """
    data: dict[str, Any] = {"name": config.name}
    if description:
        data["description"] = description
    data.update({k: v for k, v in config.to_dict().items() if k not in ("name", "sparsity")})
    data["sparsity"] = {kind: _layer_keys(getattr(config, kind)) for kind in MODULE_KINDS
                        if getattr(config, kind)}
    lines = [wrapped for line in header.splitlines() for wrapped in textwrap.wrap(line, 96) or [""]]
    comment = "".join(f"# {line}".rstrip() + "\n" for line in lines)
    return comment + yaml.safe_dump(data, sort_keys=False, width=100)
