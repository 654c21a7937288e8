"""Merge an adapter into its base model and save a plain transformers model directory, shard by shard.

The ``lorakit merge`` verb, as a library function::

    merge_to_dir("runs/quickstart", "out/merged")   # loads without lorakit
    report = merge_adapter("runs/qlora", "out/merged", dtype="bf16")   # and what it did

The merge streams: it reads the base model's safetensors shards one at a time
(one tensor at a time from each), folds ``ΔW = scaling · B A`` into the weights
that shard holds, and writes the shard; the whole model is never in memory, so
peak memory is about one shard (plus the adapter) whatever the model's size. The
result is what loading the base, ``load_adapter`` and ``merge_and_unload`` give
(the same float32 sums, cast to ``dtype`` once).

For an adapter trained on a 4-bit base (a run whose ``model`` says
``quantization: nf4`` or ``fp4``), the merged weights are ``dequant(W4) + ΔW``:
the base weights the adapter was trained against, recomputed from the
full-precision base exactly as the training run quantized them (every 4-bit
layer, adapted or not). With ``base=`` the adapter is merged into the original
full-precision weights instead, and the report gives, per adapted layer,
``‖W − dequant(W4)‖ / ‖ΔW‖``: how large the quantization error the adapter
learned around is next to the update itself. Writing a re-quantized 4-bit merged
model is refused: rounding ``dequant(W4) + ΔW`` back to 4 bits loses most of a
small ΔW (PEFT does it silently).

It takes what :func:`lorakit.runs.open_adapter` takes (a run directory written by
``lorakit train``, or a plain lorakit / PEFT adapter directory) and builds on it,
so this module sits after :mod:`lorakit.runs` in the data flow.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import LoraConfig
from .errors import ConfigError, ModelLoadError, ModelMismatchError
from .files import write_dir_atomic
from .inject import pattern_value
from .io import LORA_KEY, read_adapter
from .models import ModelSpec, resolve_model
from .runs import choose_base_model, find_adapter_dir, open_adapter

__all__ = ["MERGE_DTYPES", "MergeReport", "merge_adapter", "merge_to_dir"]

MERGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_PROBE_SEQS, _PROBE_LEN = 4, 16


@dataclass
class MergeReport:
    """What :func:`merge_adapter` wrote and measured.

    Attributes:
        out_dir: The merged model directory.
        dtype: Its weight dtype (``"fp32"`` / ``"bf16"``).
        base_dir: The full-precision base the weights came from.
        quantization: The training base's 4-bit settings (``ModelSpec``), or None for a full-precision base.
        merged_modules: How many modules got a ``ΔW``.
        shards: How many safetensors shards were streamed.
        largest_shard_bytes: Size of the largest base shard (the scale of the merge's peak memory).
        max_probe_diff: Largest ``|merged − unmerged|`` logit on the probe inputs (None without a probe).
        layer_ratios: With ``base=`` on a 4-bit run: ``(module, ‖W − dequant(W4)‖ / ‖ΔW‖)`` per adapted layer.
    """

    out_dir: Path
    dtype: str
    base_dir: Path
    quantization: ModelSpec | None
    merged_modules: int = 0
    shards: int = 0
    largest_shard_bytes: int = 0
    max_probe_diff: float | None = None
    layer_ratios: list[tuple[str, float]] = field(default_factory=list)


# ----------------------------------------------------------------------------- ΔW from the adapter files


def _deltas(config: LoraConfig, tensors: dict[str, torch.Tensor], kinds: dict[str, str]) -> tuple[dict, dict]:
    """``({module: ΔW in the base tensor's layout (fp32)}, {base tensor name: replacement})``."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    replace: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        m = LORA_KEY.match(key)
        if m:
            pairs.setdefault(m.group("module"), {})[m.group("kind")] = value
        else:  # trained biases and modules_to_save copies replace the base's tensors
            owner, _, leaf = key.rpartition(".")
            replace[f"{owner.removesuffix('.base_layer')}.{leaf}"] = value
    deltas = {}
    for module, p in pairs.items():
        if module not in kinds:
            raise ModelMismatchError(
                f"the adapter has weights for module {module!r}, which the base model does not "
                "have; was it trained on another base model? Pass the right one with --model."
            )
        r = pattern_value(config.rank_pattern, module, config.r)
        alpha = pattern_value(config.alpha_pattern, module, config.lora_alpha)
        s = config.scaling_for(r, alpha)
        if "lora_embedding_A" in p:  # A [r, num], B [dim, r] -> [num, dim]
            deltas[module] = (p["lora_embedding_B"].float() @ p["lora_embedding_A"].float()).T * s
            continue
        A, B = p["lora_A"].float(), p["lora_B"].float()
        if A.dim() > 2:  # convolution: B is 1x1
            deltas[module] = torch.einsum("or,r...->o...", B.flatten(1), A) * s
        else:
            delta = (B @ A) * s  # [out, in]
            deltas[module] = delta.T if kinds[module] == "conv1d" else delta
    return deltas, replace


def _skeleton(base_dir: Path) -> Any:
    """The base model's module tree on the meta device (no weights): module kinds and what is 4-bit."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(base_dir, local_files_only=True)
    if getattr(hf_config, "quantization_config", None):
        raise ConfigError(
            f"the base model in {base_dir} is stored quantized; merging needs full-precision base weights: pass the "
            "model the quantized one was made from (--base PATH / base=)."
        )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config), hf_config


def _module_kinds(skeleton: Any) -> dict[str, str]:
    from transformers.pytorch_utils import Conv1D

    return {n: ("conv1d" if isinstance(m, Conv1D) else type(m).__name__.lower()) for n, m in skeleton.named_modules()}


def _shards(base_dir: Path) -> list[str]:
    if (base_dir / _INDEX).is_file():
        index = json.loads((base_dir / _INDEX).read_text())
        return sorted(set(index["weight_map"].values()))
    if (base_dir / _SINGLE).is_file():
        return [_SINGLE]
    raise ModelLoadError(
        f"{base_dir} holds no safetensors weights ({_SINGLE} or {_INDEX}); lorakit merges "
        "safetensors checkpoints only (re-save the base with save_pretrained)."
    )


# ----------------------------------------------------------------------------- the merge


def merge_adapter(
    run_or_adapter: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str = "fp32",
    model: str | os.PathLike[str] | None = None,
    base: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    probe: bool = True,
) -> MergeReport:
    """Fold an adapter into its base model, streaming over the base's shards, and save the result.

    Args:
        run_or_adapter: A run directory or an adapter directory.
        out_dir: Where the merged model goes (written beside it, renamed into place).
        dtype: ``"fp32"`` or ``"bf16"`` weights. (``"nf4"`` / ``"fp4"`` are refused: see the module docstring.)
        model: Base model override, as in :func:`lorakit.runs.open_adapter` (keeps the run's quantization).
        base: Full-precision weights to merge into instead of ``dequant(W4)`` (runs on a 4-bit base).
        overwrite: Replace ``out_dir`` if it exists and is not empty.
        probe: Also load both models and compare their logits on a few probe inputs.

    Returns:
        A :class:`MergeReport`.

    Raises:
        ConfigError: bad ``dtype`` (a 4-bit one with its explanation); ``out_dir`` exists and is not empty
            (without ``overwrite``); a base stored quantized.
        AdapterFormatError, ModelLoadError, ModelMismatchError: as :func:`lorakit.runs.open_adapter`.
    """
    if dtype in ("nf4", "fp4", "int4", "4bit"):
        raise ConfigError(
            f"--dtype {dtype} (dtype={dtype!r}): lorakit does not write a re-quantized 4-bit merged model. Rounding "
            "dequant(W4) + ΔW back to 4 bits moves each weight by up to half a quantization step, which is "
            "usually larger than the update the adapter learned, so most of the fine-tune is lost. Merge to "
            "bf16 (--dtype bf16) and quantize that when you load it, or keep the adapter separate on the 4-bit base."
        )
    if dtype not in MERGE_DTYPES:
        raise ConfigError(
            f"--dtype {dtype} (dtype={dtype!r}) is not supported for merge; use one of {', '.join(MERGE_DTYPES)}."
        )
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; the merged model needs a directory. Choose another path.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"{out} already exists and is not empty; choose a new output directory or overwrite it "
            "(--force / overwrite=True)."
        )
    adapter_dir, _ = find_adapter_dir(run_or_adapter)
    config, tensors = read_adapter(adapter_dir)
    spec, _ = choose_base_model(run_or_adapter, model)
    base_dir = resolve_model(base if base is not None else spec.name)
    skeleton, hf_config = _skeleton(base_dir)
    kinds = _module_kinds(skeleton)
    deltas, replace = _deltas(config, tensors, kinds)
    four_bit = set()
    if spec.quantized:
        from .quant_model import modules_to_quantize

        four_bit = set(modules_to_quantize(skeleton))
    del skeleton
    report = MergeReport(out, dtype, base_dir, spec if spec.quantized else None, merged_modules=len(deltas))
    target = MERGE_DTYPES[dtype]
    shard_names = _shards(base_dir)
    report.shards = len(shard_names)
    report.largest_shard_bytes = max((base_dir / s).stat().st_size for s in shard_names)

    def fold(name: str, t: torch.Tensor) -> torch.Tensor:
        module, _, leaf = name.rpartition(".")
        if name in replace:
            t = replace[name]
        delta = deltas.get(module) if leaf == "weight" else None
        quantized = module in four_bit and leaf == "weight"
        if quantized or delta is not None:
            w = t.float()
            if quantized:
                w4 = _dequant_roundtrip(w, spec)
                if base is not None and delta is not None:
                    report.layer_ratios.append((module, float((w - w4).norm() / delta.norm().clamp_min(1e-30))))
                if base is None:
                    w = w4
            t = w + delta if delta is not None else w
        return t.to(target) if t.is_floating_point() else t

    def write(tmp: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        total = 0
        for shard in shard_names:  # one shard in memory at a time
            merged: dict[str, torch.Tensor] = {}
            with safe_open(str(base_dir / shard), framework="pt") as f:
                for name in f.keys():
                    merged[name] = fold(name, f.get_tensor(name))
            total += sum(t.numel() * t.element_size() for t in merged.values())
            save_file(merged, str(tmp / shard), metadata={"format": "pt"})
            del merged
        for item in base_dir.iterdir():  # config, tokenizer, generation config: copied as they are
            if item.is_file() and not item.name.endswith(".safetensors") and item.name not in (_INDEX, "config.json"):
                shutil.copy2(item, tmp / item.name)
        if (base_dir / _INDEX).is_file():
            index = json.loads((base_dir / _INDEX).read_text())
            index["metadata"] = {**index.get("metadata", {}), "total_size": total}
            (tmp / _INDEX).write_text(json.dumps(index, indent=2) + "\n")
        cfg = json.loads((base_dir / "config.json").read_text())
        cfg.pop("quantization_config", None)
        cfg["dtype"] = "float32" if target == torch.float32 else "bfloat16"
        cfg.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    write_dir_atomic(out, write)
    if probe:
        report.max_probe_diff = _probe(run_or_adapter, model, out, hf_config)
    return report


def _dequant_roundtrip(w: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """``dequant(quant(W))`` in fp32, as the training run's 4-bit layer held it."""
    from .quant import dequantize_packed, quantize_weight_4bit

    packed, state = quantize_weight_4bit(w, spec.quantization, spec.double_quant)
    return dequantize_packed(packed, state, torch.float32)


def _probe(run_or_adapter: Any, model: Any, out: Path, hf_config: Any) -> float:
    """Largest |logit| difference between the merged model and the base + adapter, on a few fixed inputs."""
    from transformers import AutoModelForCausalLM

    unmerged, _, _ = open_adapter(run_or_adapter, model=model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, hf_config.vocab_size, (_PROBE_SEQS, _PROBE_LEN), generator=gen)
    with torch.no_grad():
        want = unmerged(input_ids=ids).logits.float()
        del unmerged
        merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
        got = merged(input_ids=ids).logits.float()
    return float((got - want).abs().max())


def merge_to_dir(
    run_or_adapter: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str = "fp32",
    model: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Fold an adapter into its base model and save a plain transformers model directory.

    :func:`merge_adapter` without the probe: the directory (safetensors weights in the
    base's shards, config, generation config, tokenizer) loads with
    ``AutoModelForCausalLM.from_pretrained`` without lorakit, and appears complete or
    not at all.

    Args:
        run_or_adapter: A run directory or an adapter directory.
        out_dir: Where the merged model goes.
        dtype: ``"fp32"`` or ``"bf16"`` weights.
        model: Base model override, as in :func:`lorakit.runs.open_adapter`.
        overwrite: Replace ``out_dir`` if it exists and is not empty.

    Returns:
        ``out_dir``.

    Raises:
        ConfigError: bad ``dtype``, or ``out_dir`` exists and is not empty (without ``overwrite``).
        AdapterFormatError, ModelLoadError, ModelMismatchError: as :func:`lorakit.runs.open_adapter`.
    """
    return merge_adapter(run_or_adapter, out_dir, dtype=dtype, model=model, overwrite=overwrite, probe=False).out_dir
