"""What a training step minimises: the loop asks an objective for each micro-batch's loss.

An objective has ``collate(rows, pad_to_multiple_of)`` (rows -> a CPU batch) and
``loss(model, batch) -> (loss_sum, count, metric_sums)``: the loop backpropagates
``loss_sum``, all-reduces sums and counts, and divides by the global count
(label tokens for SFT, pairs for DPO), so the gradient is exact under gradient
accumulation and any world size. ``metric_names`` names the extra sums, logged as
means over ``count``. :func:`make_objective` picks one for a run config's ``method``.
"""

from __future__ import annotations

from typing import Any

import torch

from lorakit.examples import collate
from lorakit.train.lm_loss import causal_lm_loss

__all__ = ["CausalLmObjective", "make_objective"]


class CausalLmObjective:
    """Supervised fine-tuning: next-token cross-entropy summed over label tokens (``method: sft``).

    Args:
        pad_token_id: Token id put in padding positions.
    """

    metric_names: tuple[str, ...] = ()
    unit = "tokens"

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def collate(self, rows: list[dict[str, Any]], pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
        """Right-padded batch of examples or packed rows (:func:`lorakit.examples.collate`)."""
        return collate(rows, self.pad_token_id, pad_to_multiple_of)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, list[float]]:
        """``(loss_sum, label_tokens, [])`` (:func:`lorakit.train.lm_loss.causal_lm_loss`)."""
        loss_sum, n_tokens = causal_lm_loss(model, batch)
        return loss_sum, n_tokens, []


def make_objective(method: str, pad_token_id: int, dpo: Any = None, reference_adapter: str | None = None) -> Any:
    """The objective of a run's ``method``.

    Args:
        method: ``"sft"`` or ``"dpo"``.
        pad_token_id: The tokenizer's pad id.
        dpo: The run config's ``dpo`` section (``method: dpo``).
        reference_adapter: The DPO reference adapter's name, or None (adapters disabled).

    Returns:
        A :class:`CausalLmObjective` or a :class:`lorakit.train.dpo.DpoObjective`.
    """
    if method == "dpo":
        from lorakit.train.dpo import DpoObjective

        return DpoObjective(pad_token_id, dpo.beta, dpo.loss_type, dpo.label_smoothing, reference_adapter)
    return CausalLmObjective(pad_token_id)
