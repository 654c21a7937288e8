"""The YAML run config of ``lorakit train``, validated with pydantic.

A run config has five sections; the key names are public::

    model: smollm2-135m-instruct      # a model dir or .gguf also works; omitted = default
    # or, for QLoRA (a 4-bit base):  model: {name: ..., quantization: nf4, double_quant: true, compute_dtype: auto}
    lora:  {r: 16, lora_alpha: 32, target_modules: [q_proj, v_proj]}   # LoraConfig fields
    data:  {train: data/train.jsonl, eval: data/eval.jsonl, format: auto, max_seq_len: 512}
    train: {steps: 100, batch_size: 8, lr: 2.0e-4, schedule: constant, precision: auto}
    output: {dir: runs/quickstart}

and, for preference tuning (:mod:`lorakit.train.dpo`), three more top-level keys and one data key::

    method: dpo                       # sft (the default: the sections above) | dpo
    adapter: runs/sft                 # optional: start from this adapter; it is also the frozen reference
    dpo:   {beta: 0.1, loss_type: sigmoid, label_smoothing: 0.0, precompute_reference: false}
    data:  {train: data/pairs.jsonl, max_seq_len: 1024, max_prompt_len: 512}

Relative paths are resolved when the file is loaded, so the config means the same
thing wherever it is run from:

* ``data.train``, ``data.eval``, ``model`` and ``adapter``: relative to the YAML file's folder
  if the path exists there, else relative to the current working directory.
  (``model`` stays a plain name, such as the default model's, if neither exists.)
* ``output.dir``: relative to the current working directory; if omitted, it is
  ``runs/<name of the YAML file without suffix>``.

Every problem ends in a :class:`~lorakit.errors.ConfigError` that names the key as
``section.key``, the value, and what is allowed.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorakit.errors import ConfigError
from lorakit.files import write_file_atomic
from lorakit.models import ModelSpec

__all__ = [
    "LORA_FIELDS",
    "DataConfig",
    "TrainConfig",
    "OutputConfig",
    "DpoConfig",
    "RunConfig",
    "load_run_config",
    "dump_run_config",
]

LORA_FIELDS = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "bias",
    "fan_in_fan_out",
    "use_rslora",
    "init_lora_weights",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "task_type",
)
_DEFAULT_STEPS = 100


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    """The ``data`` section: where the examples are and how to read them."""

    train: Path
    eval: Path | None = None
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    format: Literal["auto", "chat", "prompt_completion", "alpaca", "text"] = "auto"
    max_seq_len: int = Field(512, gt=0)
    train_on_prompt: bool = False
    packing: bool = False
    on_error: Literal["raise", "skip"] = "raise"
    max_prompt_len: int | None = Field(None, gt=0)  # method dpo: most prompt tokens (None: only max_seq_len limits)

    @model_validator(mode="after")
    def _one_eval_source(self) -> DataConfig:
        if self.eval is not None and self.eval_fraction > 0:
            raise ValueError("give data.eval or data.eval_fraction, not both")
        return self


class TrainConfig(_Section):
    """The ``train`` section. Exactly one of ``steps`` / ``epochs`` is set."""

    steps: int | None = Field(None, gt=0)
    epochs: int | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2.0e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)  # None: no clipping
    seed: int = 0
    eval_every: int = Field(50, ge=0)  # 0: never
    save_every: int = Field(50, ge=0)  # 0: only at the end
    # int8: the frozen base's matmuls in int8 on the CPU (lorakit.int8); auto never picks it (other numerics)
    precision: Literal["auto", "fp32", "bf16", "int8"] = "auto"
    # true (every decoder layer) / false, or N: every N-th layer (less recompute, less memory saved);
    # unset: on for a 4-bit (QLoRA) base, as PEFT's prepare_model_for_kbit_training does, else off
    gradient_checkpointing: bool | int | None = None
    # CPU: hand freed heap back to the OS after each step and 3 times per forward pass (lorakit.memory): a lower
    # peak RSS for more step time (re-faulted pages; benchmarks/RESULTS.md, int8_schemes and qlora); unset: on for a
    # 4-bit (QLoRA) base, where memory is the point, else off
    return_freed_memory: bool | None = None
    cuda_graphs: Literal["auto", "on", "off"] = "auto"  # auto: on for CUDA runs that allow it
    # a padded batch's real tokens as one row, attention per example (lorakit.padding_free): no work on padding;
    # auto: on for CPU runs whose model allows it (SDPA attention, causal, no sliding window); method sft only
    padding_free: Literal["auto", "on", "off"] = "auto"
    log_every: int = Field(1, gt=0)

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _every_n(cls, value: Any) -> bool | int | None:
        if value is None or isinstance(value, bool) or (isinstance(value, int) and value >= 0):
            return value
        raise ValueError(
            f"train.gradient_checkpointing must be true, false or a layer interval N >= 1 "
            f"(checkpoint every N-th decoder layer), got {value!r}"
        )

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainConfig:
        if self.steps is not None and self.epochs is not None:
            raise ValueError(
                f"train.steps ({self.steps}) and train.epochs ({self.epochs}) are both set; keep one of them"
            )
        if self.steps is None and self.epochs is None:
            self.steps = _DEFAULT_STEPS
        return self


class DpoConfig(_Section):
    """The ``dpo`` section (``method: dpo``): the objective; see :mod:`lorakit.preference`."""

    beta: float = Field(0.1, gt=0.0)
    loss_type: Literal["sigmoid", "robust", "hinge", "ipo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)  # cDPO (sigmoid) / robust DPO
    precompute_reference: bool = False  # reference log-probs once, cached in the run dir


class OutputConfig(_Section):
    """The ``output`` section: the run directory."""

    dir: Path = Path("runs/run")


class RunConfig(_Section):
    """A whole run config: ``model``, ``lora``, ``data``, ``train``, ``output``."""

    model: str | dict[str, Any] | None = None
    method: Literal["sft", "dpo"] = "sft"
    adapter: str | None = None  # method dpo: the starting adapter (and frozen reference)
    lora: dict[str, Any] = Field(default_factory=dict)
    data: DataConfig
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("model")
    @classmethod
    def _model_spec(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(value, dict):  # {name, quantization, double_quant, compute_dtype}: checked, defaults filled
            return ModelSpec.parse(value).to_dict()
        return value

    @field_validator("lora")
    @classmethod
    def _lora_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key not in LORA_FIELDS:
                raise ValueError(f"unknown key 'lora.{key}'")
        return value

    def to_yaml_dict(self) -> dict[str, Any]:
        """Return the config as plain YAML-ready data (paths as strings, defaults filled).

        Returns:
            A dict that :func:`load_run_config` reads back into an equal config.
        """
        return self.model_dump(mode="json")


_SECTIONS: dict[str, tuple[str, ...]] = {
    "lora": LORA_FIELDS,
    "data": tuple(DataConfig.model_fields),
    "train": tuple(TrainConfig.model_fields),
    "output": tuple(OutputConfig.model_fields),
    "dpo": tuple(DpoConfig.model_fields),
}
_SCALARS = ("model", "method", "adapter")  # top-level keys that are values, not sections
_TOP_KEYS = (*_SCALARS, *_SECTIONS)


def load_run_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> RunConfig:
    """Read, override, validate and resolve a YAML run config.

    Args:
        path: The YAML file.
        overrides: ``section.key=value`` strings (or ``model=value``) applied on top
            of the file; each value is parsed as YAML, so ``train.lr=1e-4``,
            ``lora.target_modules=[q_proj,v_proj]`` and ``model=null`` work.

    Returns:
        The validated config with paths resolved as the module docstring says.

    Raises:
        ConfigError: if the file is missing or not valid YAML (with the line), an
            override is malformed, a key is unknown (with the closest valid key),
            a value has the wrong type or range, or a data file does not exist.
    """
    path = Path(path)
    raw = _read_yaml(path)
    overridden = _apply_overrides(raw, overrides)
    _check_keys(raw, path.name)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_explain(e, path.name, overridden)) from None
    return _resolve_paths(cfg, path.resolve().parent, raw, path.stem)


def dump_run_config(cfg: RunConfig, path: str | os.PathLike[str]) -> None:
    """Write a run config as YAML, atomically (:func:`lorakit.files.write_file_atomic`).

    Args:
        cfg: The config to write.
        path: The file to write (its folder must exist).
    """
    write_file_atomic(path, yaml.safe_dump(cfg.to_yaml_dict(), sort_keys=False, allow_unicode=True))


# --------------------------------------------------------------------------- helpers


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; check the path.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"invalid YAML in {path}{where}: {problem}; fix the syntax there.") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file {path} must be a mapping of sections (model, lora, data, train, "
            f"output), got a {type(raw).__name__}."
        )
    return raw


def _apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, str]:
    """Apply ``section.key=value`` strings to ``raw`` in place; return {dotted key: override}."""
    applied: dict[str, str] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts) or len(parts) > 2 or (parts[0] in _SCALARS) != (len(parts) == 1):
            raise ConfigError(
                f"bad override {item!r}; expected SECTION.KEY=VALUE (e.g. train.lr=1e-4, "
                "lora.target_modules=[q_proj,v_proj]) or model=VALUE / method=VALUE / adapter=VALUE."
            )
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"bad override {item!r}: the value is not valid YAML ({problem}).") from None
        if len(parts) == 1:
            raw[parts[0]] = value
        else:
            section, name = parts
            if section not in _SECTIONS:
                _unknown(section, _SECTIONS, "overrides")
            if name not in _SECTIONS[section]:
                _unknown(key.strip(), _SECTIONS[section], "overrides")
            if raw.get(section) is None:
                raw[section] = {}
            if not isinstance(raw[section], dict):
                raise ConfigError(f"cannot apply override {item!r}: '{section}' is not a mapping.")
            raw[section][name] = value
        applied[".".join(parts)] = item
    return applied


def _unknown(key: str, valid: Sequence[str], where: str) -> None:
    prefix, _, name = key.rpartition(".")
    full = [f"{prefix}.{v}" if prefix else v for v in valid]
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    hint = f"did you mean '{full[list(valid).index(close[0])]}'?" if close else f"valid keys: {', '.join(full)}."
    raise ConfigError(f"unknown key '{key}' in {where}; {hint}")


def _check_keys(raw: dict[str, Any], where: str) -> None:
    for top, value in raw.items():
        if top not in _TOP_KEYS:
            _unknown(str(top), _TOP_KEYS, where)
        if top in _SCALARS:
            continue
        if value is None:
            raw[top] = value = {}
        if not isinstance(value, dict):
            raise ConfigError(
                f"'{top}' in {where} must be a mapping of keys, got {value!r}; "
                f"write it as `{top}: {{key: value}}` or as indented lines."
            )
        for key in value:
            if key not in _SECTIONS[top]:
                _unknown(f"{top}.{key}", _SECTIONS[top], where)


def _explain(err: ValidationError, where: str, overridden: dict[str, str]) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            what = "section 'data' (with at least data.train)" if loc == "data" else f"key '{loc}'"
            lines.append(f"missing {what} in {where}; add it.")
            continue
        source = f" (from override {overridden[loc]!r})" if loc in overridden else ""
        if e["type"] == "value_error" and loc in ("data", "train", "lora", "model"):
            lines.append(f"{msg} (in {where}{source}).")
        else:
            lines.append(f"invalid value {e['input']!r} for '{loc}' in {where}{source}: {msg}.")
    if len(lines) == 1:
        return lines[0]
    return f"{len(lines)} problems in {where}:\n" + "\n".join(f"  - {line}" for line in lines)


def _resolve_paths(cfg: RunConfig, base: Path, raw: dict[str, Any], stem: str) -> RunConfig:
    def near_yaml(p: Path) -> Path:
        p = p.expanduser()
        if p.is_absolute():
            return p
        return base / p if (base / p).exists() else Path.cwd() / p

    data = cfg.data
    for key in ("train", "eval"):
        value = getattr(data, key)
        if value is None:
            continue
        resolved = near_yaml(value)
        if not resolved.exists():
            where = "" if value.expanduser().is_absolute() else f" (looked in {base} and {Path.cwd()})"
            raise ConfigError(
                f"data.{key} file {str(value)!r} not found{where}; "
                "fix the path in the config or pass it as an override."
            )
        setattr(data, key, resolved)
    name = cfg.model.get("name") if isinstance(cfg.model, dict) else cfg.model
    if name is not None:
        candidate = near_yaml(Path(name))
        if candidate.exists():
            if isinstance(cfg.model, dict):
                cfg.model = {**cfg.model, "name": str(candidate)}
            else:
                cfg.model = str(candidate)
    if cfg.adapter is not None:
        cfg.adapter = str(near_yaml(Path(cfg.adapter)))
    out = cfg.output.dir if "dir" in (raw.get("output") or {}) else Path("runs") / stem
    cfg.output.dir = out.expanduser() if out.expanduser().is_absolute() else Path.cwd() / out
    return cfg
