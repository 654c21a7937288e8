"""Answers from a model, with or without its adapter: prompts rendered, generated, decoded.

:func:`generate` and :func:`compare_base` are what the ``lorakit generate`` and
``lorakit chat`` verbs run; :mod:`lorakit.runs` re-exports them next to
``open_adapter`` and builds its exact-match eval on the private helpers here
(``_prompt_ids``, ``_generation_config``, ``_generate_ids``, ``_decode``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .adapters import disable_adapters
from .errors import ConfigError

__all__ = ["generate", "compare_base"]


def _prompt_ids(tokenizer: Any, prompt: str | Sequence[dict[str, str]], chat: bool) -> list[int]:
    """Token ids of a prompt: the chat template with the generation prompt, or the plain text."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if isinstance(prompt, str):
        text = prompt
    else:  # no template: a plain transcript the model can continue
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _generation_config(model: Any, tokenizer: Any, max_new_tokens: int, do_sample: bool, temperature: float):
    from transformers import GenerationConfig

    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
    if do_sample and not temperature > 0:
        raise ConfigError(f"temperature must be > 0 when sampling, got {temperature!r}.")
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    sampling = {"temperature": temperature, "top_p": 1.0, "top_k": 0} if do_sample else {}
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=eos or None,
                            pad_token_id=tokenizer.pad_token_id, **sampling)


@torch.inference_mode()
def _generate_ids(model: Any, tokenizer: Any, prompts: list[list[int]], gen_config: Any) -> list[list[int]]:
    """Greedy / sampled continuation of a batch of token-id prompts (left-padded)."""
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    device = next(model.parameters()).device
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         generation_config=gen_config)
    return [row[width:].tolist() for row in out.cpu()]


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[dict[str, str]],
    *,
    max_new_tokens: int = 128,
    chat: bool = True,
    do_sample: bool = False,
    temperature: float = 0.7,
) -> str:
    """Answer one prompt.

    Args:
        model: A causal LM (with or without adapters).
        tokenizer: Its tokenizer.
        prompt: A user message, or a whole conversation as ``[{"role", "content"}, ...]``.
        max_new_tokens: Most tokens to generate.
        chat: Render the prompt with the tokenizer's chat template (when it has one)
            and the generation prompt; False sends the text as it is.
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature (only with ``do_sample``).

    Returns:
        The generated text, special tokens removed.

    Raises:
        ConfigError: ``max_new_tokens`` < 1, or ``temperature`` <= 0 when sampling.
    """
    gen_config = _generation_config(model, tokenizer, max_new_tokens, do_sample, temperature)
    ids = _generate_ids(model, tokenizer, [_prompt_ids(tokenizer, prompt, chat)], gen_config)[0]
    return _decode(tokenizer, ids)


def compare_base(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 128, chat: bool = True
) -> list[tuple[str, str, str]]:
    """Greedy answers of the base model and of the adapter, one model in memory.

    Args:
        model: A model with an active adapter (e.g. from :func:`open_adapter`).
        tokenizer: Its tokenizer.
        prompts: User messages.
        max_new_tokens: Most tokens to generate per answer.
        chat: As in :func:`generate`.

    Returns:
        ``[(prompt, base_answer, adapter_answer), ...]`` in the order of ``prompts``.
    """
    tuned = [generate(model, tokenizer, p, max_new_tokens=max_new_tokens, chat=chat) for p in prompts]
    with disable_adapters(model):
        base = [generate(model, tokenizer, p, max_new_tokens=max_new_tokens, chat=chat) for p in prompts]
    return list(zip(prompts, base, tuned))
