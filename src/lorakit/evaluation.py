"""How well a model does on a JSONL data file: eval loss, perplexity, exact match.

What the ``lorakit eval`` verb runs, as a library function::

    model, tokenizer, info = open_adapter("runs/quickstart")   # lorakit.runs
    evaluate(model, tokenizer, "data/eval.jsonl")   # {"eval_loss": ..., "perplexity": ..., "exact_match": ...}

On a file of preference pairs (:mod:`lorakit.pairs`) it reports the adapter's reward
accuracy and margins against its DPO reference instead (:func:`evaluate_preferences`).

Data is read and tokenized as training does (:mod:`lorakit.rows`, :mod:`lorakit.examples`);
answers come from :mod:`lorakit.generation`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .examples import IGNORE_INDEX, collate, load_examples
from .generation import generate_batch, prompt_ids
from .io import load_adapter
from .preference import evaluate_pairs
from .rows import Row, read_rows

__all__ = ["evaluate", "evaluate_preferences"]


def evaluate(
    model: Any,
    tokenizer: Any,
    data_path: str | os.PathLike[str],
    *,
    max_seq_len: int = 512,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    exact_match: bool = True,
) -> dict[str, Any]:
    """Eval loss, perplexity and exact-match rate on a JSONL data file.

    The loss is tokenized as training does (:func:`lorakit.examples.load_examples`:
    loss only on assistant turns / completions) and averaged over all label tokens
    of the file (not per batch). Exact match sends each row's prompt (everything
    before the final assistant turn, rendered with the chat template) and decodes
    the greedy answer; it matches when ``answer.strip() == reference.strip()``
    (only leading / trailing whitespace is ignored; case and inner whitespace
    count). Rows without a reference (``text`` rows) are not counted.

    Args:
        model: A causal LM (with or without adapters).
        tokenizer: Its tokenizer.
        data_path: A JSONL file in any format :mod:`lorakit.rows` reads.
        max_seq_len: Examples are cut to this many tokens for the loss.
        batch_size: Examples per forward pass (loss and generation).
        max_new_tokens: Most tokens per greedy answer; None = the longest reference
            in tokens plus 16.
        exact_match: Also generate answers and score them (the slow part).

    Returns:
        ``{"eval_loss", "perplexity", "label_tokens", "examples", "exact_match",
        "exact_match_rows"}``; ``exact_match`` is None when no row has a reference
        or ``exact_match=False``.

    Raises:
        DataError: the file is missing or malformed.
        ConfigError: a bad ``batch_size`` / ``max_seq_len`` / ``max_new_tokens``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}.")
    examples, _ = load_examples(data_path, tokenizer, max_seq_len=max_seq_len)
    total, count = _loss_sum(model, tokenizer, examples, batch_size)
    loss = total / count
    result: dict[str, Any] = {
        "eval_loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "label_tokens": count,
        "examples": len(examples),
        "exact_match": None,
        "exact_match_rows": 0,
    }
    if exact_match:
        rows = [r for r in read_rows(data_path) if r.reference is not None]
        if rows:
            hits = _exact_matches(model, tokenizer, rows, batch_size, max_new_tokens)
            result.update(exact_match=sum(hits) / len(hits), exact_match_rows=len(hits))
    return result


@torch.inference_mode()
def _loss_sum(model: Any, tokenizer: Any, examples: list[dict], batch_size: int) -> tuple[float, int]:
    """(sum of token losses, number of label tokens), next-token shifted as transformers does."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], tokenizer.pad_token_id)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits  # (B, T, V)
        labels = batch["labels"][:, 1:].to(device)  # (B, T-1): token t+1 is predicted at t
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        count += int((labels != IGNORE_INDEX).sum())
    return total, count


def _exact_matches(
    model: Any, tokenizer: Any, rows: list[Row], batch_size: int, max_new_tokens: int | None
) -> list[bool]:
    templated = getattr(tokenizer, "chat_template", None) is not None
    prompts = [
        prompt_ids(tokenizer, r.prompt_messages, True)
        if templated or r.prompt is None
        else prompt_ids(tokenizer, r.prompt, False)
        for r in rows
    ]
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer(r.reference, add_special_tokens=False)["input_ids"]) for r in rows) + 16
    answers = generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [a.strip() == r.reference.strip() for a, r in zip(answers, rows)]


def evaluate_preferences(
    model: Any,
    tokenizer: Any,
    data_path: str | os.PathLike[str],
    *,
    run_dir: str | os.PathLike[str] | None = None,
    max_seq_len: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Reward accuracy and margins of the model's adapter against its DPO reference on a pairs file.

    The reference and the DPO settings come from the run's ``lorakit.yaml`` when there
    is one: its ``adapter`` (loaded as a second, frozen adapter ``reference``) or else
    the base model (adapters disabled), its ``dpo`` section (β, loss) and its
    ``data.max_seq_len`` / ``data.max_prompt_len``. Without a run config: the base, β = 0.1.

    Args:
        model: The model with the adapter to judge active (from :func:`lorakit.runs.open_adapter`).
        tokenizer: Its tokenizer.
        data_path: A JSONL file of preference rows.
        run_dir: The run directory, or None for a plain adapter.
        max_seq_len: Cut prompt + answer to this many tokens (None: the run's, else 1024).
        batch_size: Pairs per forward.

    Returns:
        :func:`lorakit.preference.evaluate_pairs`' result plus ``"beta"``, ``"loss_type"`` and
        ``"reference"`` (what the rewards are measured against).

    Raises:
        DataError: the file is missing or a row is malformed.
        AdapterFormatError, ModelMismatchError: the run's starting adapter cannot be loaded.
    """
    import yaml

    from .runs import RUN_CONFIG_NAME

    cfg: dict[str, Any] = {}
    if run_dir is not None and (Path(run_dir) / RUN_CONFIG_NAME).is_file():
        cfg = yaml.safe_load((Path(run_dir) / RUN_CONFIG_NAME).read_text(encoding="utf-8")) or {}
    dpo, data = cfg.get("dpo") or {}, cfg.get("data") or {}
    reference_adapter, reference = None, "the base model (adapters disabled)"
    if cfg.get("method") == "dpo" and cfg.get("adapter"):
        load_adapter(model, cfg["adapter"], adapter_name="reference")
        reference_adapter, reference = "reference", f"the starting adapter {cfg['adapter']}"
    beta, loss_type = dpo.get("beta", 0.1), dpo.get("loss_type", "sigmoid")
    result = evaluate_pairs(
        model,
        tokenizer,
        data_path,
        reference_adapter=reference_adapter,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=dpo.get("label_smoothing", 0.0),
        max_seq_len=max_seq_len or data.get("max_seq_len") or 1024,
        max_prompt_len=data.get("max_prompt_len"),
        batch_size=batch_size,
    )
    return {**result, "beta": beta, "loss_type": loss_type, "reference": reference}
