"""Direct Preference Optimization (Rafailov et al. 2023): the loss, the rewards, the reference.

A pair is a prompt ``x`` with a preferred answer ``y_w`` and a rejected one ``y_l``.
With ``log π(y|x)`` the summed log-probability of an answer's tokens under the
policy and ``log π_ref`` under the frozen reference, each answer's implicit reward
is ``β (log π(y|x) − log π_ref(y|x))`` and the losses are TRL's (1.16) formulas on
``Δ = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))``::

    sigmoid   −(1 − ε) log σ(βΔ) − ε log σ(−βΔ)           DPO; ε > 0 is conservative DPO (cDPO)
    robust    (−(1 − ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε)    robust DPO, ε = label flip rate
    hinge     max(0, 1 − βΔ)                               SLiC
    ipo       (Δ_w / n_w − Δ_l / n_l − 1 / (2β))²          IPO, log-ratios per answer token (TRL's norm)

(TRL 1.16 dropped ε from ``sigmoid``; its old cDPO formula is kept here under the
same key, equal to TRL's at ε = 0.)

The reference is never a second model. :func:`reference_mode` makes the same model
compute it: with adapters disabled (a fresh LoRA: the reference is the base), or
with only a frozen copy of the starting adapter active (held as a second adapter on
the same base, a few MB). :func:`pair_logps` scores a batch of pairs as
:func:`lorakit.pairs.collate_pairs` lays it out (``2B`` padded rows, TRL's layout) or
as :func:`lorakit.pairs.pack_pairs` does (each prompt once, pairs packed without
padding between them, a mask that keeps the rejected answer from seeing the chosen
one; what :func:`collate_for` picks wherever :func:`shares_prompts` says the model
takes that mask), through :func:`lorakit.logprobs.scored_logps` (the head only at
answer tokens). The packed layout computes the same log-probs with fewer tokens: on
the shipped pairs (a ~37-token prompt, ~35-token answers, 4 pairs a batch) 431 instead
of 663 padded tokens per step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters import active_adapters, disable_adapters, set_adapter
from .errors import ConfigError
from .logprobs import attends_causally, completion_logps, scored_logps
from .padding_free import ATTENTION as PADDING_FREE
from .pairs import collate_pairs, load_pairs, pack_pairs

__all__ = [
    "LOSS_TYPES",
    "DpoTerms",
    "check_dpo_args",
    "dpo_loss",
    "pair_logps",
    "shares_prompts",
    "pair_attention_mask",
    "collate_for",
    "reference_mode",
    "pair_metrics",
    "METRIC_NAMES",
    "evaluate_pairs",
]

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")
METRIC_NAMES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


class DpoTerms(NamedTuple):
    """Per-pair results of :func:`dpo_loss`.

    Attributes:
        losses: ``[B]`` loss of each pair (differentiable).
        chosen_rewards: ``[B]`` ``β (log π(y_w) − log π_ref(y_w))``, detached.
        rejected_rewards: ``[B]`` the same for the rejected answers, detached.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def check_dpo_args(beta: float, loss_type: str, label_smoothing: float) -> None:
    """Raises a :class:`ConfigError` for values :func:`dpo_loss` does not take.

    Args:
        beta: Must be > 0.
        loss_type: One of :data:`LOSS_TYPES`.
        label_smoothing: In ``[0, 0.5)`` for ``sigmoid`` and ``robust``; 0 for ``hinge`` and ``ipo``.

    Raises:
        ConfigError: a value is outside what is allowed.
    """
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"dpo.loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if not isinstance(beta, (int, float)) or not beta > 0:
        raise ConfigError(f"dpo.beta must be > 0, got {beta!r}")
    if not isinstance(label_smoothing, (int, float)) or not 0 <= label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and loss_type in ("hinge", "ipo"):
        raise ConfigError(
            f"dpo.label_smoothing applies to loss_type sigmoid (cDPO) and robust, not {loss_type}; "
            "set it to 0 or change the loss type"
        )


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
) -> DpoTerms:
    """Per-pair DPO-family losses and implicit rewards (formulas in the module doc).

    Args:
        chosen_logps: ``[B]`` summed answer log-probs of the chosen answers under the policy.
        rejected_logps: ``[B]`` the same for the rejected answers.
        ref_chosen_logps: ``[B]`` chosen answers under the reference.
        ref_rejected_logps: ``[B]`` rejected answers under the reference.
        beta: The KL strength β (IPO's τ).
        loss_type: One of :data:`LOSS_TYPES`.
        label_smoothing: ε of cDPO (``sigmoid``) and robust DPO.
        chosen_tokens: ``[B]`` answer token counts (needed by ``ipo``).
        rejected_tokens: ``[B]`` the same for the rejected answers.

    Returns:
        A :class:`DpoTerms`.

    Raises:
        ConfigError: a bad ``beta`` / ``loss_type`` / ``label_smoothing``, or ``ipo`` without token counts.
    """
    check_dpo_args(beta, loss_type, label_smoothing)
    chosen_ratio = chosen_logps - ref_chosen_logps  # [B]
    rejected_ratio = rejected_logps - ref_rejected_logps  # [B]
    delta = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:  # ipo
        if chosen_tokens is None or rejected_tokens is None:
            raise ConfigError("dpo_loss: loss_type 'ipo' needs chosen_tokens and rejected_tokens")
        per_token = chosen_ratio / chosen_tokens.clamp(min=1).to(
            chosen_ratio.dtype
        ) - rejected_ratio / rejected_tokens.clamp(min=1).to(rejected_ratio.dtype)
        losses = (per_token - 1 / (2 * beta)) ** 2
    return DpoTerms(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def pair_metrics(terms: DpoTerms, chosen_logps: Tensor, rejected_logps: Tensor) -> dict[str, float]:
    """Sums over the pairs of a batch of TRL's metrics (divide by the pair count for means).

    Args:
        terms: The batch's :class:`DpoTerms`.
        chosen_logps: ``[B]`` policy log-probs of the chosen answers.
        rejected_logps: ``[B]`` of the rejected answers.

    Returns:
        ``{name: sum over pairs}`` for each of :data:`METRIC_NAMES`.
    """
    c, r = terms.chosen_rewards.double(), terms.rejected_rewards.double()
    sums = torch.stack(
        [
            c.sum(),
            r.sum(),
            (c > r).double().sum(),
            (c - r).sum(),
            chosen_logps.detach().double().sum(),
            rejected_logps.detach().double().sum(),
        ]
    )
    return dict(zip(METRIC_NAMES, sums.tolist()))


def shares_prompts(model: nn.Module) -> bool:
    """Whether ``model`` scores :func:`lorakit.pairs.pack_pairs`' layout exactly.

    It must take a 4-D attention mask as given (transformers' ``sdpa`` and ``eager``
    attention, or :mod:`lorakit.padding_free`'s, which is SDPA for such a batch), attend
    causally, use positions from ``position_ids`` and have no sliding window (a window
    could cut what the mask allows).

    Args:
        model: A causal LM.

    Returns:
        True when :func:`pair_logps` may get a packed batch for it.
    """
    config = getattr(model, "config", None)
    return (
        getattr(config, "_attn_implementation", None)
        in ("sdpa", "eager", PADDING_FREE)  # the last: SDPA, mask as given
        and getattr(config, "sliding_window", None) is None
        and not getattr(config, "is_encoder_decoder", False)
        and attends_causally(model)
    )


def collate_for(
    model: nn.Module, pairs: list[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, Tensor]:
    """A batch of ``pairs`` in the layout ``model`` scores fastest: packed when :func:`shares_prompts`, else padded.

    Args:
        model: The model the batch is for.
        pairs: Tokenized pairs.
        pad_token_id: Token id put in padding positions.
        pad_to_multiple_of: Round the padded length up to a multiple of this.

    Returns:
        :func:`lorakit.pairs.pack_pairs` or :func:`lorakit.pairs.collate_pairs`' tensors.
    """
    collate = pack_pairs if shares_prompts(model) else collate_pairs
    return collate(pairs, pad_token_id, pad_to_multiple_of)


def pair_attention_mask(pair_ids: Tensor, pair_parts: Tensor, additive_dtype: torch.dtype | None = None) -> Tensor:
    """The 4-D attention mask of :func:`lorakit.pairs.pack_pairs`' rows.

    Query ``q`` may attend key ``k`` when both belong to the same pair, ``k <= q``, and
    not (``q`` in the rejected answer and ``k`` in the chosen one).

    Args:
        pair_ids: ``(R, T)`` the pair of each token (-1 on padding).
        pair_parts: ``(R, T)`` 0 prompt, 1 chosen, 2 rejected (-1 padding).
        additive_dtype: None for a boolean mask (``sdpa``), else an additive one in this dtype
            (0 where allowed, the dtype's most negative value elsewhere; ``eager``).

    Returns:
        ``(R, 1, T, T)``.
    """
    t = pair_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=pair_ids.device).tril()
    same = pair_ids[:, :, None] == pair_ids[:, None, :]
    crossed = (pair_parts[:, :, None] == 2) & (pair_parts[:, None, :] == 1)
    allowed = (same & causal & ~crossed)[:, None]
    if additive_dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=additive_dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(additive_dtype).min
    )


def pair_logps(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Policy (or, inside :func:`reference_mode`, reference) log-probs of a batch of pairs.

    Args:
        model: A causal LM.
        batch: ``2B`` rows from :func:`lorakit.pairs.collate_pairs`, chosen first; or
            :func:`lorakit.pairs.pack_pairs`' layout (for a model that :func:`shares_prompts`).

    Returns:
        ``(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens)``, each ``[B]``.

    Raises:
        ConfigError: a packed batch for a model that does not :func:`shares_prompts`.
    """
    if "score_index" not in batch:
        logps, tokens = completion_logps(model, batch)
    else:
        if not shares_prompts(model):
            raise ConfigError(
                "pair_logps: a packed batch (pack_pairs) needs sdpa or eager attention, causal and without a sliding "
                "window; collate this model's pairs with collate_pairs (or collate_for)"
            )
        pair_ids, groups = batch["pair_ids"], batch["score_group"]
        n_groups = 2 * (int(pair_ids.max()) + 1)
        eager = model.config._attn_implementation == "eager"
        dtype = model.get_input_embeddings().weight.dtype if eager else None
        inputs = {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            "attention_mask": pair_attention_mask(pair_ids, batch["pair_parts"], dtype),
        }
        logps = scored_logps(model, inputs, batch["score_index"], batch["score_target"], groups, n_groups)
        tokens = torch.bincount(groups, minlength=n_groups)
    b = logps.shape[0] // 2
    return logps[:b], logps[b:], tokens[:b], tokens[b:]


@contextlib.contextmanager
def reference_mode(model: nn.Module, reference_adapter: str | None = None) -> Iterator[nn.Module]:
    """Inside, ``model`` computes the DPO reference: deterministic, without gradients.

    With ``reference_adapter=None`` every adapter is disabled (the base model); else
    only that (frozen) adapter is active. Dropout is off (``eval()``). On exit the
    active adapters, the ``requires_grad`` flags and the train / eval mode are as before,
    also when the body raises.

    Args:
        model: An injected model.
        reference_adapter: The name of the reference adapter on ``model``, or None.

    Yields:
        The model.

    Raises:
        AdapterNotFoundError: ``reference_adapter`` is not on the model.
    """
    training, active = model.training, active_adapters(model)
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    model.eval()
    try:
        with torch.no_grad():
            if reference_adapter is None:
                with disable_adapters(model):
                    yield model
            else:
                set_adapter(model, reference_adapter)
                try:
                    yield model
                finally:
                    set_adapter(model, active)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(grads[name])
        model.train(training)


def evaluate_pairs(
    model: nn.Module,
    tokenizer: Any,
    data_path: str | os.PathLike[str],
    *,
    reference_adapter: str | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    max_seq_len: int = 1024,
    max_prompt_len: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Reward accuracy and margins of an adapter against its reference on a pairs file.

    Args:
        model: The model with the adapter to judge active.
        tokenizer: Its tokenizer.
        data_path: A JSONL file of preference rows (:mod:`lorakit.pairs`).
        reference_adapter: The reference adapter's name on ``model``, or None (the base).
        beta: β of the rewards and loss.
        loss_type: For ``eval_loss``; one of :data:`LOSS_TYPES`.
        label_smoothing: ε of cDPO / robust DPO.
        max_seq_len: Most tokens of prompt + answer.
        max_prompt_len: Most prompt tokens (None: no separate limit).
        batch_size: Pairs per forward.

    Returns:
        ``{"pairs", "eval_loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
        "rewards/rejected", "logps/chosen", "logps/rejected"}``, means over the pairs.

    Raises:
        DataError: the file is missing or a row is malformed.
        ConfigError: bad DPO values or ``batch_size``.
    """
    check_dpo_args(beta, loss_type, label_smoothing)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}.")
    pairs, _ = load_pairs(data_path, tokenizer, max_seq_len=max_seq_len, max_prompt_len=max_prompt_len)
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    sums = dict.fromkeys(("eval_loss", *METRIC_NAMES), 0.0)
    try:
        with torch.no_grad():
            for i in range(0, len(pairs), batch_size):
                batch = collate_for(model, pairs[i : i + batch_size], tokenizer.pad_token_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                with reference_mode(model, reference_adapter):
                    ref_c, ref_r, _, _ = pair_logps(model, batch)
                c, r, nc, nr = pair_logps(model, batch)
                terms = dpo_loss(
                    c,
                    r,
                    ref_c,
                    ref_r,
                    beta=beta,
                    loss_type=loss_type,
                    label_smoothing=label_smoothing,
                    chosen_tokens=nc,
                    rejected_tokens=nr,
                )
                sums["eval_loss"] += float(terms.losses.double().sum())
                for name, value in pair_metrics(terms, c, r).items():
                    sums[name] += value
    finally:
        model.train(training)
    return {"pairs": len(pairs), **{k: v / len(pairs) for k, v in sums.items()}}
