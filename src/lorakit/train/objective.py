"""What a training step minimises: the loop asks an objective for each micro-batch's loss.

A run config's ``method`` picks the objective; everything else of the loop
(accumulation, DDP all-reduce, precision, checkpoints and resume, progress,
metrics) is the same for all of them. An objective has:

* ``collate(rows, pad_to_multiple_of)``: rows -> one CPU batch;
* ``loss(model, batch) -> (loss_sum, count, metric_sums)``: the loop backpropagates
  ``loss_sum``, all-reduces sums and counts, and divides by the global count (label
  tokens for SFT, pairs for DPO), so the gradient is exact under gradient
  accumulation and any world size; ``metric_names`` names the extra sums, logged
  as means over ``count``;
* ``prepare(...)``: work before the first step (DPO: precomputed reference log-probs).

The functions below are the loop's small dispatch on ``method``: which adapters the
model gets (:func:`add_adapters`), which data it reads (:func:`load_data`), which
objective it asks (:func:`make_objective`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lorakit.adapters import inject
from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, DataError
from lorakit.examples import collate
from lorakit.pairs import first_pair_line
from lorakit.preference import check_dpo_args
from lorakit.train.config import RunConfig
from lorakit.train.data import RunData, load_run_data
from lorakit.train.dpo import DpoObjective, load_pair_data, setup_dpo_model
from lorakit.train.lm_loss import causal_lm_loss

__all__ = ["CausalLmObjective", "check_method", "add_adapters", "load_data", "make_objective"]


class CausalLmObjective:
    """Supervised fine-tuning: next-token cross-entropy summed over label tokens (``method: sft``).

    Args:
        pad_token_id: Token id put in padding positions.
        loss_fn: ``(model, batch) -> (loss_sum, n_tokens)``; default
            :func:`lorakit.train.lm_loss.causal_lm_loss`.
    """

    metric_names: tuple[str, ...] = ()
    unit = "tokens"
    card = None  # nothing beyond the usual model card

    def __init__(self, pad_token_id: int, loss_fn: Callable[..., tuple[torch.Tensor, int]] = causal_lm_loss) -> None:
        self.pad_token_id, self.loss_fn = pad_token_id, loss_fn

    def collate(self, rows: list[dict[str, Any]], pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
        """Right-padded batch of examples or packed rows (:func:`lorakit.examples.collate`)."""
        return collate(rows, self.pad_token_id, pad_to_multiple_of)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, list[float]]:
        """``(loss_sum, label_tokens, [])``."""
        loss_sum, n_tokens = self.loss_fn(model, batch)
        return loss_sum, n_tokens, []

    def prepare(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to do before the first step."""


def check_method(cfg: RunConfig) -> None:
    """The ``method``-specific checks a config passes before any model loads.

    Raises:
        ConfigError: ``adapter`` with ``method: sft``; packing or a bad ``dpo`` section with ``method: dpo``.
    """
    if cfg.method == "sft":
        if cfg.adapter is not None:
            raise ConfigError(
                f"adapter: {cfg.adapter} starts a preference run (method: dpo) from an adapter; "
                "set method: dpo, or remove adapter for supervised fine-tuning"
            )
        return
    check_dpo_args(cfg.dpo.beta, cfg.dpo.loss_type, cfg.dpo.label_smoothing)
    if cfg.data.packing:
        raise ConfigError(
            "data.packing is not supported with method: dpo (pairs are batched whole); set data.packing: false"
        )


def add_adapters(cfg: RunConfig, model: torch.nn.Module, lora_config: LoraConfig) -> str | None:
    """Puts the trainable adapter (and for DPO its reference) on ``model``.

    Args:
        cfg: The run config.
        model: The base model.
        lora_config: The ``lora`` section, validated.

    Returns:
        The name of the DPO reference adapter, or None (SFT, or DPO whose reference is the base).

    Raises:
        AdapterFormatError, ModelMismatchError: ``adapter`` is not an adapter for this base.
    """
    if cfg.method == "dpo":
        return setup_dpo_model(model, lora_config, cfg.adapter)
    inject(model, lora_config)
    return None


def load_data(cfg: RunConfig, tokenizer: Any, seed: int, batch_size: int, say: Callable[..., Any]) -> RunData:
    """The run's train and eval rows: examples for SFT, pairs for DPO.

    Raises:
        DataError: malformed rows; preference pairs with ``method: sft`` (``file:line``).
    """
    if cfg.method == "dpo":
        return load_pair_data(cfg.data, tokenizer, seed, batch_size, say)
    for path in (cfg.data.train, cfg.data.eval):
        line = first_pair_line(path) if path is not None else 0
        if line:
            raise DataError(
                f"{path}:{line}: a preference pair (prompt, chosen, rejected), but the run's method is sft; "
                "set method: dpo to train on pairs, or give SFT rows (messages, prompt/completion, ...)"
            )
    return load_run_data(cfg.data, tokenizer, seed, batch_size, say)


def make_objective(
    cfg: RunConfig, pad_token_id: int, reference_adapter: str | None, sft_loss: Callable[..., Any] = causal_lm_loss
) -> CausalLmObjective | DpoObjective:
    """The objective of the run's ``method``.

    Args:
        cfg: The run config.
        pad_token_id: The tokenizer's pad id.
        reference_adapter: From :func:`add_adapters`.
        sft_loss: The SFT loss function.

    Returns:
        A :class:`CausalLmObjective` or a :class:`lorakit.train.dpo.DpoObjective`.
    """
    if cfg.method == "dpo":
        d = cfg.dpo
        return DpoObjective(
            pad_token_id, d.beta, d.loss_type, d.label_smoothing, reference_adapter, d.precompute_reference, cfg.adapter
        )
    return CausalLmObjective(pad_token_id, sft_loss)
