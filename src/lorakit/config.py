"""LoraConfig: what to adapt and how, with PEFT's field names and defaults.

The config is a plain dataclass validated in ``__post_init__``; it reads and
writes PEFT's ``adapter_config.json`` so adapters move freely between lorakit
and PEFT.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AdapterFormatError, ConfigError
from .files import write_file_atomic

__all__ = ["LoraConfig", "CONFIG_NAME", "WEIGHTS_NAME", "PEFT_FORMAT_VERSION"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# Written into adapter_config.json as "peft_version": the PEFT release whose
# on-disk format we write (and test against).
PEFT_FORMAT_VERSION = "0.21.2"

_BIAS_MODES = ("none", "all", "lora_only")

# PEFT fields we know but do not implement; a config that sets them to a
# non-default value cannot be loaded faithfully, so we refuse it.
_UNSUPPORTED_IF_SET = {
    "use_dora": False,
    "lora_bias": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
}
# PEFT fields we accept and ignore: metadata or features with a harmless default.
_IGNORED_PEFT_KEYS = {
    "peft_type",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "megatron_config",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "qalora_group_size",
    "arrow_config",
    "ensure_weight_tying",
    "kasa_config",
    "lora_ga_config",
    "monteclora_config",
    "use_bdlora",
    "velora_config",
    "modules_to_tie",
}


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter (PEFT's field names and defaults).

    A targeted layer with frozen weight ``W`` computes
    ``y = W x + b + scaling * B(A(dropout(x)))`` with ``scaling = lora_alpha / r``
    (``lora_alpha / sqrt(r)`` with ``use_rslora``).

    Args:
        r: LoRA rank (> 0).
        lora_alpha: scaling numerator (> 0).
        lora_dropout: dropout on the LoRA input, in [0, 1).
        target_modules: module names to adapt: a list (exact name or dotted
            suffix), a regex string (full match on the dotted name), or
            ``"all-linear"`` (every Linear / GPT-2 Conv1D except the output head).
        exclude_modules: names (same rules) never to adapt.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"lora_only"``
            (train the biases of adapted layers).
        fan_in_fan_out: the target stores its weight as (in, out), as GPT-2's
            ``Conv1D`` does; set automatically for Conv1D.
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        init_lora_weights: ``True`` (A kaiming-uniform, B zero), ``"gaussian"``
            (A normal with std 1/r, B zero) or ``False`` (A and B random; the
            model changes at once, for tests).
        layers_to_transform: layer indices (int or list) to adapt; others are skipped.
        layers_pattern: name(s) of the layer list (e.g. ``"layers"``, ``"h"``)
            used to read the index for ``layers_to_transform``.
        rank_pattern: ``{name-regex: r}`` overrides of ``r`` per module.
        alpha_pattern: ``{name-regex: alpha}`` overrides of ``lora_alpha`` per module.
        modules_to_save: modules trained in full and saved with the adapter
            (e.g. a classifier head).
        task_type: PEFT task type string (e.g. ``"CAUSAL_LM"``); metadata only.

    Raises:
        ConfigError: on any invalid value, naming the field, the value and what is allowed.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        _check_int("r", self.r, minimum=1)
        _check_number("lora_alpha", self.lora_alpha, positive=True)
        _check_number("lora_dropout", self.lora_dropout)
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ConfigError(f"lora_dropout={self.lora_dropout!r} is out of range; use a value in [0, 1).")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                value = sorted(value)
                setattr(self, name, value)
            if value is not None and not isinstance(value, str) and not _is_str_list(value):
                raise ConfigError(f"{name}={value!r} must be a list of module names or one regex string.")
        if self.bias not in _BIAS_MODES:
            raise ConfigError(f"bias={self.bias!r} is not a bias mode; use one of {', '.join(map(repr, _BIAS_MODES))}.")
        for name in ("fan_in_fan_out", "use_rslora"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true or false.")
        if not (isinstance(self.init_lora_weights, bool) or self.init_lora_weights == "gaussian"):
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; use true, false or 'gaussian'."
            )
        ltt = self.layers_to_transform
        if not (ltt is None or _is_int(ltt) or (isinstance(ltt, list) and all(_is_int(i) for i in ltt))):
            raise ConfigError(f"layers_to_transform={ltt!r} must be a layer index or a list of layer indices.")
        lp = self.layers_pattern
        if lp is not None and not isinstance(lp, str) and not _is_str_list(lp):
            raise ConfigError(f"layers_pattern={lp!r} must be a name or a list of names (e.g. 'layers').")
        if lp and ltt is None:
            raise ConfigError("layers_pattern is set but layers_to_transform is not; set both or neither.")
        for name, check in (("rank_pattern", _check_int), ("alpha_pattern", _check_number)):
            pattern = getattr(self, name)
            if pattern is None:
                setattr(self, name, {})
                continue
            if not isinstance(pattern, dict):
                raise ConfigError(f"{name}={pattern!r} must be a mapping of module-name patterns to values.")
            for key, value in pattern.items():
                if name == "rank_pattern":
                    check(f"rank_pattern[{key!r}]", value, minimum=1)
                else:
                    check(f"alpha_pattern[{key!r}]", value, positive=True)
        if self.modules_to_save is not None and not _is_str_list(self.modules_to_save):
            raise ConfigError(f"modules_to_save={self.modules_to_save!r} must be a list of module names.")
        if self.task_type is not None and not isinstance(self.task_type, str):
            raise ConfigError(f"task_type={self.task_type!r} must be a string such as 'CAUSAL_LM'.")

    def scaling_for(self, r: int, alpha: float) -> float:
        """The LoRA scaling for one module of rank ``r`` and alpha ``alpha``."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self, base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """PEFT's adapter_config.json content for this config (with the base model's name, if given)."""
        data = dataclasses.asdict(self)
        for key in ("target_modules", "exclude_modules"):
            if isinstance(data[key], (set, tuple)):
                data[key] = sorted(data[key])
        data.update(
            {
                "peft_type": "LORA",
                "peft_version": PEFT_FORMAT_VERSION,
                "base_model_name_or_path": base_model_name_or_path,
                "revision": None,
                "inference_mode": True,
                "use_dora": False,
                "lora_bias": False,
                "layer_replication": None,
                "loftq_config": {},
                "megatron_config": None,
                "megatron_core": "megatron.core",
            }
        )
        return dict(sorted(data.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> LoraConfig:
        """Build a config from an adapter_config.json dict (PEFT's or ours).

        Keys written by a newer PEFT that lorakit does not know are ignored with
        a warning. Features lorakit does not implement (e.g. DoRA) are refused.

        Raises:
            ConfigError: on invalid values or an unsupported feature.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}.")
        peft_type = data.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise ConfigError(
                f"{source}: peft_type={peft_type!r}; lorakit loads LoRA adapters only (peft_type 'LORA')."
            )
        for key, default in _UNSUPPORTED_IF_SET.items():
            if key in data and data[key] not in (default, None, [], {}):
                raise ConfigError(
                    f"{source}: {key}={data[key]!r} is a PEFT feature lorakit does not support; "
                    f"re-train or export the adapter without it."
                )
        known = {f.name for f in dataclasses.fields(cls)}
        skip = known | set(_IGNORED_PEFT_KEYS) | set(_UNSUPPORTED_IF_SET)
        unknown = sorted(k for k in data if k not in skip)
        if unknown:
            warnings.warn(
                f"{source}: ignoring keys lorakit does not know (written by a newer PEFT?): {', '.join(unknown)}",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
        """Write ``adapter_config.json`` into ``directory`` atomically."""
        return write_file_atomic(
            Path(directory) / CONFIG_NAME, json.dumps(self.to_dict(base_model_name_or_path), indent=2) + "\n"
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> LoraConfig:
        """Read ``adapter_config.json`` from an adapter directory.

        Raises:
            AdapterFormatError: the file is missing or not valid JSON.
            ConfigError: a value in it is invalid.
        """
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise AdapterFormatError(
                f"{path} not found: an adapter directory needs {CONFIG_NAME} and {WEIGHTS_NAME} "
                f"(as written by lorakit.save_adapter or PEFT's save_pretrained)."
            )
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterFormatError(f"{path} is not valid JSON ({exc}); re-save the adapter.") from None
        return cls.from_dict(data, source=str(path))


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if not _is_int(value):
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}.")
    if value < minimum:
        raise ConfigError(f"{name}={value!r} is too small; it must be an integer >= {minimum}.")


def _check_number(name: str, value: Any, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be a finite number.")
    if positive and value <= 0:
        raise ConfigError(f"{name}={value!r} must be > 0.")
